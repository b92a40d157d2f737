"""Context parallelism: one long sequence split across ranks, exchanging only states.

Each rank holds a contiguous part of the sequence (rank 0 the first) and runs the op on
it from a zero state, which gives its output y⁰ and the state S⁰ its part leaves behind.
The state entering rank r is then a short scan over the earlier parts,

    h_0 = 0,   h_{r+1} = Λ_r ⊙ h_r + S⁰_r,   Λ_r = exp(Σ_{t ∈ part r} log a_t),

so the ranks exchange only (S⁰, Λ) — O(batch·H·N·P) per rank, never O(T) — and each rank
corrects its output by the contribution of its entering state,

    y_t = y⁰_t + gate_t ⊙ exp(Σ_{s ≤ t} log a_s) ⊙ (C_t · h_r),

which is the linearity of the state recurrence (docs/semantics.md). The all-gather is
differentiable (torch.distributed.nn), so gradients flow back across ranks the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ssmc import ir
from ssmc.bind import bind, size_of
from ssmc.expr import Expr
from ssmc.expr_torch import evaluate, squeeze_literals
from ssmc.ir import BATCH, SEQ, CheckedSpec
from ssmc.reference import _axis

Op = Callable[..., tuple[Tensor, Tensor | None]]


class ContextParallelError(ValueError):
    """A spec or call that context parallelism cannot split."""


def check_splittable(checked: CheckedSpec) -> None:
    """Raise unless the spec has a state to hand on (not Toeplitz) and returns it."""
    spec = checked.spec
    if isinstance(spec.mask, ir.Toeplitz):
        raise ContextParallelError(
            f"{spec.name}: a Toeplitz mask has no recurrent state to hand between ranks"
        )
    if not spec.final_state:
        raise ContextParallelError(
            f"{spec.name}: context parallelism needs the spec's final_state flag "
            "(each rank hands its part's final state on)"
        )


class ContextParallel:
    """Run `op` (an ssmc op or reference of `checked`) on this rank's part of the sequence."""

    def __init__(
        self, checked: CheckedSpec, op: Op, group: dist.ProcessGroup | None = None
    ) -> None:
        check_splittable(checked)
        self.checked = checked
        self.op = op
        self.group = group

    def __call__(
        self, *, initial_state: Tensor | None = None, **tensors: Tensor
    ) -> tuple[Tensor, Tensor]:
        """This rank's y and the state after its part (the last rank's is the global one).

        `tensors` hold this rank's slice of the sequence axis; `initial_state` is read
        on rank 0 only (the state entering the whole sequence).
        """
        if "cu_seqlens" in tensors:
            raise ContextParallelError("context parallelism does not take cu_seqlens")
        rank = dist.get_rank(self.group)
        init = initial_state if rank == 0 else None
        if init is not None and not self.checked.spec.initial_state:
            raise ContextParallelError(
                f"{self.checked.spec.name} takes no initial_state (the spec lacks the flag)"
            )
        y0, s0 = self.op(initial_state=init, **tensors)
        assert s0 is not None
        decay = _roles(self.checked, tensors)
        total = decay.total()  # [b, H, N] (N broadcast for a scalar decay)
        # One collective carrying both (state, total decay): [b, H, N, P + 1] per rank.
        state32 = s0.to(torch.promote_types(s0.dtype, torch.float32))
        packed = torch.cat([state32, total.to(state32.dtype).unsqueeze(-1)], dim=-1)
        gathered = _AllGather.apply(packed, self.group)
        states, totals = gathered[..., :-1], gathered[..., -1]
        # Every rank's result must depend on the gathered tensor, or a rank would skip the
        # gather's backward collective and the others would wait for it forever: rank 0
        # enters with a zero that is still connected to the gather (by a zero derivative).
        h = states[0] * 0
        for j in range(rank):
            h = totals[j].unsqueeze(-1).exp() * h + states[j]
        correction = decay.entering_state_output(h)
        y = (y0.to(correction.dtype) + correction).to(y0.dtype)
        final = s0 + (total.unsqueeze(-1).exp() * h).to(s0.dtype)
        return y, final


