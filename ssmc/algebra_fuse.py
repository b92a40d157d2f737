"""A sum of masks over shared query, key and value as ONE ordinary spec with K·H heads.

`mask A_0 + … + A_{K−1}` whose terms read the same C, B and X̄ runs as
one generated op: term p of head h becomes head h·K + p of a spec with K·H output heads,

    mask semiseparable(log_a = la)      input la : [batch, seq, K·H]
    query / key / value as written      (their head counts divide H, so they divide K·H)

x, B and C are shared through the head-group patterns (head h·K + p reads x head h, the
K consecutive heads of a group share it; B and C groups of H/G heads become K·H/G), so
nothing is copied and every kernel loads them once per group; la[.., h·K + p] is term p's
log decay at head h (a const_decay or causal term: broadcast or 0), computed in torch
before the op. Then y_h = Σ_p y_{h·K+p} and the state [batch, K·H, N, P] IS the sum's
stacked state [batch, H, K·N, P] (term p owns rows p·N … (p+1)·N − 1): a reshape. Every
form, the fused backward and the head-group gradient sums are the basic spec's.
With a diagonal term the fused mask is `diagonal(log_a = la)`, la [batch, seq, K·H, N]
(scalar terms broadcast along N). Scaled terms: a scale
all terms share (c·(A + B)) goes into the value as each piece has it; different scales
constant per head weight the op's heads in the output sum and the final state — only
without `initial_state` (a carried state would have to be divided by the scale). Else
(`ssmc.algebra_ops` runs one op per term): different scales with `initial_state`, or a
scale that varies along seq.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import Tensor

from ssmc import expr as E
from ssmc import ir
from ssmc.bind import size_of
from ssmc.errors import CheckError
from ssmc.expr_torch import evaluate, squeeze_literals

SCALAR = (ir.Causal, ir.ConstDecay, ir.ScalarSemiseparable)
"""Term kinds with one log decay per (batch, seq, head)."""
FUSED = (*SCALAR, ir.DiagonalSemiseparable)
"""Term kinds the fused spec expresses (with a diagonal term: one log decay per state dim)."""
DECAY = "log_a"
"""Name of the fused spec's decay input (made unique)."""


def scaled_terms(checked: ir.CheckedSpec) -> list[tuple[ir.Mask, E.Expr | None]] | None:
    """(mask, scale) of each term when one fused op can run the sum, else None: causal,
    const_decay, semiseparable or diagonal masks; scales all alike (folded into the value,
    as each piece has it) or, without `initial_state`, constant per head (weights)."""
    mask = checked.spec.mask
    if not isinstance(mask, ir.MaskSum) or len(mask.terms) < 2:
        return None
    found: list[tuple[ir.Mask, E.Expr | None]] = []
    for term in mask.terms:
        scale = None
        if isinstance(term, ir.MaskProduct) and len(term.factors) == 2 and isinstance(
                term.factors[0], ir.MaskScale):
            scale, term = term.factors[0].value, term.factors[1]
        if not isinstance(term, FUSED):
            return None
        found.append((term, scale))
    if _diagonal(tuple(m for m, _ in found)) and not isinstance(checked.state_size, str):
        return None
    if _common(found) is None and (checked.spec.initial_state or not all(
            _per_head(s, checked.spec) for _, s in found)):
        return None
    return found


def terms(checked: ir.CheckedSpec) -> tuple[ir.Mask, ...] | None:
    """The masks of the sum's terms when one fused op can run them (`scaled_terms`)."""
    found = scaled_terms(checked)
    return None if found is None else tuple(m for m, _ in found)


def _common(found: list[tuple[ir.Mask, E.Expr | None]]) -> list[E.Expr | None] | None:
    """[the scale] when every term has the same scale (or none), else None."""
    texts = {None if s is None else E.show(s) for _, s in found}
    return [found[0][1]] if len(texts) == 1 else None


def _per_head(scale: E.Expr | None, spec: ir.Spec) -> bool:
    """Whether a scale is constant along batch and seq (at most a head axis)."""
    from ssmc.axes import expr_axes, head_dims

    if scale is None:
        return True
    axes = expr_axes(scale, spec)
    return len(axes) <= 1 and all(a in head_dims(spec) for a in axes)


