"""Spec text for the compatibility shims, and the ops loaded from it (one per configuration).

Every spec is rendered from a frozen configuration holding only validated integers and
flags: no string a caller passes ever reaches the text. Float arguments (a scale, a Δ
limit) are not printed either; the spec declares them as `[1]` parameters and the shim
passes them as tensors, so one compiled op serves every value.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ssmc.errors import SsmcError

if TYPE_CHECKING:
    from ssmc.ops import SsmcOp

MAX_DIM = 1 << 24
"""The largest size a `dim` may take (docs/language.md, Limits)."""

_OPS: dict[MambaSpec | LinearAttentionSpec, SsmcOp] = {}


class CompatError(SsmcError, ValueError):
    """A call a shim cannot serve: a wrong shape, or an option ssmc does not support."""


def size(name: str, value: object) -> int:
    """`value` as a dim size (a Python int in 1 … 2²⁴); CompatError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DIM:
        raise CompatError(f"{name} must be an integer in 1 … {MAX_DIM}, got {value!r}")
    return value


def op_for(spec: MambaSpec | LinearAttentionSpec) -> SsmcOp:
    """The op of a configuration: rendered and loaded on first use, then kept for the process.

    Keyed by the configuration itself, so a call that hits the cache renders no text.
    """
    op = _OPS.get(spec)
    if op is None:
        from ssmc.load import load

        op = _OPS[spec] = load(spec.text())
    return op


