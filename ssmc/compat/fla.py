"""Drop-in replacements for flash-linear-attention's kernels, backed by ssmc ops.

    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
    from fla.ops.gla import chunk_gla
    from fla.ops.linear_attn import chunk_linear_attn
become
    from ssmc.compat.fla import (chunk_simple_gla, fused_recurrent_simple_gla, chunk_gla,
                                 chunk_linear_attn)

FLA's current batch-first layout: q, k [B, T, H, K], v [B, T, H, V]; states [N, H, K, V]
(N = B, or the number of sequences with `cu_seqlens`), which is ssmc's [.., N, P] as is.
Per head: S_t = a_t ⊙ S_{t-1} + k_t v_tᵀ, o_t = S_tᵀ (scale·q_t), scale = K^-0.5 by default.
Head-first inputs ([B, H, T, ..], `head_first=True`) are refused: transpose them.
Each call returns (o, final_state or None); o has q's dtype, the final state is fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ssmc.compat._specs import (
    CompatError,
    Decay,
    LinearAttentionSpec,
    call,
    expect,
    op_for,
    rank,
    scalar,
    state_dtype,
)

__all__ = ["chunk_gla", "chunk_linear_attn", "chunk_simple_gla", "fused_recurrent_simple_gla"]

Result = tuple[Tensor, Tensor | None]


def chunk_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    head_first: bool = False,
    *,
    g_gamma: Tensor | None = None,
) -> Result:
    """Simple GLA: a log decay per head and token, g [B, T, H] (and/or g_gamma [H])."""
    call = _Call(scale, initial_state, output_final_state, cu_seqlens, head_first)
    return call.run("chunk_simple_gla", q, k, v, g=g, g_gamma=g_gamma)


def fused_recurrent_simple_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None = None,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    reverse: bool = False,
    cu_seqlens: Tensor | None = None,
    head_first: bool = False,
    *,
    g_gamma: Tensor | None = None,
) -> Result:
    """Simple GLA in the recurrent form; `reverse` runs every sequence from its end."""
    name = "fused_recurrent_simple_gla"
    if not reverse:
        call = _Call(scale, initial_state, output_final_state, cu_seqlens, head_first)
        return call.run(name, q, k, v, g=g, g_gamma=g_gamma, form="recurrent")
    # Backwards is forwards over the time-reversed tokens. Reversing the packed axis also
    # reverses the order of the sequences, so offsets and per-sequence states are mirrored.
    T = rank("q", q, 4, "[B, T, H, K]")[1]
    packed = cu_seqlens is not None
    mirrored = (lambda t: t.flip(0)) if packed else (lambda t: t)
    call = _Call(
        scale,
        None if initial_state is None else mirrored(initial_state),
        output_final_state,
        None if cu_seqlens is None else T - cu_seqlens.flip(0),
        head_first,
    )
    gf = None if g is None else g.flip(1)
    o, final = call.run(
        name, q.flip(1), k.flip(1), v.flip(1), g=gf, g_gamma=g_gamma, form="recurrent"
    )
    return o.flip(1), None if final is None else mirrored(final)


def chunk_gla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    head_first: bool = False,
) -> Result:
    """GLA: a log decay per head, token and key dim, g [B, T, H, K] (a diagonal mask)."""
    if g is None:
        raise CompatError("chunk_gla: g [B, T, H, K] is required (use chunk_simple_gla without)")
    call = _Call(scale, initial_state, output_final_state, cu_seqlens, head_first)
    return call.run("chunk_gla", q, k, v, g=g, diagonal=True)


def chunk_linear_attn(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    normalize: bool = True,
    head_first: bool = False,
    cu_seqlens: Tensor | None = None,
) -> Result:
    """Causal linear attention; `normalize` (FLA's default) divides o_t by (scale·q_t)·Σ k_j.

    As in FLA, the normaliser sums the keys of the current sequence up to t (not the
    initial state) and adds 1e-10.
    """
    call = _Call(scale, initial_state, output_final_state, cu_seqlens, head_first)
    o, final = call.run("chunk_linear_attn", q, k, v)
    if normalize:
        o = _normalize(o, q, k, _scale(scale, k), cu_seqlens)
    return o, final


@dataclass(frozen=True, slots=True)
class _Call:
    """The arguments every FLA entry point shares."""

    scale: float | None
    initial_state: Tensor | None
    output_final_state: bool
    cu_seqlens: Tensor | None
    head_first: bool

    def run(
        self,
        name: str,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        g: Tensor | None = None,
        g_gamma: Tensor | None = None,
        diagonal: bool = False,
        form: str | None = None,
    ) -> Result:
        """Validate the arguments, render the spec of this configuration, run its op."""
        if self.head_first:
            raise CompatError(
                f"{name}: head-first inputs [B, H, T, D] are not supported (FLA has dropped "
                "them too); pass batch-first tensors, e.g. q.transpose(1, 2)"
            )
        batch, T, H, K = rank("q", q, 4, "[B, T, H, K]")
        V = rank("v", v, 4, "[B, T, H, V]")[3]
        expect("k", k, (batch, T, H, K))
        expect("v", v, (batch, T, H, V))
        decay = _decay(g, g_gamma, diagonal, (batch, T, H, K))
        states = batch
        if self.cu_seqlens is not None:
            if batch != 1:
                raise CompatError(
                    f"{name}: the batch size is expected to be 1 rather than {batch} when "
                    "using cu_seqlens; flatten variable-length inputs to [1, total, H, D]"
                )
            states = self.cu_seqlens.shape[0] - 1
        if self.initial_state is not None:
            expect("initial_state", self.initial_state, (states, H, K, V))
        spec = LinearAttentionSpec(
            H=H,
            K=K,
            V=V,
            decay=decay,
            scale=self.scale is not None,
            initial_state=self.initial_state is not None,
            final_state=bool(self.output_final_state),
            varlen=self.cu_seqlens is not None,
        )
        op = op_for(spec)
        tensors = {"q": q, "k": k, "v": v}
        if g is not None:
            tensors["g"] = g
        if g_gamma is not None:
            tensors["g_gamma"] = g_gamma
        if self.scale is not None:
            tensors["scale"] = scalar(_scale(self.scale, k), q)
        h0 = self.initial_state
        if h0 is not None:
            h0 = h0.to(state_dtype(op, q))
        o, final = call(op, tensors, initial_state=h0, cu_seqlens=self.cu_seqlens, form=form)
        return o.to(q.dtype), final if self.output_final_state else None


def _decay(
    g: Tensor | None, g_gamma: Tensor | None, diagonal: bool, shape: tuple[int, ...]
) -> Decay:
    """The decay the gates ask for, after checking their shapes against q's [B, T, H, K]."""
    if diagonal:
        expect("g", g, shape)
        return Decay.DIAGONAL
    if g is not None:
        expect("g", g, shape[:3])
    if g_gamma is not None:
        expect("g_gamma", g_gamma, shape[2:3])
    return {
        (False, False): Decay.NONE,
        (True, False): Decay.SCALAR,
        (False, True): Decay.CONST,
        (True, True): Decay.SCALAR_CONST,
    }[(g is not None, g_gamma is not None)]


def _scale(scale: float | None, k: Tensor) -> float:
    """FLA's default scale K^-0.5, or the given one as a float."""
    if scale is None:
        return float(k.shape[-1] ** -0.5)
    try:
        return float(scale)
    except (TypeError, ValueError):
        raise CompatError(f"scale must be a number, got {scale!r}") from None


def _normalize(o: Tensor, q: Tensor, k: Tensor, scale: float, cu_seqlens: Tensor | None) -> Tensor:
    """o_t / ((scale·q_t)·Σ_{j≤t, same sequence} k_j + 1e-10), summed in fp32 (fp64 for fp64)."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    keys = k.to(dtype).cumsum(1)
    if cu_seqlens is not None:
        # Subtract, for every token, the key sum of the sequences before its own.
        starts, lengths = cu_seqlens[:-1].long(), cu_seqlens.diff().long()
        before = F.pad(keys, (0, 0, 0, 0, 1, 0))[:, starts]
        sequence = torch.repeat_interleave(
            torch.arange(starts.shape[0], device=k.device), lengths, output_size=k.shape[1]
        )
        keys = keys - before[:, sequence]
    z = (q.to(dtype) * scale * keys).sum(-1, keepdim=True)
    return (o.to(dtype) / (z + 1e-10)).to(o.dtype)
