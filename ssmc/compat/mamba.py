"""Drop-in replacements for mamba_ssm's Triton SSD entry points, backed by ssmc ops.

    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
become
    from ssmc.compat.mamba import mamba_chunk_scan_combined, selective_state_update

Same arguments, shapes and results. Each call renders a spec from its sizes and flags
(ssmc.compat._specs), compiles it once per configuration, and runs it. mamba_ssm keeps
states as [.., headdim, dstate] = P×N; ssmc as [.., N, P]: they are transposed here.
Where the two differ (documented in docs/switching.md): `chunk_size` is a hint only
(ssmc's planner picks the form and chunk), and `cu_seqlens` alone separates sequences.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ssmc.compat._specs import (
    CompatError,
    MambaSpec,
    call,
    expect,
    op_for,
    rank,
    scalar,
    state_dtype,
)

__all__ = ["mamba_chunk_scan_combined", "selective_state_update"]


def mamba_chunk_scan_combined(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    initial_states: Tensor | None = None,
    seq_idx: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    return_varlen_states: bool = False,
) -> Tensor | tuple[Tensor, ...]:
    """Mamba-2's SSD: out (batch, seqlen, nheads, headdim) [, final_states] [, varlen_states].

    x (b, T, H, P), dt (b, T, H), A (H,), B/C (b, T, G, N), D (H, P) or (H,), z like x,
    dt_bias (H,), initial_states (b, H, P, N), seq_idx (b, T) non-decreasing per row,
    cu_seqlens (num_seqs + 1,) with batch 1. Δ = dt (+ dt_bias), softplus if
    `dt_softplus`, clamped to `dt_limit` unless it is (0, inf); out = (y + D·x)·silu(z).
    final_states (b, H, P, N) fp32; varlen_states (num_seqs, H, P, N) in C's dtype.
    """
    batch, seqlen, H, P = rank("x", x, 4, "(batch, seqlen, nheads, headdim)")
    G, N = rank("B", B, 4, "(batch, seqlen, ngroups, dstate)")[2:]
    expect("B", B, (batch, seqlen, G, N))
    expect("C", C, (batch, seqlen, G, N))
    expect("dt", dt, (batch, seqlen, H))
    expect("A", A, (H,))
    _chunk_size(chunk_size)
    if seqlen < 1:
        raise CompatError("x: seqlen must be at least 1")
    if z is not None:
        expect("z", z, (batch, seqlen, H, P))
    if dt_bias is not None:
        expect("dt_bias", dt_bias, (H,))
    if initial_states is not None:
        expect("initial_states", initial_states, (batch, H, P, N))
    if return_varlen_states and cu_seqlens is None:
        raise CompatError("cu_seqlens must be provided if return_varlen_states is True")
    lo, hi = _limit(dt_limit)
    limit = (lo, hi) != (0.0, math.inf)
    packing = _packing(batch, seqlen, seq_idx, cu_seqlens if return_varlen_states else None)
    spec = MambaSpec(
        H=H,
        G=G,
        N=N,
        P=P,
        D=_skip_kind(D, H, P),
        z=z is not None,
        dt_bias=dt_bias is not None,
        softplus=bool(dt_softplus),
        limit=limit,
        initial_state=initial_states is not None,
        final_state=bool(return_final_states or return_varlen_states),
        varlen=packing is not None,
    )
    op = op_for(spec)
    per_token = {"x": x, "dt": dt, "B": B, "C": C, **({"z": z} if z is not None else {})}
    params = {"A": A, **({"dt_bias": dt_bias} if dt_bias is not None else {})}
    if D is not None:
        params["D"] = D
    if limit:
        params["dt_min"], params["dt_max"] = scalar(lo, dt), scalar(hi, dt)
    sdtype = state_dtype(op, x)
    h0 = None if initial_states is None else initial_states.transpose(-1, -2).to(sdtype)
    if packing is None:
        y, states = call(op, {**per_token, **params}, initial_state=h0)
        finals = states
    else:
        # Every row and every sequence becomes one packed sequence of a batch-1 call.
        flat = {k: v.reshape(1, batch * seqlen, *v.shape[2:]) for k, v in per_token.items()}
        offsets = torch.tensor(packing.offsets, dtype=torch.int32, device=x.device)
        h0 = None if h0 is None else packing.scatter_initial(h0)
        y, states = call(op, {**flat, **params}, initial_state=h0, cu_seqlens=offsets)
        y = y.reshape(batch, seqlen, H, P)
        finals = None if states is None else states[packing.last_slots(x.device)]
    out = y.to(x.dtype)
    if not (return_final_states or return_varlen_states):
        return out
    assert finals is not None and states is not None
    final_states = finals.transpose(-1, -2).contiguous()
    if not return_varlen_states:
        return out, final_states
    varlen_states = states.transpose(-1, -2).to(C.dtype).contiguous()
    if not return_final_states:
        return out, varlen_states
    return out, final_states, varlen_states


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    state_batch_indices: Tensor | None = None,
) -> Tensor:
    """One decode step: updates `state` in place and returns out (batch, nheads, headdim).

    Multi-head form: state (slots, H, P, N), x (b, H, P), dt (b, H, P), A (H, P, N),
    B/C (b, G, N), D (H, P) or (H,), z like x, dt_bias (H, P), state_batch_indices (b,)
    (row i reads and writes state[state_batch_indices[i]]; without it slots = b).
    Mamba-1 form without the head axis: state (slots, P, N), x (b, P), A (P, N), B (b, N).
    When dt, dt_bias and A do not vary over headdim (and A not over dstate), as Mamba-2
    passes them (expanded, stride 0), the step runs the scalar-decay op; otherwise every
    channel is its own head with its own decay per state dim (the diagonal op).
    """
    if state.dim() == 3:
        unsqueezed = (_head(x), _head(dt), _head(A, 0), _head(B), _head(C))
        out = selective_state_update(
            state.unsqueeze(1),
            *unsqueezed,
            D=None if D is None else _head(D, 0),
            z=None if z is None else _head(z),
            dt_bias=None if dt_bias is None else _head(dt_bias, 0),
            dt_softplus=dt_softplus,
            state_batch_indices=state_batch_indices,
        )
        return out.squeeze(1)
    slots, H, P, N = rank("state", state, 4, "(batch, nheads, headdim, dstate)")
    batch = rank("x", x, 3, "(batch, nheads, headdim)")[0]
    G = rank("B", B, 3, "(batch, ngroups, dstate)")[1]
    expect("x", x, (batch, H, P))
    expect("dt", dt, (batch, H, P))
    expect("A", A, (H, P, N))
    expect("B", B, (batch, G, N))
    expect("C", C, (batch, G, N))
    if D is not None and tuple(D.shape) != (H,):
        expect("D", D, (H, P))
    if z is not None:
        expect("z", z, (batch, H, P))
    if dt_bias is not None:
        expect("dt_bias", dt_bias, (H, P))
    if state_batch_indices is None:
        if slots != batch:
            raise CompatError(f"state has {slots} rows for a batch of {batch}")
        rows = state
    else:
        expect("state_batch_indices", state_batch_indices, (batch,))
        index = state_batch_indices.long()
        rows = state.index_select(0, index)
    tied = (
        _constant_over(A, (1, 2))
        and _constant_over(dt, (2,))
        and (dt_bias is None or _constant_over(dt_bias, (1,)))
    )
    step = _scalar_step if tied else _channel_step
    out, new = step(rows, x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus))
    with torch.no_grad():
        if state_batch_indices is None:
            state.copy_(new)
        else:
            state.index_copy_(0, index, new.to(state.dtype))
    return out.to(x.dtype)


def _scalar_step(
    rows: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    softplus: bool,
) -> tuple[Tensor, Tensor]:
    """The tied step: one decay per head, through the same op as the chunked scan (T = 1)."""
    H, P, N = A.shape
    if D is not None and D.dim() == 2 and _constant_over(D, (1,)):
        D = D[:, 0]
    spec = MambaSpec(
        H=H,
        G=B.shape[1],
        N=N,
        P=P,
        D=0 if D is None else D.dim(),
        z=z is not None,
        dt_bias=dt_bias is not None,
        softplus=softplus,
        initial_state=True,
        final_state=True,
    )
    op = op_for(spec)
    tensors = {"x": x[:, None], "dt": dt[:, None, :, 0], "A": A[:, 0, 0], "B": B[:, None]}
    tensors["C"] = C[:, None]
    if D is not None:
        tensors["D"] = D
    if z is not None:
        tensors["z"] = z[:, None]
    if dt_bias is not None:
        tensors["dt_bias"] = dt_bias[:, 0]
    h0 = rows.transpose(-1, -2).to(state_dtype(op, x))
    y, final = call(op, tensors, initial_state=h0)
    assert final is not None
    return y[:, 0], final.transpose(-1, -2)


def _channel_step(
    rows: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    softplus: bool,
) -> tuple[Tensor, Tensor]:
    """The untied step: each of the H·P channels is a head with P = 1 and a decay per n."""
    batch, (H, P, N) = x.shape[0], A.shape
    spec = MambaSpec(
        H=H * P,
        G=B.shape[1],
        N=N,
        P=1,
        diagonal=True,
        D=0 if D is None else 1,
        z=z is not None,
        dt_bias=dt_bias is not None,
        softplus=softplus,
        initial_state=True,
        final_state=True,
    )
    op = op_for(spec)
    tensors = {
        "x": x.reshape(batch, 1, H * P, 1),
        "dt": dt.reshape(batch, 1, H * P),
        "A": A.reshape(H * P, N),
        "B": B[:, None],
        "C": C[:, None],
    }
    if D is not None:
        tensors["D"] = D.expand(H, P).reshape(H * P) if D.dim() == 2 else D.repeat_interleave(P)
    if z is not None:
        tensors["z"] = z.reshape(batch, 1, H * P, 1)
    if dt_bias is not None:
        tensors["dt_bias"] = dt_bias.reshape(H * P)
    h0 = rows.reshape(batch, H * P, N, 1).to(state_dtype(op, x))
    y, final = call(op, tensors, initial_state=h0)
    assert final is not None
    return y.reshape(batch, H, P), final.reshape(batch, H, P, N)


@dataclass(frozen=True, slots=True)
class _Packing:
    """Rows and sequences of a call as packed sequences of one batch-1 row.

    offsets: cu_seqlens over the batch·seqlen flattened tokens; first/last: per batch row,
    the sequence holding its first/last token; initial: per row, whether mamba_ssm applies
    initial_states to it (its first seq_idx is 0).
    """

    offsets: list[int]
    first: list[int]
    last: list[int]
    initial: list[bool]

    def scatter_initial(self, h0: Tensor) -> Tensor:
        """[batch, H, N, P] → [num_seqs, H, N, P]: each row's state at its first sequence."""
        rows = [r for r, keep in enumerate(self.initial) if keep]
        zeros = h0.new_zeros(len(self.offsets) - 1, *h0.shape[1:])
        if not rows:
            return zeros
        slots = torch.tensor([self.first[r] for r in rows], device=h0.device)
        return zeros.index_copy(0, slots, h0[torch.tensor(rows, device=h0.device)])

    def last_slots(self, device: torch.device) -> Tensor:
        return torch.tensor(self.last, device=device)


