"""The mask algebra's checker: rewrite products and scales, split sums and bidirectional masks.

`ssmc.check.check` hands a spec here when its mask is an algebra (`mask A * B`, `c * A`,
`A + B`, `quasiseparable(...)`). Products and scales are REWRITES to a basic kind, so every
form and kernel applies unchanged:

    causal ∘ M → M                                   (every basic mask is causal)
    const_decay(g) ∘ const_decay(h) → const_decay(g + h)
    semiseparable(a) ∘ semiseparable(b) → semiseparable(a + b)   (also with const_decay)
    diagonal(a) ∘ semiseparable(b) → diagonal(a + b)            (b broadcast along N)
    toeplitz(K) ∘ const_decay(g) → toeplitz with taps K[d]·exp(d·g)
    quasiseparable(a, b) ∘ quasiseparable(c, d) → quasiseparable(a + c, b + d)
    causal ∘ quasiseparable(a, b) → semiseparable(a)         (the lower part)
    c · M → M with the value scaled by c (the kernel, or the LTI C, for Toeplitz)

A sum `A + B` stays a sum (`ir.MaskSum`, 2-semiseparable for two 1-SS terms); a
`quasiseparable` mask stays itself; both run as several ops of basic kinds, and so does a
decayed Toeplitz window (its taps are computed before the Toeplitz op). A sum over one
query, key and value runs as ONE op with K·H heads instead (`ssmc.algebra_fuse`). Each such op is a
"piece": a checked spec with one basic mask and no skip or gate (`CheckedSpec.pieces`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ssmc import expr as E
from ssmc import ir
from ssmc.errors import CheckError, Diagnostic
from ssmc.expr import Span, show

BASIC = (ir.Causal, ir.ConstDecay, ir.ScalarSemiseparable, ir.DiagonalSemiseparable, ir.Toeplitz)
ALGEBRA = (ir.MaskScale, ir.MaskProduct, ir.MaskSum, ir.Quasiseparable)


class AlgebraError(Exception):
    """A composition with no structure ssmc knows (raised inside `normalize`)."""

    def __init__(self, message: str, span: Span | None, hint: str) -> None:
        super().__init__(message)
        self.diagnostic = Diagnostic(message=message, span=span, hint=hint)


@dataclass(frozen=True, slots=True)
class Term:
    """One term of a normalised mask: `scale · mask` (mask None: a bare constant)."""

    mask: ir.Mask | ir.Quasiseparable | None
    scale: E.Expr | None


def needs_algebra(spec: ir.Spec) -> bool:
    """Whether `check` must hand this spec to `check_algebra`."""
    mask = spec.mask
    decayed = isinstance(mask, ir.Toeplitz) and isinstance(mask.kernel, ir.LearnedKernel) \
        and mask.kernel.log_decay is not None
    return spec.composition is not None or isinstance(mask, ALGEBRA) or decayed


def is_composite(checked: ir.CheckedSpec) -> bool:
    """Whether the op of `checked` runs as several ops (`ssmc.algebra_ops.CompositeOp`)."""
    return bool(checked.pieces)


# ------------------------------------------------------------------ text


def mask_text(mask: ir.MaskExpr | None) -> str:
    """The mask as one would write it: `semiseparable(log_a = dt * A)`."""
    match mask:
        case None:
            return "1"
        case ir.Causal():
            return "causal"
        case ir.ConstDecay(log_gamma=e):
            return f"const_decay(log_gamma = {show(e)})"
        case ir.ScalarSemiseparable(log_a=e):
            return f"semiseparable(log_a = {show(e)})"
        case ir.DiagonalSemiseparable(log_a=e):
            return f"diagonal(log_a = {show(e)})"
        case ir.Toeplitz(kernel=ir.LearnedKernel(kernel=k, log_decay=g)):
            decay = "" if g is None else f", taps · exp(lag · {show(g)})"
            return f"toeplitz(kernel = {show(k)}{decay})"
        case ir.Toeplitz():
            return "lti(...)"
        case ir.MaskScale(value=e):
            return show(e)
        case ir.MaskProduct(factors=fs):
            return " ∘ ".join(_operand(f) for f in fs)
        case ir.MaskSum(terms=ts):
            return " + ".join(mask_text(t) for t in ts)
        case ir.Quasiseparable(forward=f, backward=b):
            return f"quasiseparable({_decay_text(f)}, backward {_decay_text(b)})"
    raise TypeError(f"not a mask: {mask!r}")


def _operand(mask: ir.MaskExpr) -> str:
    text = mask_text(mask)
    return f"({text})" if isinstance(mask, ir.MaskSum) else text


def _decay_text(mask: ir.Mask) -> str:
    match mask:
        case ir.ScalarSemiseparable(log_a=e):
            return f"log_a = {show(e)}"
        case ir.ConstDecay(log_gamma=e):
            return f"log_a = {show(e)} (constant)"
    return "log_a = 0"


def _term_text(t: Term) -> str:
    if t.scale is None:
        return mask_text(t.mask)
    return f"{_scale_text(t.scale)} · {_operand(t.mask) if t.mask is not None else '1'}"


def _scale_text(e: E.Expr) -> str:
    text = show(e)
    return f"({text})" if isinstance(e, E.BinOp | E.Neg) else text


# ------------------------------------------------------------------ rewriting


def _add(a: E.Expr, b: E.Expr, span: Span | None) -> E.Expr:
    return E.BinOp(op=E.Op.ADD, lhs=a, rhs=b, span=span)


def _mul(a: E.Expr | None, b: E.Expr | None, span: Span | None) -> E.Expr | None:
    if a is None or b is None:
        return b if a is None else a
    return E.BinOp(op=E.Op.MUL, lhs=a, rhs=b, span=span)


def normalize(mask: ir.MaskExpr) -> tuple[list[Term], list[str]]:
    """The mask as a sum of `scale · basic mask` terms, and each rewrite applied (text).

    Raises AlgebraError for a product with no known structure. Products distribute over
    sums; a normalised mask normalises to itself.
    """
    steps: list[str] = []
    return _normal(mask, steps), steps


def _normal(mask: ir.MaskExpr, steps: list[str]) -> list[Term]:
    match mask:
        case ir.MaskSum(terms=terms):
            return [t for term in terms for t in _normal(term, steps)]
        case ir.MaskScale(value=e):
            return [Term(None, e)]
        case ir.MaskProduct(factors=factors, span=span):
            acc = [Term(None, None)]
            for factor in factors:
                acc = [_times(a, b, span, steps) for a in acc for b in _normal(factor, steps)]
            return acc
    return [Term(mask, None)]  # type: ignore[arg-type]


def _times(a: Term, b: Term, span: Span | None, steps: list[str]) -> Term:
    scale = _mul(a.scale, b.scale, span)
    if a.mask is None or b.mask is None:
        return Term(a.mask if b.mask is None else b.mask, scale)
    return Term(_product(a.mask, b.mask, span, steps), scale)


def _product(a: ir.Mask | ir.Quasiseparable, b: ir.Mask | ir.Quasiseparable,
             span: Span | None, steps: list[str]) -> ir.Mask | ir.Quasiseparable:
    """The Hadamard product of two masks as one mask, with the rewrite recorded."""
    result = _product_rule(a, b, span) or _product_rule(b, a, span)
    if result is None:
        raise AlgebraError(
            f"no known structure for {mask_text(a)} ∘ {mask_text(b)}", span,
            "products ssmc rewrites: causal ∘ M, const_decay/semiseparable ∘ semiseparable/"
            "diagonal, toeplitz ∘ const_decay, quasiseparable ∘ quasiseparable "
            "(docs/variants.md)")
    steps.append(f"{_kind(a)} ∘ {_kind(b)} → {_kind(result)}: "
                 f"{mask_text(a)} ∘ {mask_text(b)} = {mask_text(result)}")
    return result


def _kind(mask: ir.MaskExpr) -> str:
    return {ir.Causal: "causal", ir.ConstDecay: "const_decay",
            ir.ScalarSemiseparable: "semiseparable", ir.DiagonalSemiseparable: "diagonal",
            ir.Toeplitz: "toeplitz", ir.Quasiseparable: "quasiseparable"}[type(mask)]


def _log(mask: ir.Mask) -> E.Expr | None:
    match mask:
        case ir.ConstDecay(log_gamma=e):
            return e
        case ir.ScalarSemiseparable(log_a=e) | ir.DiagonalSemiseparable(log_a=e):
            return e
    return None


def _product_rule(a: ir.Mask | ir.Quasiseparable, b: ir.Mask | ir.Quasiseparable,
                  span: Span | None) -> ir.Mask | ir.Quasiseparable | None:
    """a ∘ b when `a` is the factor that decides the rule, else None."""
    if isinstance(a, ir.Causal):
        if isinstance(b, ir.Quasiseparable):
            return b.forward
        return b
    if isinstance(a, ir.Quasiseparable):
        if isinstance(b, ir.Quasiseparable):
            fwd, bwd = _product(a.forward, b.forward, span, []), _product(
                a.backward, b.backward, span, [])
            if isinstance(fwd, ir.Quasiseparable | ir.DiagonalSemiseparable | ir.Toeplitz) or \
                    isinstance(bwd, ir.Quasiseparable | ir.DiagonalSemiseparable | ir.Toeplitz):
                return None
            return ir.Quasiseparable(forward=fwd, backward=bwd, span=span)
        return None
    la, lb = _log(a), _log(b)
    if isinstance(a, ir.ConstDecay) and isinstance(b, ir.ConstDecay):
        return ir.ConstDecay(log_gamma=_add(la, lb, span), span=span)  # type: ignore[arg-type]
    if isinstance(a, ir.ScalarSemiseparable) and isinstance(b, ir.ConstDecay | ir.ScalarSemiseparable):
        return ir.ScalarSemiseparable(log_a=_add(la, lb, span), span=span)  # type: ignore[arg-type]
    if isinstance(a, ir.DiagonalSemiseparable) and lb is not None:
        return ir.DiagonalSemiseparable(log_a=_add(la, lb, span), span=span)  # type: ignore[arg-type]
    if isinstance(a, ir.Toeplitz) and isinstance(b, ir.ConstDecay):
        k = a.kernel
        if not isinstance(k, ir.LearnedKernel):
            return None
        g = lb if k.log_decay is None else _add(k.log_decay, lb, span)  # type: ignore[arg-type]
        return ir.Toeplitz(kernel=dataclasses.replace(k, log_decay=g), span=span)
    return None


# ------------------------------------------------------------------ checking


def check_algebra(spec: ir.Spec, *, text: str | None = None) -> ir.CheckedSpec:
    """Check a spec whose mask is an algebra: rewrite it, or split it into pieces."""
    from ssmc.algebra_pieces import composite_checked
    from ssmc.check import check

    source = spec.composition if spec.composition is not None else spec.mask
    try:
        terms, steps = normalize(source)
    except AlgebraError as err:
        raise CheckError([err.diagnostic], source=spec.source, text=text) from None
    span = getattr(source, "span", None)
    if any(t.mask is None for t in terms):
        raise CheckError([Diagnostic(
            message="a constant alone is not a mask", span=span,
            hint="scale a mask: `mask c * semiseparable(log_a = ...)`")],
            source=spec.source, text=text)
    steps = list(steps)
    if len(terms) > 1:
        steps.append(f"sum of {len(terms)} terms → {len(terms)} state recurrences: "
                     + " + ".join(_term_text(t) for t in terms))
    (first,) = terms[:1]
    if len(terms) == 1 and isinstance(first.mask, BASIC) and not _decayed(first.mask):
        if spec.composition is None:  # first check: fold the scale into the spec
            spec, line = fold_scale(dataclasses.replace(spec, mask=first.mask), first.scale)
        else:  # re-checked (e.g. `with_dims`): folded already, only the step is written
            line = _folded_text(spec, first.scale)
        if line:
            steps.append(line)
        checked = check(dataclasses.replace(spec, composition=None), text=text)
        return dataclasses.replace(
            checked, spec=dataclasses.replace(checked.spec, composition=source),
            derivation=tuple(steps))
    normal = _normal_mask(terms, span)
    written = dataclasses.replace(spec, mask=normal, composition=source)
    return composite_checked(written, terms, tuple(steps), text=text)


def _decayed(mask: ir.Mask | ir.Quasiseparable) -> bool:
    return isinstance(mask, ir.Toeplitz) and isinstance(mask.kernel, ir.LearnedKernel) \
        and mask.kernel.log_decay is not None


def _normal_mask(terms: list[Term], span: Span | None) -> ir.MaskExpr:
    """The terms as one mask expression that normalises to the same terms."""
    parts: list[ir.MaskExpr] = []
    for t in terms:
        assert t.mask is not None
        if t.scale is None:
            parts.append(t.mask)
        else:
            parts.append(ir.MaskProduct(factors=(ir.MaskScale(value=t.scale, span=span), t.mask),
                                        span=span))
    return parts[0] if len(parts) == 1 else ir.MaskSum(terms=tuple(parts), span=span)


def fold_scale(spec: ir.Spec, scale: E.Expr | None) -> tuple[ir.Spec, str]:
    """c · M (M = spec.mask) as M with the value (kernel, LTI C) scaled by c, and the step."""
    if scale is None:
        return spec, ""
    if isinstance(spec.mask, ir.Toeplitz):
        mask, line = fold_kernel_scale(spec.mask, scale)
        return dataclasses.replace(spec, mask=mask), line
    value = _mul(spec.value, scale, spec.value.span)
    assert value is not None
    line = f"{_scale_text(scale)} · M → M with the value scaled: value = {show(value)}"
    return dataclasses.replace(spec, value=value), line


def _folded_text(spec: ir.Spec, scale: E.Expr | None) -> str:
    """The step `fold_scale` wrote for a spec it already folded."""
    if scale is None:
        return ""
    mask = spec.mask
    if isinstance(mask, ir.Toeplitz):
        k = mask.kernel
        if isinstance(k, ir.LearnedKernel):
            return f"{_scale_text(scale)} · toeplitz → toeplitz(kernel = {show(k.kernel)})"
        return f"{_scale_text(scale)} · lti → lti(C = {show(k.C)})"
    return f"{_scale_text(scale)} · M → M with the value scaled: value = {show(spec.value)}"


def fold_kernel_scale(mask: ir.Toeplitz, scale: E.Expr | None) -> tuple[ir.Toeplitz, str]:
    """c · toeplitz(K) → toeplitz(K · c); c · lti(C = E) → lti(C = E · c)."""
    if scale is None:
        return mask, ""
    k = mask.kernel
    if isinstance(k, ir.LearnedKernel):
        kernel = _mul(k.kernel, scale, k.kernel.span)
        assert kernel is not None
        new: ir.LearnedKernel | ir.LtiKernel = dataclasses.replace(k, kernel=kernel)
        line = f"{_scale_text(scale)} · toeplitz → toeplitz(kernel = {show(kernel)})"
    else:
        C = _mul(k.C, scale, k.C.span)
        assert C is not None
        new = dataclasses.replace(k, C=C)
        line = f"{_scale_text(scale)} · lti → lti(C = {show(C)})"
    return dataclasses.replace(mask, kernel=new), line


def atoms(mask: ir.MaskExpr) -> list[ir.Mask]:
    """Every basic mask inside a mask expression (the pieces of sums and quasiseparables)."""
    match mask:
        case ir.MaskSum(terms=parts) | ir.MaskProduct(factors=parts):
            return [m for p in parts for m in atoms(p)]
        case ir.MaskScale():
            return []
        case ir.Quasiseparable(forward=f, backward=b):
            return [f, b]
    return [mask]  # type: ignore[list-item]
