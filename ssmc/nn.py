"""Sequence-mixing layers built from a spec: `SequenceMixer` (any spec) and `Mamba2Block`.

`SequenceMixer(spec, d_model)` is the layer a researcher drops into a model: one fused
Linear projects u [batch, T, d_model] to every per-token `input` of the spec, a short causal
depthwise conv + SiLU runs on the inputs the query/key/value read (Mamba's conv on x, B, C),
the op mixes along T, a per-group RMSNorm and a Linear take y [batch, T, H, P] back to
d_model. Every `param` is created and initialised from the role it plays (below);
`step` decodes one token from carried (conv, SSM) state. `Mamba2Block` is the layer of
Mamba-2 (Dao & Gu 2024) with its usual constructor, on the SSD spec of examples/mamba2.ssm.

Parameter initialisation, by role (the ranges of `ssmc.reference.random_inputs`, retuned
for training and pushed down each decay expression the same way):
- scalar/diagonal decay `log a`: in [-1.6, -1e-3]; of a product Δ·A the params-only factor
  A gets magnitude uniform(1, 16) (Mamba-2), or S4D-real n + 1 when it has the state axis
  (Mamba-1), and the rest Δ ∈ [1e-3, 0.1], so `dt_bias` = softplus⁻¹(Δ) (its sum partner
  `dt` is a projection, ~0 on average);
- `const_decay`: RetNet's γ_h = 1 − 2^(−5−h), inverted through the expression;
- LTI: A = −(n + 1) (S4D-real), dt ∈ [1e-3, 0.1], B ones;
- `skip` and `gate` params (Mamba's D): ones; anything else: normal, std 1/√(last axis).
A param that is a bare factor of the decay product (A) is stored as its log-magnitude (A_log),
one read bare under `log` (γ) as log(−log γ), so training cannot flip a decay's sign or push
γ past 1. `spec_params()` gives the values the op receives.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssmc import ir
from ssmc.bind import size_of
from ssmc.expr import BinOp, Call, Expr, Func, Neg, Op, Ref, refs
from ssmc.load import as_checked, load
from ssmc.pipeline import with_dims
from ssmc.reference import _constant, _Ranges, _scaled, reference

MAMBA2_SPEC = """\
# Mamba-2 (SSD), as examples/mamba2.ssm; Mamba2Block rebinds the dims.
ssm mamba2

dim H = 80, G = 1, N = 128, P = 64

input x  : [batch, seq, H, P]
input dt : [batch, seq, H]
input B  : [batch, seq, G, N]
input C  : [batch, seq, G, N]
input z  : [batch, seq, H, P]
param A       : [H]
param dt_bias : [H]
param D       : [H]
output y : [batch, seq, H, P]

let delta = clamp(softplus(dt + dt_bias), 0.0, inf)

mask semiseparable(log_a = delta * A)
query C
key   B
value x * delta
skip  D * x
gate  silu(z)

initial_state
final_state
varlen
"""

LOG_DECAY = (-1.6, -1e-3)
"""log a at initialisation: Mamba-2's Δ ∈ [1e-3, 0.1] times A ∈ [-16, -1]."""
DECAY_FACTOR = (1.0, 16.0)
"""Magnitude of the params-only factor of a decay product (Mamba-2's A)."""
LTI_DT = (1e-3, 1e-1)
LOG_GAMMA = (math.log1p(-(2.0**-5)), math.log1p(-(2.0**-12)))
"""log γ of RetNet's heads, γ_h = 1 − 2^(−5−h), h = 0 … 7."""


# ---------------------------------------------------------------- dims