class _Decay:
    """The roles the correction reads: log a per token, C per query group, the gate.

    log_a is [b, T, H] for a scalar decay (per head) or [b, T, H, N] for a diagonal one;
    C stays [b, T, Gq, N] (grouped), so a shared C is never copied to every head.
    """

    def __init__(self, log_a: Tensor, C: Tensor, gate: Tensor | None, H: int, N: int) -> None:
        self.log_a, self.C, self.gate, self.H, self.N = log_a, C, gate, H, N

    def total(self) -> Tensor:
        """Σ_t log a over this rank's part, [b, H, N]."""
        total = self.log_a.sum(dim=1)
        return total if total.dim() == 3 else total.unsqueeze(-1).expand(-1, -1, self.N)

    def entering_state_output(self, h: Tensor) -> Tensor:
        """gate ⊙ Σ_n exp(Σ_{s≤t} log a_s)_n C_{t,n} h_{n,:}: what the entering state adds to y."""
        reach = self.log_a.cumsum(dim=1).exp()  # [b, T, H] or [b, T, H, N]
        b, T, Gq, N = self.C.shape
        h = h.to(reach.dtype)
        if reach.dim() == 3:  # scalar decay: one grouped matmul, then a per-head scale
            grouped = h.unflatten(1, (Gq, self.H // Gq))  # [b, Gq, H/Gq, N, P]
            out = torch.einsum("btgn,bgknp->btgkp", self.C.to(reach.dtype), grouped)
            out = out.flatten(2, 3) * reach.unsqueeze(-1)  # [b, T, H, P]
        else:  # diagonal decay: the decay differs per state channel
            C = _to_heads(self.C, self.H).to(reach.dtype)
            out = torch.einsum("bthn,bhnp->bthp", reach * C, h)
        if self.gate is not None:
            out = out * self.gate.to(out.dtype)
        return out


def _roles(checked: CheckedSpec, tensors: Mapping[str, Tensor]) -> _Decay:
    """log a, C (grouped) and the gate, evaluated from the spec's expressions.

    Only the three roles the correction reads are evaluated (not x, the skip or B).
    """
    spec, heads = checked.spec, checked.heads
    dims = bind(checked, tensors)
    env = {t.name: squeeze_literals(t, tensors[t.name]) for t in spec.tensors}
    b, T, H = dims[BATCH], dims[SEQ], size_of(heads.output, dims)
    N = size_of(checked.state_size, dims) if checked.state_size is not None else 1
    n_axis = _axis(checked.state_size, "N")

    def role(expr: Expr, count: ir.Size | None, *rest: str) -> Tensor:
        G = 1 if count is None else size_of(count, dims)
        value = evaluate(expr, env, dims, (BATCH, SEQ, _axis(count, "head"), *rest))
        return _to_heads(value.expand(b, T, G, *(N for _ in rest)), H)

    assert spec.query is not None
    Gq = 1 if heads.query is None else size_of(heads.query, dims)
    C = evaluate(spec.query, env, dims, (BATCH, SEQ, _axis(heads.query, "head"), n_axis))
    C = C.expand(b, T, Gq, N)
    dtype = torch.promote_types(C.dtype, torch.float32)
    match spec.mask:
        case ir.ConstDecay(log_gamma=e):
            count = heads.decay
            per_head = evaluate(e, env, dims, (_axis(count, "head"),)).to(dtype)
            G = 1 if count is None else size_of(count, dims)
            log_a = _to_heads(per_head.expand(G)[None, None, :], H).expand(b, T, H)
        case ir.ScalarSemiseparable(log_a=e):
            log_a = role(e, heads.decay).to(dtype)
        case ir.DiagonalSemiseparable(log_a=e):
            log_a = role(e, heads.decay, n_axis).to(dtype)
        case _:  # causal: no decay
            log_a = torch.zeros(b, T, H, dtype=dtype, device=C.device)
    gate = None
    if spec.gate is not None:
        y_axes = (BATCH, SEQ, _axis(heads.output, "head"), _axis(checked.head_dim, "P"))
        gate = evaluate(spec.gate, env, dims, y_axes)
    return _Decay(log_a, C, gate, H, N)


def _to_heads(t: Tensor, H: int) -> Tensor:
    """[b, T, G, ...] → [b, T, H, ...]: head h reads group h // (H / G)."""
    G = t.shape[2]
    return t if G == H else t.repeat_interleave(H // G, dim=2)


class _AllGather(torch.autograd.Function):
    """[world, *shape] of every rank's tensor; backward sums each slot's gradient to its sender."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        world = dist.get_world_size(group)
        out = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(out, t.contiguous(), group=group)
        return torch.stack(out)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.rank], None
