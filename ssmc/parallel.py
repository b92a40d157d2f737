"""Context parallelism: one long sequence split across ranks, exchanging only states.

Each rank holds a contiguous part of the sequence (rank 0 the first). The state recurrence
is linear in its state, so the state a part leaves behind is

    S_r = Λ_r ⊙ h_r + S⁰_r,   Λ_r = exp(Σ_{t ∈ part r} log a_t),

with h_r the state entering the part and S⁰_r the state the part leaves from a zero state.
A rank therefore first runs a cheap state-only pass (`StatePass`: S⁰ and Σ log a, no
output; on rank 0 from the sequence's initial state), the ranks all-gather those
O(batch·H·N·P) values, each rank folds the earlier ranks' states into its entering state

    h_0 = initial_state (or 0),   h_{r+1} = Λ_r ⊙ h_r + S⁰_r,

and runs the op once on its part with `initial_state = h_r`: no correction pass over y.
Gradients take the same path backwards: the op's backward gives d h_r, which flows through
the fold and the all-gather (whose backward all-reduces the slots) into the earlier ranks'
state passes, whose own backward is torch autograd through two matmuls (docs/parallel.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ssmc import ir
from ssmc.bind import bind, size_of
from ssmc.expr import Expr, Ref
from ssmc.expr_torch import evaluate, squeeze_literals
from ssmc.ir import BATCH, SEQ, CheckedSpec
from ssmc.reference import _axis

Op = Callable[..., tuple[Tensor, Tensor | None]]
_HALF = (torch.float16, torch.bfloat16)


class ContextParallelError(ValueError):
    """A spec or call that context parallelism cannot split."""


def check_splittable(checked: CheckedSpec) -> None:
    """Raise unless the spec has one state to hand on and takes and returns it."""
    spec = checked.spec
    if isinstance(spec.mask, ir.Toeplitz):
        raise ContextParallelError(
            f"{spec.name}: a Toeplitz mask has no recurrent state to hand between ranks"
        )
    if checked.pieces:
        raise ContextParallelError(
            f"{spec.name}: a composite mask (sum, product or bidirectional) is not split "
            "across ranks yet (its state is several recurrences)"
        )
    for flag, why in (
        ("final_state", "each rank hands its part's final state on"),
        ("initial_state", "each rank starts from the state the earlier ranks hand on"),
    ):
        if not getattr(spec, flag):
            raise ContextParallelError(
                f"{spec.name}: context parallelism needs the spec's {flag} flag ({why})"
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
        self.state_pass = StatePass(checked, op)

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
        # The state the op takes: fp32 for a generated op, else the inputs' precision.
        dtype = torch.float32
        if getattr(self.op, "module", None) is None and all(
            t.dtype == torch.float64 for t in tensors.values() if t.is_floating_point()
        ):
            dtype = torch.float64
        left, log_total = self.state_pass(tensors, dtype)  # S⁰ [b, H, N, P], Σ log a [b, H, N]
        if init is not None:
            left = left + log_total.exp().unsqueeze(-1) * init.to(dtype)
        # One collective carrying (state left behind, Σ log a): [b, H, N, P + 1] per rank.
        packed = torch.cat([left, log_total.unsqueeze(-1)], dim=-1)
        gathered = _AllGather.apply(packed, self.group)
        states, totals = gathered[..., :-1], gathered[..., -1]
        # Every rank's result must depend on the gathered tensor, or a rank would skip the
        # gather's backward collective and the others would wait for it forever: rank 0
        # enters with a term that is still connected to the gather (by a zero derivative).
        h = states[0] * 0
        if rank == 0:
            h = h if init is None else h + init.to(dtype)
        for j in range(rank):
            h = totals[j].exp().unsqueeze(-1) * h + states[j]
        return self.op(initial_state=h.contiguous(), **tensors)  # type: ignore[return-value]


class StatePass:
    """S⁰ (the state a part leaves from a zero state) and Σ log a over the part, no output.

    S⁰ = Σ_t w_t ⊙ B_t ⊗ X̄_t with w_t = exp(Σ_{s>t} log a_s): one matmul contracting the
    sequence axis. A scalar decay is folded into X̄ (per head), so a B shared by a group of
    heads is read once, never copied per head; a diagonal decay (per state channel) is
    folded into B. The weights come from a reversed cumulative sum, never a difference of
    long prefixes. Differentiable by torch autograd (the matmul's backward is two matmuls
    of the same size): no pass of the op's backward is spent on it.

    Where no gradient is wanted and `op` is a generated op whose module has the chunked
    form, its `final_state_from_zero` runs instead: the chunked state walk alone, reading
    each input once (on 2×H200 it is what makes the split forward faster than one GPU).
    """

    def __init__(self, checked: CheckedSpec, op: Op | None = None) -> None:
        self.checked = checked
        module = getattr(op, "module", None)
        self.walk = getattr(module, "final_state_from_zero", None)
        # where the op's kernels run off the GPU (TRITON_INTERPRET=1); elsewhere on a CPU the
        # op is the reference and so is this pass
        self.interpreted = bool(getattr(op, "interpreted", False))

    def __call__(self, tensors: Mapping[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(S⁰ [b, H, N, P], Σ_t log a [b, H, N]), both in `dtype` (fp32 or fp64)."""
        values = list(tensors.values())
        wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in values)
        on_kernels = bool(values) and (values[0].is_cuda or self.interpreted)
        if self.walk is not None and on_kernels and not wants_grad:
            left, total = self.walk(**tensors)
            if total.dim() == 2:  # a scalar decay: one total per head
                total = total[..., None].expand(*left.shape[:3])
            return left.to(dtype), total.to(dtype)
        checked = self.checked
        spec, heads = checked.spec, checked.heads
        dims = bind(checked, tensors)
        env = {t.name: squeeze_literals(t, tensors[t.name]) for t in spec.tensors}
        b, T, H = dims[BATCH], dims[SEQ], size_of(heads.output, dims)
        N = size_of(checked.state_size, dims) if checked.state_size is not None else 1
        P = size_of(checked.head_dim, dims)
        n_axis, p_axis = _axis(checked.state_size, "N"), _axis(checked.head_dim, "P")
        v_axis, k_axis = _axis(heads.value, "head"), _axis(heads.key, "head")
        Gv = 1 if heads.value is None else size_of(heads.value, dims)
        Gk = 1 if heads.key is None else size_of(heads.key, dims)
        assert spec.key is not None
        B = evaluate(spec.key, env, dims, (BATCH, SEQ, k_axis, n_axis)).expand(b, T, Gk, N)
        # X̄ = base · scale where the value splits so (ValueFactors): the scale is folded
        # with the decay weight per head and X̄ itself is never built in fp32.
        factors = checked.value_factors
        base_expr: Expr = spec.value if factors is None else Ref(name=factors.base)
        base = evaluate(base_expr, env, dims, (BATCH, SEQ, v_axis, p_axis)).expand(b, T, Gv, P)
        scale = None
        if factors is not None and factors.scale is not None:
            scale = evaluate(factors.scale, env, dims, (BATCH, SEQ, v_axis)).expand(b, T, Gv)
            scale = _to_heads(scale.to(dtype), H)
        log_a = _log_a(checked, env, dims, (b, T, H, N), dtype)  # None: causal
        low = _matmul_dtype(base, B, dtype)
        x = _to_heads(base, H)  # [b, T, H, P]
        if log_a is None:
            total = torch.zeros(b, H, N, dtype=dtype, device=B.device)
            x = x if scale is None else x * scale.unsqueeze(-1).to(x.dtype)
            left = B.to(low)
        else:
            after, total = _suffix_sums(log_a)  # Σ_{s>t} log a_s, Σ_t log a_t
            total = total if log_a.dim() == 4 else total[..., None].expand(b, H, N)
            w = after.exp()
            if log_a.dim() == 4:  # diagonal: w [b, T, H, N] weighs B, per head
                x = x if scale is None else x * scale.unsqueeze(-1).to(x.dtype)
                left = (_to_heads(B, H).to(dtype) * w).to(low)
            else:  # scalar: w [b, T, H] joins the value's scale, B stays grouped
                scale = w if scale is None else scale * w
                x = x * scale.unsqueeze(-1).to(x.dtype)
                left = B.to(low)
        G = left.shape[2]  # the matmul's groups: key groups, or heads (diagonal)
        state = _state_matmul(left, x.to(low).reshape(b, T, G, H // G * P))  # [b, G, N, k·P]
        state = state.unflatten(-1, (H // G, P)).transpose(2, 3).reshape(b, H, N, P)
        return state, total


def _log_a(
    checked: CheckedSpec,
    env: Mapping[str, Any],
    dims: Mapping[str, int],
    shape: tuple[int, int, int, int],
    dtype: torch.dtype,
) -> Tensor | None:
    """log a per head: [b, T, H] (scalar, constant), [b, T, H, N] (diagonal), None (causal)."""
    spec, heads = checked.spec, checked.heads
    b, T, H, N = shape
    count = heads.decay
    G = 1 if count is None else size_of(count, dims)
    head, n_axis = _axis(count, "head"), _axis(checked.state_size, "N")
    match spec.mask:
        case ir.ConstDecay(log_gamma=e):
            per_head = evaluate(e, env, dims, (head,)).expand(G).to(dtype)
            return _to_heads(per_head[None, None, :].expand(b, T, G), H)
        case ir.ScalarSemiseparable(log_a=e):
            value = evaluate(e, env, dims, (BATCH, SEQ, head)).expand(b, T, G)
            return _to_heads(value.to(dtype), H)
        case ir.DiagonalSemiseparable(log_a=e):
            value = evaluate(e, env, dims, (BATCH, SEQ, head, n_axis)).expand(b, T, G, N)
            return _to_heads(value.to(dtype), H)
        case _:  # causal: no decay
            return None


def _suffix_sums(log_a: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ_{s>t} log a_s per token, Σ_t log a_t) of log a [b, T, ...], sequence axis 1.

    A reversed cumulative sum, never a difference of two long prefixes (which would cancel
    in fp32). The sum runs along the innermost axis: torch's CUDA scan along an outer axis
    walks each column serially (ms at T = 16 384, pytorch/pytorch#122170).
    """
    inner = log_a.movedim(1, -1).flip(-1).contiguous()  # [b, ..., T], last token first
    inclusive = inner.cumsum(-1).flip(-1)  # Σ_{s≥t}
    after = torch.cat([inclusive[..., 1:], torch.zeros_like(inclusive[..., :1])], dim=-1)
    return after.movedim(-1, 1), inclusive[..., 0]


def _matmul_dtype(x: Tensor, B: Tensor, dtype: torch.dtype) -> torch.dtype:
    """The operand dtype of the state matmul: 16-bit when the inputs are (as the op's dots)."""
    for t in (x, B):
        if t.dtype in _HALF:
            return t.dtype
    return dtype


def _to_heads(t: Tensor, H: int) -> Tensor:
    """[b, T, G, ...] → [b, T, H, ...]: head h reads group h // (H / G)."""
    G = t.shape[2]
    return t if G == H else t.repeat_interleave(H // G, dim=2)


def _state_matmul(left: Tensor, right: Tensor) -> Tensor:
    """[b, g, N, M] = Σ_t left[b, t, g, N] ⊗ right[b, t, g, M], accumulated and returned
    in fp32 (fp64 for fp64 operands) even for 16-bit operands."""
    return _StateMatmul.apply(left, right)


class _StateMatmul(torch.autograd.Function):
    """The sequence-contracting matmul with a full-precision result (a 16-bit result would
    round the exchanged state); backward: two matmuls in the operands' dtype."""

    @staticmethod
    def forward(ctx: Any, left: Tensor, right: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(left, right)
        return _contract_t(left, right)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        left, right = ctx.saved_tensors
        g = grad.to(left.dtype)
        d_left = torch.einsum("bgnm,btgm->btgn", g, right)
        d_right = torch.einsum("bgnm,btgn->btgm", g, left)
        return d_left, d_right


_OUT_DTYPE_MM = {"works": True}
"""False once torch.bmm refused out_dtype here (16-bit operands are upcast from then on)."""


def _contract_t(left: Tensor, right: Tensor) -> Tensor:
    """Σ_t left ⊗ right in full precision; on CUDA, 16-bit operands use bmm with an fp32
    result (the tensor cores accumulate in fp32 either way); elsewhere they are upcast."""
    if left.dtype not in _HALF:
        return torch.einsum("btgn,btgm->bgnm", left, right)
    if left.is_cuda and _OUT_DTYPE_MM["works"]:
        try:
            return torch.stack(
                [
                    torch.bmm(
                        a.permute(1, 2, 0).contiguous(),  # [g, N, T]: the small operand
                        c.transpose(0, 1),
                        out_dtype=torch.float32,
                    )
                    for a, c in zip(left, right, strict=True)
                ]
            )
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without mm.dtype
            _OUT_DTYPE_MM["works"] = False
    return torch.einsum("btgn,btgm->bgnm", left.float(), right.float())


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