def weighted(checked: ir.CheckedSpec) -> bool:
    """Whether the fused op's heads are weighted by the terms' scales (`output_sum`)."""
    found = scaled_terms(checked)
    return found is not None and _common(found) is None


def _diagonal(found: tuple[ir.MaskExpr, ...]) -> bool:
    return any(isinstance(t, ir.DiagonalSemiseparable) for t in found)


def _unique(name: str, taken: set[str]) -> str:
    while name in taken:
        name += "_"
    return name


def fused_spec(checked: ir.CheckedSpec) -> ir.Spec | None:
    """The one spec with K·H heads that runs the sum (module docstring), or None."""
    from ssmc.algebra_pieces import minimal

    scaled = scaled_terms(checked)
    if scaled is None:
        return None
    found = tuple(m for m, _ in scaled)
    spec, K = checked.spec, len(found)
    H = checked.heads.output
    taken = {t.name for t in spec.tensors} | {d.name for d in spec.dims} | {
        spec.name, spec.output.name}
    dims = spec.dims
    if isinstance(H, str):
        value = spec.dim(H).value
        kh: ir.Size = _unique(f"{H}{K}", taken)
        dims = (*dims, ir.Dim(name=kh, value=None if value is None else K * value,
                              span=spec.dim(H).span))
    else:
        kh = K * H
    decay = _unique(DECAY, taken)
    span = spec.mask.span  # type: ignore[union-attr]
    ref = E.Ref(name=decay, span=span)
    mask: ir.Mask = ir.ScalarSemiseparable(log_a=ref, span=span)
    shape: tuple[ir.Size, ...] = (ir.BATCH, ir.SEQ, kh)
    if _diagonal(found):  # one log decay per state dim: scalar terms broadcast along N
        assert checked.state_size is not None
        mask, shape = ir.DiagonalSemiseparable(log_a=ref, span=span), (*shape, checked.state_size)
    la = ir.Tensor(name=decay, kind=ir.TensorKind.INPUT, shape=shape, span=span)
    out = spec.output
    output = dataclasses.replace(out, shape=(*out.shape[:2], kh, *out.shape[3:]))
    common = _common(scaled)
    if common is not None:  # c·(A + B): c goes into the value, as each piece has it
        from ssmc.algebra import fold_scale

        spec, _ = fold_scale(spec, common[0])
    return minimal(spec, name=f"{spec.name}_sum", mask=mask, skip=None, gate=None,
                   output=output, tensors=(*spec.tensors, la), dims=dims)


def fused_checked(checked: ir.CheckedSpec) -> ir.CheckedSpec | None:
    """`fused_spec` checked, or None when there is none or it does not check."""
    from ssmc.check import check

    spec = fused_spec(checked)
    if spec is None:
        return None
    try:
        fused = check(spec)
    except CheckError:
        return None
    return fused if all(f in fused.forms for f in checked.forms) else None


def derivation_line(checked: ir.CheckedSpec, fused: ir.CheckedSpec) -> str:
    """What `ssmc explain` shows for the lowering."""
    K = len(checked.pieces)
    H, KH = checked.heads.output, fused.heads.output
    decay = fused.spec.tensors[-1].name
    found = scaled_terms(checked)
    assert found is not None
    common = _common(found)
    if common is None:
        total = f"y_h = Σ_p c_p[h]·y_(h·{K}+p) with c_p term p's scale (1 if none)"
    else:
        total = f"y_h = Σ_p y_(h·{K}+p)" + (
            "" if common[0] is None else f", value {E.show(fused.spec.value)}")
    return (f"sum of {K} terms over one query, key and value → one op `{fused.spec.name}` with "
            f"{KH} = {K}·{H} heads: head h·{K} + p runs term p with {decay}[.., h·{K} + p] = its "
            f"log decay at head h; x, B, C shared by head groups; {total}; "
            f"state [batch, {KH}, N, P] = [batch, {H}, {K}·N, P]")


# ---------------------------------------------------------------- torch glue


def log_decay(term: ir.Mask) -> E.Expr | None:
    """Term's log decay per (batch, seq, head[, N]) in the fused op: log a, log γ, or None (0)."""
    match term:
        case ir.ScalarSemiseparable(log_a=e) | ir.DiagonalSemiseparable(log_a=e):
            return e
        case ir.ConstDecay(log_gamma=e):
            return e
    return None