def _packing(
    batch: int, seqlen: int, seq_idx: Tensor | None, cu_seqlens: Tensor | None
) -> _Packing | None:
    """The packing a call needs: None without seq_idx and cu_seqlens (plain batches)."""
    if seq_idx is None and cu_seqlens is None:
        return None
    rows: list[list[int]] | None = None
    starts = [r * seqlen for r in range(batch)]
    if seq_idx is not None:
        expect("seq_idx", seq_idx, (batch, seqlen))
        if seq_idx.is_floating_point() or seq_idx.is_complex():
            raise CompatError(f"seq_idx must hold integers, got {seq_idx.dtype}")
        rows = seq_idx.tolist()
        for r, row in enumerate(rows):
            if any(b < a for a, b in zip(row, row[1:], strict=False)):
                raise CompatError(
                    f"seq_idx row {r} decreases; ssmc packs sequences by position, so each "
                    "row of seq_idx must be non-decreasing (sequences stored contiguously)"
                )
            starts += [r * seqlen + t for t in range(1, seqlen) if row[t] != row[t - 1]]
        starts.sort()
    offsets = starts + [batch * seqlen]
    if cu_seqlens is not None:
        offsets = _cu_offsets(cu_seqlens, batch, seqlen)
        given = sorted({o for o in offsets if 0 < o < seqlen})
        if rows is not None and given != starts[1:]:
            raise CompatError(
                f"cu_seqlens {offsets} and seq_idx disagree on where sequences start "
                f"(seq_idx starts new sequences at {starts[1:]})"
            )
    first = [bisect.bisect_right(offsets, r * seqlen) - 1 for r in range(batch)]
    last = [bisect.bisect_right(offsets, r * seqlen + seqlen - 1) - 1 for r in range(batch)]
    initial = [True] * batch if rows is None else [row[0] == 0 for row in rows]
    return _Packing(offsets=offsets, first=first, last=last, initial=initial)