def bind_dims(
    spec: ir.CheckedSpec | str | os.PathLike[str],
    d_model: int,
    *,
    expand: int = 2,
    headdim: int = 64,
    dims: Mapping[str, int] | None = None,
) -> ir.CheckedSpec:
    """The spec with every dim bound: `dims` first (they may rebind the spec's own values),
    then an open output head count H / head dim P from H·P = expand·d_model (P = headdim
    when both are open). ValueError names any dim still open."""
    checked = as_checked(spec)
    values = {d.name: d.value for d in checked.spec.dims} | dict(dims or {})
    H, P = checked.heads.output, checked.head_dim
    d_inner = expand * d_model
    h_open = isinstance(H, str) and values.get(H) is None
    if isinstance(P, str) and values.get(P) is None:
        values[P] = headdim if h_open else d_inner // size_of(H, values)  # type: ignore[arg-type]
    if h_open:
        values[H] = max(1, d_inner // size_of(P, values))  # type: ignore[arg-type,index]
    missing = sorted(n for n, v in values.items() if v is None)
    if missing:
        raise ValueError(
            f"{checked.spec.name}: bind the dims {', '.join(missing)} with dims={{...}}"
        )
    return with_dims(checked, {k: v for k, v in values.items() if v is not None})


# ---------------------------------------------------------------- parameter initialisation


@dataclass(frozen=True, slots=True)
class ParamInit:
    """How one spec param is stored: value = sign·exp(θ) ("log"), exp(−exp(θ)) ("loglog")
    or θ ("plain"); `value` is its initial value."""

    transform: str
    sign: float
    value: Tensor

    def raw(self) -> Tensor:
        """θ, the stored tensor."""
        if self.transform == "log":
            return self.value.abs().log()
        if self.transform == "loglog":
            return (-self.value.log()).log()
        return self.value

    def apply(self, theta: Tensor) -> Tensor:
        """The value the op receives."""
        if self.transform == "log":
            return self.sign * theta.exp()
        if self.transform == "loglog":
            return torch.exp(-theta.exp())
        return theta


class _TrainRanges(_Ranges):
    """reference's range pushing, with Mamba's split: Δ·A → A ∈ ±[1, 16], and in a sum of a
    projected input and a param (dt + dt_bias) the param takes the whole range."""

    def _sum(self, lhs: Expr, rhs: Expr, target: Any, sign: float) -> None:
        lhs_params, rhs_params = (bool(refs(e)) and refs(e) <= self.params for e in (lhs, rhs))
        lhs_input, rhs_input = (not refs(e) <= self.params for e in (lhs, rhs))
        if target is not None and lhs_params and rhs_input:
            self.push(lhs, target)
            self.push(rhs, None)
        elif target is not None and rhs_params and lhs_input:
            self.push(rhs, _scaled(target, sign))
            self.push(lhs, None)
        else:
            super()._sum(lhs, rhs, target, sign)

    def _split(self, target: tuple[float, float], lhs: Expr, rhs: Expr) -> tuple[Any, Any]:
        sign = 1.0 if target[0] > 0 else -1.0
        m_lo, m_hi = sorted((abs(target[0]), abs(target[1])))
        rest = (m_lo / DECAY_FACTOR[0], m_hi / DECAY_FACTOR[1])
        factor = _scaled(DECAY_FACTOR, sign)
        lhs_params, rhs_params = (bool(refs(e)) and refs(e) <= self.params for e in (lhs, rhs))
        return (factor, rest) if lhs_params and not rhs_params else (rest, factor)


_INVERSE: dict[Func, Callable[[Tensor], Tensor]] = {
    Func.EXP: torch.log,
    Func.LOG: torch.exp,
    Func.SOFTPLUS: lambda v: torch.log(torch.expm1(v)),
    Func.SIGMOID: torch.logit,
    Func.LOGSIGMOID: lambda v: -torch.log(torch.expm1(-v)),
    Func.TANH: torch.atanh,
    Func.SQRT: torch.square,
    Func.ABS: lambda v: v,
}


def _invert(expr: Expr, value: Tensor, sizes: Mapping[str, int]) -> Tensor | None:
    """The value of the one tensor `expr` reads that makes `expr` equal `value` (None if the
    expression is not a chain of invertible steps)."""
    match expr:
        case Ref():
            return value
        case Neg(operand=e):
            return _invert(e, -value, sizes)
        case Call(func=func, args=(e,)) if func in _INVERSE:
            return _invert(e, _INVERSE[func](value), sizes)
        case Call(func=Func.CLAMP, args=(e, _, _)):
            return _invert(e, value, sizes)
        case BinOp(op=op, lhs=lhs, rhs=rhs) if op is not Op.POW:
            c_lhs, c_rhs = _constant(lhs, sizes), _constant(rhs, sizes)
            if c_rhs is not None:
                # lhs op c = value
                undo = {
                    Op.ADD: lambda: value - c_rhs,
                    Op.SUB: lambda: value + c_rhs,
                    Op.MUL: lambda: value / c_rhs,
                    Op.DIV: lambda: value * c_rhs,
                }
                return _invert(lhs, undo[op](), sizes)
            if c_lhs is not None:
                # c op rhs = value
                undo = {
                    Op.ADD: lambda: value - c_lhs,
                    Op.SUB: lambda: c_lhs - value,
                    Op.MUL: lambda: value / c_lhs,
                    Op.DIV: lambda: c_lhs / value,
                }
                return _invert(rhs, undo[op](), sizes)
    return None


def _bare(expr: Expr, params: frozenset[str]) -> Iterator[tuple[str, str]]:
    """(param, "factor" | "log") for each param read bare (or negated) as a factor of a
    product or as the argument of `log`."""
    match expr:
        case BinOp(op=Op.MUL | Op.DIV, lhs=lhs, rhs=rhs):
            for side, other in ((lhs, rhs), (rhs, lhs)):
                name = _bare_name(side)
                if name in params and not refs(other) <= params:
                    yield name, "factor"
        case Call(func=Func.LOG, args=(arg,)) if _bare_name(arg) in params:
            yield _bare_name(arg), "log"  # type: ignore[misc]
    for child in _children(expr):
        yield from _bare(child, params)


def _bare_name(expr: Expr) -> str | None:
    if isinstance(expr, Neg):
        expr = expr.operand
    return expr.name if isinstance(expr, Ref) else None


def _children(expr: Expr) -> tuple[Expr, ...]:
    match expr:
        case Neg(operand=e):
            return (e,)
        case BinOp(lhs=lhs, rhs=rhs):
            return (lhs, rhs)
        case Call(args=args):
            return args
    return ()


def param_inits(
    checked: ir.CheckedSpec, generator: torch.Generator | None = None
) -> dict[str, ParamInit]:
    """Initial value and storage of every param of a spec with all dims bound."""
    spec = checked.spec
    sizes = {d.name: d.value for d in spec.dims}
    if any(v is None for v in sizes.values()):
        raise ValueError(f"{spec.name}: bind every dim before initialising params")
    decl = {t.name: t for t in spec.tensors if t.kind is ir.TensorKind.PARAM}
    shapes = {n: tuple(size_of(s, sizes) for s in t.shape) for n, t in decl.items()}  # type: ignore[arg-type]
    values, contexts = _decay_values(checked, decl, shapes, generator)
    epilogue = frozenset().union(*(refs(e) for e in (spec.skip, spec.gate) if e is not None))
    inits = {}
    for name in decl:
        value = values.get(name)
        if value is None and name in epilogue:
            value = torch.ones(shapes[name], dtype=torch.float64)
        if value is None:
            std = 1.0 / math.sqrt(shapes[name][-1])
            value = std * torch.randn(shapes[name], dtype=torch.float64, generator=generator)
        transform, sign = "plain", 1.0
        if contexts.get(name) == "factor" and ((value > 0).all() or (value < 0).all()):
            transform, sign = "log", float(value.flatten()[0].sign())
        elif contexts.get(name) == "log" and ((value > 0) & (value < 1)).all():
            transform = "loglog"
        inits[name] = ParamInit(transform, sign, value.float())
    return inits


def _decay_values(
    checked: ir.CheckedSpec,
    decl: Mapping[str, ir.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
    generator: torch.Generator | None,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Initial values of the params the mask reads, and how each is read bare (`_bare`)."""
    sizes = {d.name: d.value for d in checked.spec.dims}
    params = frozenset(decl)
    ranges = _TrainRanges(params, sizes, {})  # type: ignore[arg-type]
    values: dict[str, Tensor] = {}
    contexts: dict[str, str] = {}

    def along(name: str, axis: ir.Size | None, f: Callable[[Tensor], Tensor]) -> Tensor:
        """f(index along `axis`) in the param's shape (index 0 where it lacks the axis)."""
        shape, axes = shapes[name], decl[name].shape
        if axis not in axes:
            return f(torch.zeros(shape, dtype=torch.float64))
        i = axes.index(axis)
        idx = torch.arange(shape[i], dtype=torch.float64)
        return f(idx.view(-1, *([1] * (len(shape) - i - 1)))).expand(shape).clone()

    def solve(expr: Expr, target: Callable[[str], Tensor]) -> None:
        """Give the one param of `expr` the value that makes `expr` equal target(param)."""
        leaves = refs(expr) & params
        if len(leaves) == 1 and not refs(expr) - params - set(sizes):
            (leaf,) = leaves
            found = _invert(expr, target(leaf), sizes)  # type: ignore[arg-type]
            if found is not None and torch.isfinite(found).all():
                values[leaf] = found

    match checked.spec.mask:
        case ir.ConstDecay(log_gamma=e):
            contexts.update(_bare(e, params))
            solve(
                e,
                lambda p: along(p, checked.heads.decay, lambda h: torch.log1p(-(2.0 ** (-5 - h)))),
            )
            ranges.push(e, LOG_GAMMA)  # when not invertible
        case ir.ScalarSemiseparable(log_a=e) | ir.DiagonalSemiseparable(log_a=e):
            contexts.update(_bare(e, params))
            ranges.push(e, LOG_DECAY)
        case ir.Toeplitz(kernel=ir.LtiKernel(A=A, B=B, dt=dt)):
            ranges.push(dt, LTI_DT)
            if A is not None:
                solve(A, lambda p: along(p, checked.state_size, lambda n: -(n + 1)))
                if _bare_name(A) in params:
                    contexts[_bare_name(A)] = "factor"  # type: ignore[index]
            if B is not None and _bare_name(B) in params:
                values[_bare_name(B)] = torch.ones(shapes[_bare_name(B)], dtype=torch.float64)  # type: ignore[index]
    for name, interval in ranges.found.items():
        if name not in params or name in values or interval is None:
            continue
        lo, hi = interval
        if contexts.get(name) == "factor" and checked.state_size in decl[name].shape:
            # S4D-real magnitudes along the state axis (Mamba-1's A).
            values[name] = math.copysign(1.0, hi) * along(name, checked.state_size, lambda n: n + 1)
        else:
            u = torch.rand(shapes[name], dtype=torch.float64, generator=generator)
            values[name] = lo + (hi - lo) * u
    return values, contexts


# ---------------------------------------------------------------- layers


class RMSNormGroups(nn.Module):
    """RMSNorm over groups of the last axis (Mamba-2's grouped norm), computed in fp32."""

    def __init__(self, dim: int, groups: int = 1, eps: float = 1e-5, **factory: Any) -> None:
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.ones(dim, **factory))

    def forward(self, y: Tensor) -> Tensor:
        dtype = torch.promote_types(y.dtype, torch.float32)
        g = y.to(dtype).unflatten(-1, (self.groups, -1))
        g = g * torch.rsqrt(g.square().mean(-1, keepdim=True) + self.eps)
        return (g.flatten(-2) * self.weight.to(dtype)).to(y.dtype)


class SequenceMixer(nn.Module):
    """u [batch, T, d_model] → [batch, T, d_model] through the op of `spec`.

    spec: path, text or CheckedSpec; dims/expand/headdim bind its dims (`bind_dims`);
    d_conv: kernel of the short causal conv on the query/key/value inputs (0: none);
    norm_groups: groups of the RMSNorm on y (default: one per head; 0: no norm);
    form/chunk_size: passed to the op; use_reference: run `ssmc.reference` (any dtype,
    fp64 included) instead of the compiled op.
    """

    def __init__(
        self,
        spec: ir.CheckedSpec | str | os.PathLike[str],
        d_model: int,
        *,
        expand: int = 2,
        headdim: int = 64,
        dims: Mapping[str, int] | None = None,
        d_conv: int = 4,
        norm_groups: int | None = None,
        bias: bool = False,
        form: str | None = None,
        chunk_size: int | None = None,
        use_reference: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.checked = bind_dims(spec, d_model, expand=expand, headdim=headdim, dims=dims)
        s = self.checked.spec
        self.sizes = {d.name: int(d.value) for d in s.dims if d.value is not None}
        self.d_model, self.form, self.chunk_size = d_model, form, chunk_size
        self.H = size_of(self.checked.heads.output, self.sizes)
        self.P = size_of(self.checked.head_dim, self.sizes)
        self.N = size_of(self.checked.state_size, self.sizes) if self.checked.state_size else 0
        self.use_reference = use_reference
        self.op = None if use_reference else load(self.checked)
        inputs = [t for t in s.tensors if t.kind is ir.TensorKind.INPUT]
        self.input_shapes = {
            t.name: tuple(size_of(x, self.sizes) for x in t.shape[2:]) for t in inputs
        }
        mixed = set().union(*(refs(e) for e in (s.query, s.key, s.value) if e is not None))
        mask_reads = set().union(*(refs(e) for e in _mask_exprs(s.mask)))
        self.conv_names = [t.name for t in inputs if t.name in mixed - mask_reads] if d_conv else []
        widths = [math.prod(self.input_shapes[t.name]) for t in inputs]
        self.in_proj = nn.Linear(d_model, sum(widths), bias=bias, **factory)
        self.widths = dict(zip(self.input_shapes, widths, strict=True))
        conv_dim = sum(self.widths[n] for n in self.conv_names)
        self.d_conv = d_conv if conv_dim else 0
        if self.d_conv:
            self.conv1d = nn.Conv1d(
                conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, **factory
            )
        self.inits = param_inits(self.checked)
        self.params = nn.ParameterDict(
            {n: nn.Parameter(i.raw().to(**factory)) for n, i in self.inits.items()}
        )
        groups = self.H if norm_groups is None else norm_groups
        self.norm = RMSNormGroups(self.H * self.P, groups, **factory) if groups else None
        self.out_proj = nn.Linear(self.H * self.P, d_model, bias=bias, **factory)

    def spec_params(self) -> dict[str, Tensor]:
        """The values the op receives for the spec's params (A from A_log, ...)."""
        return {n: self.inits[n].apply(p) for n, p in self.params.items()}

    def _tensors(self, u: Tensor, conv: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        """Per-token inputs of the spec from u [batch, T, d_model] (conv'd where it applies)."""
        parts = dict(
            zip(self.widths, self.in_proj(u).split(list(self.widths.values()), -1), strict=True)
        )
        if self.conv_names:
            xs = torch.cat([parts[n] for n in self.conv_names], -1)
            xs = F.silu(conv(xs)).split([self.widths[n] for n in self.conv_names], -1)
            parts.update(zip(self.conv_names, xs, strict=True))
        return {
            n: v.unflatten(-1, self.input_shapes[n]) if self.input_shapes[n] else v[..., 0]
            for n, v in parts.items()
        }

    def _run(
        self,
        tensors: dict[str, Any],
        *,
        form: str | None = None,
        chunk_size: int | None = None,
        **options: Tensor,
    ) -> tuple[Tensor, Tensor | None]:
        """The op (or the reference) on the spec's tensors; options: initial_state, cu_seqlens."""
        if self.op is not None:
            return self.op(**tensors, **options, form=form, chunk_size=chunk_size)
        run = reference(self.checked, form, chunk_size=chunk_size or 64)
        return run(**tensors, **options)

    def _out(self, y: Tensor) -> Tensor:
        y = y.flatten(-2)
        return self.out_proj(self.norm(y) if self.norm is not None else y)

    def forward(
        self,
        u: Tensor,
        *,
        initial_state: Tensor | None = None,
        cu_seqlens: Tensor | None = None,
        form: str | None = None,
        chunk_size: int | None = None,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor | None]:
        """[batch, T, d_model] → [batch, T, d_model] (and the final SSM state if asked)."""
        T = u.shape[1]

        def conv(xs: Tensor) -> Tensor:
            if cu_seqlens is None:
                # Back to [batch, T, channels] in memory: the op reads each input's last axis.
                return self.conv1d(xs.transpose(1, 2))[..., :T].transpose(1, 2).contiguous()
            # Packed sequences: the conv restarts at each boundary like the state does.
            bounds = cu_seqlens.tolist()
            return torch.cat(
                [conv_one(xs[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)], 1
            )

        def conv_one(xs: Tensor) -> Tensor:
            return self.conv1d(xs.transpose(1, 2))[..., : xs.shape[1]].transpose(1, 2).contiguous()

        tensors = self._tensors(u, conv) | self.spec_params()
        options = {"initial_state": initial_state, "cu_seqlens": cu_seqlens}
        y, state = self._run(
            tensors,
            form=form or self.form,
            chunk_size=chunk_size or self.chunk_size,
            **{k: v for k, v in options.items() if v is not None},
        )
        out = self._out(y)
        return (out, state) if return_state else out

    def allocate_inference_state(
        self,
        batch: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Zero (conv_state [batch, conv channels, d_conv], ssm_state [batch, H, N, P])."""
        weight = self.in_proj.weight
        device = device or weight.device
        dtype = dtype or weight.dtype
        channels = sum(self.widths[n] for n in self.conv_names)
        conv_state = torch.zeros(batch, channels, self.d_conv, device=device, dtype=dtype)
        # The op's state is fp32; only the reference takes (and keeps) fp64.
        sdtype = torch.float64 if self.use_reference and dtype == torch.float64 else torch.float32
        ssm_state = torch.zeros(batch, self.H, self.N, self.P, device=device, dtype=sdtype)
        return conv_state, ssm_state

    def step(
        self, hidden: Tensor, conv_state: Tensor, ssm_state: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One token: hidden [batch, d_model] → (out [batch, d_model], conv_state, ssm_state).

        Runs the op on T = 1 from the carried state (the decode kernel on CUDA); the states
        returned are new tensors, the ones given are not modified.
        """
        s = self.checked.spec
        if not (s.initial_state and s.final_state):
            raise ValueError(f"{s.name}: step needs a spec with initial_state and final_state")
        new_conv = conv_state

        def conv(xs: Tensor) -> Tensor:
            nonlocal new_conv
            new_conv = torch.cat([conv_state[..., 1:], xs[:, 0, :, None].to(conv_state.dtype)], -1)
            w, bias = self.conv1d.weight[:, 0, :], self.conv1d.bias
            assert bias is not None
            out = (new_conv * w).sum(-1) + bias
            return out[:, None].to(xs.dtype)

        tensors = self._tensors(hidden[:, None], conv) | self.spec_params()
        y, state = self._run(tensors, initial_state=ssm_state)
        assert state is not None
        return self._out(y)[:, 0], new_conv, state


def _mask_exprs(mask: ir.Mask) -> list[Expr]:
    match mask:
        case ir.ConstDecay(log_gamma=e) | ir.ScalarSemiseparable(log_a=e):
            return [e]
        case ir.DiagonalSemiseparable(log_a=e):
            return [e]
        case ir.Toeplitz(kernel=ir.LearnedKernel(kernel=e)):
            return [e]
        case ir.Toeplitz(kernel=ir.LtiKernel(A=A, B=B, C=C, dt=dt)):
            return [e for e in (A, B, C, dt) if e is not None]
    return []


class Mamba2Block(SequenceMixer):
    """The Mamba-2 mixer: in-projection → causal depthwise conv (x, B, C) → SiLU → SSD →
    gated RMSNorm norm(y·silu(z)) over ngroups groups → out-projection.

    H = expand·d_model / headdim heads of P = headdim, state N = d_state, G = ngroups; the
    spec is examples/mamba2.ssm (`MAMBA2_SPEC`), or any spec with its tensors (x, dt, B, C,
    z, A, dt_bias, D) and flags.
    """

    TENSORS = ("x", "dt", "B", "C", "z", "A", "dt_bias", "D")

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 64,
        headdim: int = 64,
        ngroups: int = 1,
        expand: int = 2,
        d_conv: int = 4,
        chunk_size: int | None = None,
        spec: ir.CheckedSpec | str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        checked = as_checked(spec if spec is not None else MAMBA2_SPEC)
        names = {t.name for t in checked.spec.tensors}
        if names != set(self.TENSORS):
            raise ValueError(
                f"Mamba2Block needs a spec with tensors {self.TENSORS}, got {sorted(names)}"
            )
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"expand·d_model = {d_inner} is not a multiple of headdim {headdim}")
        wanted = {"H": d_inner // headdim, "P": headdim, "N": d_state, "G": ngroups}
        declared = {d.name for d in checked.spec.dims}
        dims = {k: v for k, v in wanted.items() if k in declared}
        super().__init__(
            checked,
            d_model,
            dims=dims,
            d_conv=d_conv,
            norm_groups=ngroups,
            chunk_size=chunk_size,
            **kwargs,
        )


__all__ = ["MAMBA2_SPEC", "Mamba2Block", "ParamInit", "SequenceMixer", "bind_dims", "param_inits"]