def interleave(cols: list[Tensor]) -> Tensor:
    """K tensors [batch, seq, H, …] → [batch, seq, K·H, …], cols[p][:, :, h] at head h·K + p."""
    b, T, H, *rest = cols[0].shape
    return torch.stack(cols, dim=3).reshape(b, T, H * len(cols), *rest)


def decay_tensor(checked: ir.CheckedSpec, tensors: Mapping[str, Tensor],
                 dims: Mapping[str, int]) -> Tensor:
    """la [batch, seq, K·H(, N)]: term p's log decay at head h in column h·K + p (fp32 or
    wider); with a diagonal term every term's decay is broadcast along N."""
    from ssmc.reference import _axis

    found = terms(checked)
    assert found is not None
    spec = checked.spec
    env = {t.name: squeeze_literals(t, tensors[t.name]) for t in spec.tensors}
    b, T = dims[ir.BATCH], dims[ir.SEQ]
    H = size_of(checked.heads.output, dims)
    device = next(iter(tensors.values())).device
    rest: tuple[str, ...] = ()
    if _diagonal(found):
        assert isinstance(checked.state_size, str)
        rest = (checked.state_size,)
    sizes = tuple(dims[a] for a in rest)
    cols = []
    for piece, term in zip(checked.pieces, found, strict=True):
        count = piece.heads.decay
        e = log_decay(term)
        value = torch.zeros((), dtype=torch.float32) if e is None else evaluate(
            e, env, dims, (ir.BATCH, ir.SEQ, _axis(count, "head"), *rest))
        Gd = 1 if count is None else size_of(count, dims)
        value = value.to(device=device).expand(b, T, Gd, *sizes)
        cols.append(value if Gd == H else value.repeat_interleave(H // Gd, dim=2))
    dtype = torch.float32
    for c in cols:
        dtype = torch.promote_types(dtype, c.dtype)
    return interleave([c.to(dtype) for c in cols]).contiguous()


def state_in(state: Tensor, K: int) -> Tensor:
    """[lead, H, K·N, P] (term p owns rows p·N …) → the fused op's [lead, K·H, N, P]."""
    lead, H, KN, P = state.shape
    return state.reshape(lead, H * K, KN // K, P)


def head_weights(checked: ir.CheckedSpec, tensors: Mapping[str, Tensor],
                 dims: Mapping[str, int]) -> Tensor | None:
    """w [K·H]: term p's scale at head h at h·K + p (1 for an unscaled term); None when the
    scales are alike (folded into the value)."""
    from ssmc.axes import expr_axes

    found = scaled_terms(checked)
    if found is None or _common(found) is not None:
        return None
    spec = checked.spec
    env = {t.name: squeeze_literals(t, tensors[t.name]) for t in spec.tensors}
    H = size_of(checked.heads.output, dims)
    device = next(iter(tensors.values())).device
    cols = []
    for _, scale in found:
        if scale is None:
            w = torch.ones(H, device=device)
        else:
            axes = expr_axes(scale, spec)
            w = evaluate(scale, env, dims, (axes[0] if axes else "1.head",)).to(device)
            w = w if w.shape[0] == H else w.repeat_interleave(H // w.shape[0])
        cols.append(w.reshape(1, 1, H))
    dtype = torch.float32
    for c in cols:
        dtype = torch.promote_types(dtype, c.dtype)
    return interleave([c.to(dtype) for c in cols]).reshape(H * len(cols))


def state_out(state: Tensor, K: int, weights: Tensor | None = None) -> Tensor:
    """The fused op's [lead, K·H, N, P] (each head times its weight) → the sum's
    [lead, H, K·N, P]."""
    lead, KH, N, P = state.shape
    if weights is not None:
        state = state * weights.to(state.dtype).view(1, KH, 1, 1)
    return state.reshape(lead, KH // K, K * N, P)


def output_sum(y: Tensor, K: int, weights: Tensor | None = None) -> Tensor:
    """y [batch, seq, K·H, P] → Σ_p w[h·K + p]·y[.., h·K + p, :], [batch, seq, H, P], in fp32
    or wider."""
    b, T, KH, P = y.shape
    wide = y.float() if y.dtype in (torch.float16, torch.bfloat16) else y
    if weights is not None:
        wide = wide * weights.to(wide.dtype).view(1, 1, KH, 1)
    return wide.reshape(b, T, KH // K, K, P).sum(3)