def call(
    op: SsmcOp,
    tensors: Mapping[str, Tensor],
    *,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    form: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    """`op` on the spec's tensors by name: (y, final state or None)."""
    named: dict[str, Any] = dict(tensors)
    return op(initial_state=initial_state, cu_seqlens=cu_seqlens, form=form, **named)


def state_dtype(op: SsmcOp, x: Tensor) -> torch.dtype:
    """The dtype a state is handed to `op` in: fp64 only where the fp64 reference runs it.

    Generated kernels take fp32 states; the PyTorch reference (CPU tensors without
    TRITON_INTERPRET=1) keeps fp64 inputs in fp64 end to end.
    """
    on_reference = x.device.type == "cpu" and not op.interpreted
    return torch.float64 if on_reference and x.dtype == torch.float64 else torch.float32


def scalar(value: float, like: Tensor) -> Tensor:
    """A `[1]` parameter holding `value`, in fp32 (fp64 for fp64 inputs) on `like`'s device."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    return torch.full((1,), float(value), dtype=dtype, device=like.device)


def _flags(initial_state: bool, final_state: bool, varlen: bool) -> list[str]:
    return [
        name
        for name, on in (
            ("initial_state", initial_state),
            ("final_state", final_state),
            ("varlen", varlen),
        )
        if on
    ]


@dataclass(frozen=True, slots=True, kw_only=True)
class MambaSpec:
    """Mamba-2's SSD layer as mamba_ssm computes it, or its per-channel (untied) variant.

    Scalar (`diagonal=False`): H heads of P channels, one decay Δ_t·A_h per head, B and C
    in G groups: `x [b, T, H, P]`, `dt [b, T, H]`, `A [H]`, `D [H]` or `[H, P]`.
    Diagonal (`diagonal=True`): every channel is its own head with P = 1 and its own
    decay per state dim (mamba_ssm's untied `selective_state_update`, Mamba-1): H counts
    channels, `x [b, T, H, 1]`, `dt [b, T, H]`, `A [H, N]`, `D [H]`.
    Δ = dt (+ dt_bias), then softplus, then clamp(Δ, dt_min, dt_max) when `limit`.
    """

    H: int
    G: int
    N: int
    P: int
    diagonal: bool = False
    D: int = 0
    """0: no skip; 1: `D [H]`; 2: `D [H, P]` (scalar form only)."""
    z: bool = False
    dt_bias: bool = False
    softplus: bool = False
    limit: bool = False
    initial_state: bool = False
    final_state: bool = False
    varlen: bool = False

    def text(self) -> str:
        """The spec, from the validated sizes and flags only."""
        H, G, N, P = (
            size(n, v) for n, v in (("H", self.H), ("G", self.G), ("N", self.N), ("P", self.P))
        )
        if H % G:
            raise CompatError(f"ngroups = {G} does not divide nheads = {H}")
        if self.D not in (0, 1, 2) or (self.diagonal and (P != 1 or self.D == 2)):
            raise CompatError("internal: inconsistent MambaSpec")
        head = "1" if self.diagonal else "P"
        dims = f"dim H = {H}, G = {G}, N = {N}" + ("" if self.diagonal else f", P = {P}")
        lines = [
            "ssm mamba_selective" if self.diagonal else "ssm mamba_ssd",
            dims,
            f"input x : [batch, seq, H, {head}]",
            "input dt : [batch, seq, H]",
            "input B : [batch, seq, G, N]",
            "input C : [batch, seq, G, N]",
            "param A : [H, N]" if self.diagonal else "param A : [H]",
        ]
        if self.dt_bias:
            lines.append("param dt_bias : [H]")
        if self.limit:
            lines += ["param dt_min : [1]", "param dt_max : [1]"]
        if self.D:
            lines.append("param D : [H, P]" if self.D == 2 else "param D : [H]")
        if self.z:
            lines.append(f"input z : [batch, seq, H, {head}]")
        delta = "dt + dt_bias" if self.dt_bias else "dt"
        if self.softplus:
            delta = f"softplus({delta})"
        if self.limit:
            delta = f"clamp({delta}, dt_min, dt_max)"
        mask = "diagonal" if self.diagonal else "semiseparable"
        lines += [
            f"output y : [batch, seq, H, {head}]",
            f"let delta = {delta}",
            f"mask {mask}(log_a = delta * A)",
            "query C",
            "key B",
            "value x * delta",
        ]
        if self.D:
            lines.append("skip D * x")
        if self.z:
            lines.append("gate silu(z)")
        lines += _flags(self.initial_state, self.final_state, self.varlen)
        return "\n".join(lines) + "\n"


class Decay(enum.Enum):
    """The decay of a linear-attention layer (FLA's names in the comments)."""

    NONE = "none"
    """causal linear attention (`chunk_linear_attn`, simple GLA without g)"""
    SCALAR = "scalar"
    """log a_t = g_t per head (`g [B, T, H]`)"""
    CONST = "const"
    """log a = γ_h per head (`g_gamma [H]`)"""
    SCALAR_CONST = "scalar_const"
    """log a_t = g_t + γ_h (both given)"""
    DIAGONAL = "diagonal"
    """log a_t = g_t per head and key dim (`chunk_gla`, `g [B, T, H, K]`)"""


@dataclass(frozen=True, slots=True, kw_only=True)
class LinearAttentionSpec:
    """o_t = (scale·q_t)ᵀ S_t, S_t = a_t ⊙ S_{t-1} + k_t v_tᵀ: FLA's layers, state [K, V].

    K is the state size N and V the head dim P. With `scale` the scale is a `[1]`
    parameter; without it the query is divided by sqrt(K) (FLA's default).
    """

    H: int
    K: int
    V: int
    decay: Decay
    scale: bool = False
    initial_state: bool = False
    final_state: bool = False
    varlen: bool = False

    def text(self) -> str:
        """The spec, from the validated sizes and flags only."""
        H, K, V = (size(n, v) for n, v in (("H", self.H), ("K", self.K), ("V", self.V)))
        lines = [
            "ssm linear_attention_" + self.decay.value,
            f"dim H = {H}, N = {K}, P = {V}",
            "input q : [batch, seq, H, N]",
            "input k : [batch, seq, H, N]",
            "input v : [batch, seq, H, P]",
        ]
        if self.decay in (Decay.SCALAR, Decay.SCALAR_CONST):
            lines.append("input g : [batch, seq, H]")
        if self.decay is Decay.DIAGONAL:
            lines.append("input g : [batch, seq, H, N]")
        if self.decay in (Decay.CONST, Decay.SCALAR_CONST):
            lines.append("param g_gamma : [H]")
        if self.scale:
            lines.append("param scale : [1]")
        mask = {
            Decay.NONE: "causal",
            Decay.SCALAR: "semiseparable(log_a = g)",
            Decay.CONST: "const_decay(log_gamma = g_gamma)",
            Decay.SCALAR_CONST: "semiseparable(log_a = g + g_gamma)",
            Decay.DIAGONAL: "diagonal(log_a = g)",
        }[self.decay]
        lines += [
            "output o : [batch, seq, H, P]",
            f"mask {mask}",
            "query q * scale" if self.scale else "query q / sqrt(N)",
            "key k",
            "value v",
        ]
        lines += _flags(self.initial_state, self.final_state, self.varlen)
        return "\n".join(lines) + "\n"


def expect(name: str, t: object, shape: tuple[int, ...]) -> Tensor:
    """`t` itself when it is a tensor of `shape`; CompatError naming it otherwise."""
    if not isinstance(t, Tensor):
        raise CompatError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != shape:
        raise CompatError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
    return t


def rank(name: str, t: object, n: int, layout: str) -> tuple[int, ...]:
    """The shape of `t` when it is a tensor with `n` axes (`layout` names them)."""
    if not isinstance(t, Tensor):
        raise CompatError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != n:
        raise CompatError(f"{name}: expected {n} axes {layout}, got shape {tuple(t.shape)}")
    return tuple(t.shape)
