"""The pieces of a composite mask: one checked spec with a basic mask per op to run.

A sum `A + B` runs one piece per term (each with its own state); a `quasiseparable` mask
runs its forward piece on the sequence and its backward piece on the reversed sequence;
a decayed Toeplitz window runs one Toeplitz piece whose kernel is a synthesized param
(the taps, computed before the op). Every piece keeps only the tensors and dims it reads
and has no skip or gate: the composite op applies those once, to the sum.
"""

from __future__ import annotations

import dataclasses

from ssmc import expr as E
from ssmc import ir
from ssmc.algebra import Term, fold_scale, mask_text
from ssmc.axes import expr_axes, head_dims
from ssmc.errors import CheckError, Diagnostic
from ssmc.expr import Span

TAPS = "taps"
"""Name of the synthesized kernel param of a decayed Toeplitz piece (made unique)."""


def mask_exprs(mask: ir.MaskExpr) -> list[E.Expr]:
    """Every expression a mask reads."""
    match mask:
        case ir.ConstDecay(log_gamma=e):
            return [e]
        case ir.ScalarSemiseparable(log_a=e) | ir.DiagonalSemiseparable(log_a=e):
            return [e]
        case ir.Toeplitz(kernel=ir.LearnedKernel(kernel=k, log_decay=g)):
            return [k] + ([g] if g is not None else [])
        case ir.Toeplitz(kernel=ir.LtiKernel(A=A, B=B, C=C, dt=dt)):
            return [e for e in (A, B, C, dt) if e is not None]
        case ir.MaskScale(value=e):
            return [e]
        case ir.MaskProduct(factors=parts) | ir.MaskSum(terms=parts):
            return [e for p in parts for e in mask_exprs(p)]
        case ir.Quasiseparable(forward=f, backward=b):
            return mask_exprs(f) + mask_exprs(b)
    return []


def minimal(spec: ir.Spec, **changes: object) -> ir.Spec:
    """`spec` with `changes`, keeping only the tensors and dims its expressions read."""
    s = dataclasses.replace(spec, composition=None, **changes)  # type: ignore[arg-type]
    exprs = [e for e in (s.query, s.key, s.value, s.skip, s.gate) if e is not None]
    used = frozenset().union(*(E.refs(e) for e in exprs + mask_exprs(s.mask)))
    tensors = tuple(t for t in s.tensors if t.name in used)
    axes = {a for t in tensors for a in t.shape if isinstance(a, str)}
    axes |= {a for a in s.output.shape if isinstance(a, str)} | used
    dims = tuple(d for d in s.dims if d.name in axes)
    return dataclasses.replace(s, tensors=tensors, dims=dims)


class _Collector:
    """Checks pieces, gathering every problem once (pieces share roles, so errors repeat)."""

    def __init__(self, spec: ir.Spec, text: str | None) -> None:
        self.spec, self.text = spec, text
        self.diagnostics: list[Diagnostic] = []

    def error(self, message: str, span: Span | None, hint: str) -> None:
        self.add([Diagnostic(message=message, span=span, hint=hint)])

    def add(self, found: list[Diagnostic]) -> None:
        for d in found:
            if d not in self.diagnostics:
                self.diagnostics.append(d)

    def check(self, piece: ir.Spec) -> ir.CheckedSpec | None:
        from ssmc.check import check

        try:
            return check(piece, text=self.text)
        except CheckError as err:
            self.add(list(err.diagnostics))
            return None

    def raise_if_any(self) -> None:
        if self.diagnostics:
            raise CheckError(self.diagnostics, source=self.spec.source, text=self.text)


def composite_checked(spec: ir.Spec, terms: list[Term], steps: tuple[str, ...], *,
                      text: str | None) -> ir.CheckedSpec:
    """The checked composite: facts of its first piece (with skip and gate), and its pieces."""
    c = _Collector(spec, text)
    span = getattr(spec.mask, "span", None)
    plain = dict(skip=None, gate=None)
    pieces: list[ir.Spec] = []
    if len(terms) > 1:
        for t in terms:
            if not isinstance(t.mask, ir.Causal | ir.ConstDecay | ir.ScalarSemiseparable
                              | ir.DiagonalSemiseparable | ir.Toeplitz) or _decayed(t.mask):
                c.error(f"a sum's terms are basic masks; {mask_text(t.mask)} is not", span,
                        "sum causal, const_decay, semiseparable, diagonal or toeplitz masks")
        c.raise_if_any()
        for k, t in enumerate(terms):
            piece, _ = fold_scale(dataclasses.replace(spec, mask=t.mask, **plain), t.scale)
            pieces.append(minimal(piece, name=f"{spec.name}_term{k}"))
    elif isinstance(terms[0].mask, ir.Quasiseparable):
        qs, scale = terms[0].mask, terms[0].scale
        for flag in ("initial_state", "final_state", "varlen"):
            if getattr(spec, flag):
                c.error(f"a bidirectional (quasiseparable) mask reads the whole sequence, so no "
                        f"`{flag}`", span, f"drop `{flag}`")
        c.raise_if_any()
        for part, mask in (("fwd", qs.forward), ("bwd", qs.backward)):
            piece, _ = fold_scale(dataclasses.replace(spec, mask=mask, **plain), scale)
            pieces.append(minimal(piece, name=f"{spec.name}_{part}"))
    else:
        mask = terms[0].mask
        assert isinstance(mask, ir.Toeplitz) and isinstance(mask.kernel, ir.LearnedKernel)
        written = dataclasses.replace(spec, mask=mask)
        written, _ = fold_scale(written, terms[0].scale)
        spec = dataclasses.replace(spec, mask=written.mask)
        taps = _taps_piece(c, spec)
        c.raise_if_any()
        if taps is not None:  # else the undecayed kernel's own check (below) says why
            pieces.append(taps)
    first = pieces[0] if pieces else None
    if isinstance(spec.mask, ir.Toeplitz):
        mask = spec.mask
        assert isinstance(mask.kernel, ir.LearnedKernel)
        undecayed = ir.Toeplitz(kernel=dataclasses.replace(mask.kernel, log_decay=None),
                                span=mask.span)
        facts = c.check(minimal(spec, mask=undecayed))
    else:
        assert first is not None
        facts = c.check(minimal(spec, mask=first.mask, value=first.value))
    checked = [c.check(p) for p in pieces]
    if pieces:
        _check_unused(c, spec, pieces)
    c.raise_if_any()
    assert pieces, "a decayed kernel without taps passed its own check"
    assert facts is not None and all(p is not None for p in checked)
    forms = tuple(f for f in checked[0].forms if all(f in p.forms for p in checked))  # type: ignore[union-attr]
    if not forms:
        c.error("the terms of this mask share no form", span,
                "sum masks that share a form: " + "; ".join(
                    f"{mask_text(p.spec.mask)}: {', '.join(f.value for f in p.forms)}"  # type: ignore[union-attr]
                    for p in checked))
        c.raise_if_any()
    result = ir.CheckedSpec(
        spec=spec,
        forms=forms,
        heads=facts.heads,
        pattern=facts.pattern,
        state_size=facts.state_size,
        head_dim=facts.head_dim,
        value_factors=facts.value_factors,
        derivation=steps,
        pieces=tuple(p for p in checked if p is not None),
    )
    from ssmc.algebra_fuse import derivation_line, fused_checked

    fused = fused_checked(result)
    if fused is None:
        return result
    return dataclasses.replace(result, derivation=(*steps, derivation_line(result, fused)))