def _cu_offsets(cu_seqlens: Tensor, batch: int, seqlen: int) -> list[int]:
    """cu_seqlens as a list, checked: batch 1, from 0 to seqlen, non-decreasing."""
    if batch != 1:
        raise CompatError(
            f"passing cu_seqlens to get the varlen states needs batch 1, got batch {batch}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or cu_seqlens.is_floating_point():
        raise CompatError(
            f"cu_seqlens must be 1-d integer offsets (num_seqs + 1,), got {cu_seqlens.dtype} "
            f"{tuple(cu_seqlens.shape)}"
        )
    offsets = [int(o) for o in cu_seqlens.tolist()]
    if offsets[0] != 0 or offsets[-1] != seqlen or offsets != sorted(offsets):
        raise CompatError(
            f"cu_seqlens must rise from 0 to seqlen = {seqlen} without decreasing, got {offsets}"
        )
    return offsets


def _skip_kind(D: Tensor | None, H: int, P: int) -> int:
    """0 without D, 1 for D (H,), 2 for D (H, P)."""
    if D is None:
        return 0
    if tuple(D.shape) == (H,):
        return 1
    expect("D", D, (H, P))
    return 2


def _limit(dt_limit: Sequence[float]) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise CompatError(f"dt_limit must be a pair of numbers, got {dt_limit!r}") from None
    return lo, hi


def _chunk_size(chunk_size: object) -> None:
    """mamba_ssm's chunk length: checked, then left to ssmc's planner (a hint)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise CompatError(f"chunk_size must be a positive integer, got {chunk_size!r}")


def _head(t: Tensor, axis: int = 1) -> Tensor:
    """The Mamba-1 form's tensors with a head axis of size 1 inserted."""
    return t.unsqueeze(axis)


def _constant_over(t: Tensor, axes: tuple[int, ...]) -> bool:
    """True when `t` is broadcast (stride 0) or of size 1 along every axis in `axes`."""
    return all(t.stride(a) == 0 or t.shape[a] == 1 for a in axes)
