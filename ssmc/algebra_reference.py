"""The PyTorch reference of a composite mask (sum, quasiseparable, decayed Toeplitz window).

Computed apart from `ssmc.algebra_ops` (the op under test): a quasiseparable mask and a
decayed window build the dense T×T matrix M of every head and take y = M x̄; a sum adds
its terms' references (each the basic reference of `ssmc.reference`, in `form`) and
stacks their states along N. Then skip and gate, as in `ssmc.reference`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from ssmc import ir
from ssmc.bind import bind, size_of
from ssmc.expr_torch import evaluate, squeeze_literals

Reference = Callable[..., tuple[Tensor, Tensor | None]]


def reference(checked: ir.CheckedSpec, form: ir.Form | str | None, chunk_size: int) -> Reference:
    """A callable like `ssmc.reference.reference(checked, form)` for a composite spec."""
    basic = importlib.import_module("ssmc.reference")

    chosen = basic.choose_form(checked, form)

    def run(*, initial_state: Tensor | None = None, cu_seqlens: Tensor | None = None,
            **tensors: Tensor) -> tuple[Tensor, Tensor | None]:
        spec = checked.spec
        dims = bind(checked, tensors, cu_seqlens=cu_seqlens)
        state: Tensor | None = None
        if isinstance(spec.mask, ir.MaskSum):
            y, state = _sum(checked, tensors, initial_state, cu_seqlens, chosen, chunk_size, dims)
        elif isinstance(spec.mask, ir.Toeplitz):
            y = _decayed_toeplitz(checked, tensors, dims, cu_seqlens)
        else:
            y = _quasiseparable(checked, tensors)
        env = {t.name: squeeze_literals(t, tensors[t.name]) for t in spec.tensors}
        axes = (ir.BATCH, ir.SEQ, basic._axis(checked.heads.output, "head"),
                basic._axis(checked.head_dim, "P"))
        if spec.skip is not None:
            y = y + evaluate(spec.skip, env, dims, axes)
        if spec.gate is not None:
            y = y * evaluate(spec.gate, env, dims, axes)
        return y.to(basic._output_dtype(checked, tensors)), state if spec.final_state else None

    return run


def _sub(piece: ir.CheckedSpec, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {t.name: tensors[t.name] for t in piece.spec.tensors if t.name in tensors}


def _sum(checked: ir.CheckedSpec, tensors: Mapping[str, Tensor], initial_state: Tensor | None,
         cu_seqlens: Tensor | None, form: ir.Form, chunk_size: int,
         dims: Mapping[str, int]) -> tuple[Tensor, Tensor | None]:
    """Σ_k term_k, each by the basic reference; states stacked along N."""
    basic = importlib.import_module("ssmc.reference")

    inits: list[Tensor | None] = [None] * len(checked.pieces)
    if initial_state is not None:
        assert checked.state_size is not None
        inits = list(initial_state.split(size_of(checked.state_size, dims), dim=2))
    y: Tensor | None = None
    states = []
    for piece, init in zip(checked.pieces, inits, strict=True):
        y_k, s_k = basic.reference(piece, form, chunk_size=chunk_size)(
            **_sub(piece, tensors), initial_state=init, cu_seqlens=cu_seqlens)
        y = y_k if y is None else y + y_k
        states.append(s_k)
    assert y is not None
    if checked.spec.final_state:
        return y, torch.cat([s for s in states if s is not None], dim=2)
    return y, None


def _expand(t: Tensor, H: int) -> Tensor:
    """[b, T, G, …] → [b, T, H, …]: group h // (H // G) serves head h."""
    G = t.shape[2]
    return t if G == H else t.repeat_interleave(H // G, dim=2)


def _quasiseparable(checked: ir.CheckedSpec, tensors: Mapping[str, Tensor]) -> Tensor:
    """y = M x̄ with M_ij = L_ij C_i·B_j, L_ij = ∏_{k=j+1..i} a_k (i ≥ j), ∏_{k=i..j-1} b_k."""
    from ssmc.reference import canonical_roles

    fwd, bwd = checked.pieces
    f = canonical_roles(fwd, _sub(fwd, tensors), bind(fwd, _sub(fwd, tensors)))
    b = canonical_roles(bwd, _sub(bwd, tensors), bind(bwd, _sub(bwd, tensors)))
    assert f.B is not None and f.C is not None
    H, T = f.H, f.x.shape[1]
    x, B, C = (_expand(t, H) for t in (f.x, f.B, f.C))
    la = _expand(_log(f.log_a, x), H)            # [b, T, H]
    lb = _expand(_log(b.log_a, x), H)
    ca = la.cumsum(1)
    cb = lb.cumsum(1) - lb                       # Σ_{k<t} log b_k
    i = torch.arange(T, device=x.device)
    lower = (i[:, None] >= i[None, :])
    # exponents per [b, H, i, j]; masked before exp so nothing overflows
    e_lo = ca.transpose(1, 2)[..., :, None] - ca.transpose(1, 2)[..., None, :]
    e_up = cb.transpose(1, 2)[..., None, :] - cb.transpose(1, 2)[..., :, None]
    L = torch.where(lower, e_lo.masked_fill(~lower, 0).exp(), e_up.masked_fill(lower, 0).exp())
    CB = torch.einsum("bihn,bjhn->bhij", C, B)
    return torch.einsum("bhij,bjhp->bihp", L * CB, x)


def _log(log_a: Tensor | None, x: Tensor) -> Tensor:
    if log_a is None:  # causal piece
        return torch.zeros(x.shape[:3], dtype=x.dtype, device=x.device)
    return log_a.to(x.dtype)


def _decayed_toeplitz(checked: ir.CheckedSpec, tensors: Mapping[str, Tensor],
                      dims: Mapping[str, int], cu_seqlens: Tensor | None) -> Tensor:
    """y_i = Σ_{0 ≤ i−j < L} K[h, i−j] γ_h^(i−j) x̄_j, densely, per packed sequence."""
    from ssmc.reference import canonical_roles

    spec = checked.spec
    mask = spec.mask
    assert isinstance(mask, ir.Toeplitz) and isinstance(mask.kernel, ir.LearnedKernel)
    assert mask.kernel.log_decay is not None
    piece = checked.pieces[0]
    head, lag = piece.spec.tensors[-1].shape
    head_axis = head if isinstance(head, str) else "1.head"
    env = {t.name: squeeze_literals(t, tensors[t.name]) for t in spec.tensors}
    K = evaluate(mask.kernel.kernel, env, dims, (head_axis, str(lag)))
    gamma = evaluate(mask.kernel.log_decay, env, dims, (head_axis, str(lag))).exp()
    sub = _sub(piece, tensors)
    sub[piece.spec.tensors[-1].name] = torch.zeros(
        (1 if isinstance(head, int) else dims[head], dims[str(lag)]), dtype=K.dtype, device=K.device)
    roles = canonical_roles(piece, sub, bind(piece, sub))
    H = roles.H
    x = _expand(roles.x, H)
    T = x.shape[1]
    G = max(K.shape[0], gamma.shape[0])
    Kh = K.expand(G, -1).repeat_interleave(H // G, 0)
    gh = gamma.expand(G, 1).repeat_interleave(H // G, 0)
    segments = [(0, T)] if cu_seqlens is None else list(
        zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist(), strict=True))
    y = torch.zeros_like(x)
    for a, e in segments:
        n = e - a
        d = torch.arange(n, device=x.device)
        d = d[:, None] - d[None, :]
        valid = (d >= 0) & (d < Kh.shape[1])
        idx = d.clamp(0, Kh.shape[1] - 1)
        M = torch.where(valid, Kh[:, idx] * gh[:, :, None] ** d.clamp(min=0).to(gh.dtype), 0.0)
        y[:, a:e] = torch.einsum("hij,bjhp->bihp", M.to(x.dtype), x[:, a:e])
    return y