def _decayed(mask: object) -> bool:
    return isinstance(mask, ir.Toeplitz) and isinstance(mask.kernel, ir.LearnedKernel) \
        and mask.kernel.log_decay is not None


def _check_unused(c: _Collector, spec: ir.Spec, pieces: list[ir.Spec]) -> None:
    used = frozenset().union(*(E.refs(e) for e in mask_exprs(spec.mask)),
                             *(E.refs(e) for e in (spec.skip, spec.gate) if e is not None),
                             *({t.name for t in p.tensors} for p in pieces))
    for tensor in spec.tensors:
        if tensor.name not in used:
            c.error(f"`{tensor.name}` is declared but never used", tensor.span,
                    "use it in a role or mask, or remove it")


def _taps_piece(c: _Collector, spec: ir.Spec) -> ir.Spec | None:
    """toeplitz(kernel = taps) with `param taps : [heads, L]`, the decayed kernel's values."""
    mask = spec.mask
    assert isinstance(mask, ir.Toeplitz) and isinstance(mask.kernel, ir.LearnedKernel)
    kernel, g = mask.kernel.kernel, mask.kernel.log_decay
    assert g is not None
    known = {t.name for t in spec.tensors} | {d.name for d in spec.dims}
    missing = [r for r in _walk(kernel) + _walk(g) if r.name not in known]
    for ref in missing:
        c.error(f"`{ref.name}` is used but never declared", ref.span,
                f"declare it, e.g. `param {ref.name} : [H]`")
    if missing:
        return None
    heads = head_dims(spec)
    k_axes, g_axes = expr_axes(kernel, spec), expr_axes(g, spec)
    g_heads = [a for a in g_axes if a in heads]
    if [a for a in g_axes if a not in heads] or len(g_heads) > 1:
        c.error(f"a constant decay is one number per head; it has axes [{', '.join(g_axes)}]",
                g.span, "use e.g. `const_decay(gamma = g)` with `param g : [H]`")
        return None
    k_heads = [a for a in k_axes if a in heads]
    lags = [a for a in k_axes if a not in heads]
    if len(lags) != 1 or len(k_heads) > 1 or ir.BATCH in k_axes or ir.SEQ in k_axes:
        return None  # the undecayed kernel's own check reports it
    if k_heads and g_heads and k_heads != g_heads:
        c.error(f"the kernel has heads {k_heads[0]} but the decay has {g_heads[0]}", g.span,
                "the kernel and the decay share one head dim (or have none)")
        return None
    head: ir.Size = (k_heads or g_heads or [1])[0]
    names = known | {spec.name, spec.output.name}
    name = TAPS
    while name in names:
        name += "_"
    taps = ir.Tensor(name=name, kind=ir.TensorKind.PARAM, shape=(head, lags[0]), span=mask.span)
    piece = minimal(spec, mask=ir.Toeplitz(
        kernel=ir.LearnedKernel(kernel=E.Ref(name=name, span=mask.kernel.span),
                                span=mask.kernel.span), span=mask.span), skip=None, gate=None)
    dims = {d.name for d in piece.dims}
    extra = tuple(d for d in spec.dims if d.name in (head, lags[0]) and d.name not in dims)
    return dataclasses.replace(piece, name=f"{spec.name}_taps", tensors=(*piece.tensors, taps),
                               dims=(*piece.dims, *extra))


def _walk(expr: E.Expr) -> list[E.Ref]:
    match expr:
        case E.Ref():
            return [expr]
        case E.Neg(operand=o):
            return _walk(o)
        case E.BinOp(lhs=a, rhs=b):
            return _walk(a) + _walk(b)
        case E.Call(args=args):
            return [r for a in args for r in _walk(a)]
    return []
