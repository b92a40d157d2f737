"""The PyTorch reference of a checked spec: bind, evaluate the roles, run a core form.

`reference(checked)` returns a callable taking every declared tensor by keyword and
returning (y, final_state | None), computed in the dtype the inputs give (fp64 in
tests): the oracle every generated kernel is compared with. `random_inputs` draws
inputs for a spec whose decays land in a realistic range.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from ssmc import forms_torch, ir
from ssmc.bind import bind, size_of
from ssmc.expr import BinOp, Call, Expr, Func, Neg, Op, Ref, refs
from ssmc.expr_torch import evaluate, evaluate_named, squeeze_literals
from ssmc.ir import BATCH, SEQ, CheckedSpec, Form
from ssmc.lti import lti_kernel
from ssmc.roles import output_inputs

Reference = Callable[..., tuple[Tensor, Tensor | None]]

_SMA: dict[Form, Callable[..., tuple[Tensor, Tensor]]] = {
    Form.RECURRENT: forms_torch.recurrent,
    Form.QUADRATIC: forms_torch.quadratic,
    Form.CHUNKED: forms_torch.chunked,
}
_TOEPLITZ: dict[Form, Callable[..., Tensor]] = {
    Form.QUADRATIC: forms_torch.toeplitz_quadratic,
    Form.CONVOLUTION: forms_torch.toeplitz_convolution,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Roles:
    """The canonical core's tensors for one call (docs/semantics.md, "Canonical core").

    x [b, T, Gv, P]; log_a [b, T, Gd] | [b, T, Gd, N] | None; B [b, T, Gk, N] and
    C [b, T, Gq, N] (None for Toeplitz); kernel [Gd, L] (Toeplitz only); skip and gate
    broadcastable to y [b, T, H, P] (None when absent); H the output head count.
    """

    x: Tensor
    log_a: Tensor | None
    B: Tensor | None
    C: Tensor | None
    kernel: Tensor | None
    skip: Tensor | None
    gate: Tensor | None
    H: int


def reference(
    checked: CheckedSpec, form: Form | str | None = None, *, chunk_size: int = 64
) -> Reference:
    """A callable computing the spec in `form` (default chunked where allowed, else quadratic)."""
    if checked.pieces:  # a composite mask (mask algebra): ssmc.algebra_reference
        from ssmc import algebra_reference

        return algebra_reference.reference(checked, form, chunk_size)
    chosen = choose_form(checked, form)

    def run(
        *, initial_state: Tensor | None = None, cu_seqlens: Tensor | None = None, **tensors: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        dims = bind(checked, tensors, initial_state=initial_state, cu_seqlens=cu_seqlens)
        roles = canonical_roles(checked, tensors, dims)
        if roles.kernel is not None:
            y, state = _TOEPLITZ[chosen](roles.x, roles.kernel, roles.H, cu_seqlens), None
        else:
            assert roles.B is not None and roles.C is not None
            options = {"chunk_size": chunk_size} if chosen is Form.CHUNKED else {}
            y, state = _SMA[chosen](
                roles.x,
                roles.log_a,
                roles.B,
                roles.C,
                roles.H,
                initial_state,
                cu_seqlens,
                **options,
            )
        if roles.skip is not None:
            y = y + roles.skip
        if roles.gate is not None:
            y = y * roles.gate
        return y.to(_output_dtype(checked, tensors)), state if checked.spec.final_state else None

    return run


def choose_form(checked: CheckedSpec, form: Form | str | None) -> Form:
    """The requested form, or the default; ValueError naming the allowed forms otherwise."""
    allowed = ", ".join(f.value for f in checked.forms)
    if form is None:
        return Form.CHUNKED if Form.CHUNKED in checked.forms else Form.QUADRATIC
    try:
        chosen = Form(form)
    except ValueError:
        raise ValueError(f"unknown form {form!r}; {checked.spec.name} allows {allowed}") from None
    if chosen not in checked.forms:
        raise ValueError(
            f"form {chosen.value} is not allowed for {checked.spec.name}; it allows {allowed}"
        )
    return chosen


def _output_dtype(checked: CheckedSpec, tensors: Mapping[str, Tensor]) -> torch.dtype:
    """The promoted dtype of the per-token inputs carrying y's feature axis (what the op
    returns; ssmc.roles.output_inputs)."""
    spec = checked.spec
    inputs = [tensors[spec.tensors[i].name].dtype for i in output_inputs(spec)]
    return functools.reduce(torch.promote_types, inputs)


def _axis(size: ir.Size | None, role: str) -> str:
    """The axis name of a size: a dim's name, or a private name for a literal (size 1)."""
    return size if isinstance(size, str) else f"1.{role}"


def canonical_roles(
    checked: CheckedSpec, tensors: Mapping[str, Tensor], dims: Mapping[str, int]
) -> Roles:
    """Evaluate every role expression into the canonical core's tensors (after `bind`)."""
    spec, heads = checked.spec, checked.heads
    env = {t.name: squeeze_literals(t, tensors[t.name]) for t in spec.tensors}
    b, T, H = dims[BATCH], dims[SEQ], size_of(heads.output, dims)
    P_axis, N_axis = _axis(checked.head_dim, "P"), _axis(checked.state_size, "N")
    P = size_of(checked.head_dim, dims)

    def role(expr: Expr, count: ir.Size | None, *rest: tuple[str, int]) -> Tensor:
        G = 1 if count is None else size_of(count, dims)
        axes = (BATCH, SEQ, _axis(count, "head"), *(a for a, _ in rest))
        return evaluate(expr, env, dims, axes).expand(b, T, G, *(n for _, n in rest))

    x = role(spec.value, heads.value, (P_axis, P))
    y_axes = (BATCH, SEQ, _axis(heads.output, "head"), P_axis)
    skip, gate = (
        None if e is None else evaluate(e, env, dims, y_axes) for e in (spec.skip, spec.gate)
    )
    mask = spec.mask
    if isinstance(mask, ir.Toeplitz):
        kernel = _kernel(checked, mask, env, dims, T)
        return Roles(x=x, log_a=None, B=None, C=None, kernel=kernel, skip=skip, gate=gate, H=H)
    assert spec.query is not None and spec.key is not None
    N = size_of(checked.state_size, dims) if checked.state_size is not None else 1
    C = role(spec.query, heads.query, (N_axis, N))
    B = role(spec.key, heads.key, (N_axis, N))
    log_a: Tensor | None = None
    match mask:
        case ir.ConstDecay(log_gamma=e):
            Gd = size_of(heads.decay, dims) if heads.decay is not None else 1
            log_a = evaluate(e, env, dims, (_axis(heads.decay, "head"),)).expand(b, T, Gd)
        case ir.ScalarSemiseparable(log_a=e):
            log_a = role(e, heads.decay)
        case ir.DiagonalSemiseparable(log_a=e):
            log_a = role(e, heads.decay, (N_axis, N))
    return Roles(x=x, log_a=log_a, B=B, C=C, kernel=None, skip=skip, gate=gate, H=H)


def _kernel(
    checked: CheckedSpec,
    mask: ir.Toeplitz,
    env: Mapping[str, tuple[Tensor, tuple[str, ...]]],
    dims: Mapping[str, int],
    T: int,
) -> Tensor:
    """The Toeplitz kernel [Gd, L]: learned, or K_k = C Ā^k B̄ for k < T."""
    count = checked.heads.decay
    head = _axis(count, "head")
    Gd = 1 if count is None else size_of(count, dims)
    k = mask.kernel
    if isinstance(k, ir.LearnedKernel):
        _, axes = evaluate_named(k.kernel, env, dims)
        lag = [a for a in axes if a != head]
        L = dims[lag[0]] if lag else 1
        out = (head, lag[0] if lag else "1.L")
        return evaluate(k.kernel, env, dims, out).expand(Gd, L)
    N_axis = _axis(checked.state_size, "N")
    N = size_of(checked.state_size, dims) if checked.state_size is not None else 1

    def part(expr: Expr | None, *rest: str) -> Tensor | None:
        if expr is None:
            return None
        value = evaluate(expr, env, dims, (head, *rest))
        return value.expand(Gd, *(N for _ in rest))

    C, dt = part(k.C, N_axis), part(k.dt)
    assert C is not None and dt is not None
    A, B = part(k.A, N_axis), part(k.B, N_axis)
    return lti_kernel(A, B, C, dt, k.hippo, k.discretization, T)


Interval = tuple[float, float] | None
"""A range a sub-expression's value should fall in (None: anything, standard normal)."""

LOG_DECAY: tuple[float, float] = (-1.0, -0.01)
LOG_GAMMA: tuple[float, float] = (math.log(0.8), math.log(0.99))
LTI_DT: tuple[float, float] = (0.001, 0.1)
LTI_A: tuple[float, float] = (-4.0, -0.5)
FACTOR: tuple[float, float] = (0.5, 4.0)
"""Magnitude of a parameter-only factor of a product (Mamba's A in Δ·A)."""


def random_inputs(
    checked: CheckedSpec,
    *,
    batch: int,
    seqlen: int,
    dims: Mapping[str, int] | None = None,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Random tensors for every declaration (and `initial_state` when the spec takes one).

    Decay expressions are drawn so their value lands in a realistic range: log a in
    [-1, -0.01] (semiseparable, diagonal), log γ in [log 0.8, log 0.99] (const_decay),
    LTI dt in [0.001, 0.1] and diagonal A in [-4, -0.5]. The range is pushed down the
    expression by inverting its monotone pieces (exp, log, softplus, sigmoid, ...);
    in a product, a factor read only from params gets magnitude [0.5, 4] and the sign,
    the other the rest (Δ·A: A in [-4, -0.5]); a sum splits the range evenly. Each
    tensor takes the first range that reaches it; every other tensor, and any tensor
    where the range cannot be inverted, is standard normal. `dims` sizes the dims the
    spec leaves open. The state is fp32, or fp64 when `dtype` is fp64.
    """
    spec = checked.spec
    sizes = _sizes(spec, batch, seqlen, dims or {})
    params = frozenset(t.name for t in spec.tensors if t.kind is ir.TensorKind.PARAM)
    ranges = _Ranges(params, sizes, {})
    for expr, target in _decay_targets(spec.mask):
        ranges.push(expr, target)
    out = {}
    for t in spec.tensors:
        shape = tuple(size_of(s, sizes) for s in t.shape)
        out[t.name] = _draw(shape, ranges.found.get(t.name), dtype, generator).to(device)
    if spec.initial_state and checked.state_size is not None:
        sdtype = torch.float64 if dtype == torch.float64 else torch.float32
        state_dims = (checked.heads.output, checked.state_size, checked.head_dim)
        shape = (batch, *(size_of(s, sizes) for s in state_dims))
        if checked.pieces:  # a sum of masks: the terms' states stacked along N
            shape = (batch, shape[1], shape[2] * len(checked.pieces), shape[3])
        out["initial_state"] = _draw(shape, None, sdtype, generator).to(device)
    return out


def _sizes(spec: ir.Spec, batch: int, seqlen: int, given: Mapping[str, int]) -> dict[str, int]:
    """Every dim's size: the spec's value, else `given`; ValueError for missing or conflicting."""
    sizes = {BATCH: batch, SEQ: seqlen}
    missing, conflicts = [], []
    for d in spec.dims:
        if d.value is not None:
            if d.name in given and given[d.name] != d.value:
                conflicts.append(f"{d.name}={given[d.name]} (the spec says {d.value})")
            sizes[d.name] = d.value
        elif d.name in given:
            sizes[d.name] = given[d.name]
        else:
            missing.append(d.name)
    if missing or conflicts:
        raise ValueError(
            f"{spec.name}: dims needed: {', '.join(missing) or 'none'}; "
            f"conflicting: {', '.join(conflicts) or 'none'}"
        )
    return sizes


def decay_inputs(spec: ir.Spec) -> frozenset[str]:
    """Names of the tensors the mask's decay expressions read (kept fp32 under 16-bit runs)."""
    return frozenset().union(*(refs(e) for e, _ in _decay_targets(spec.mask)))


def _decay_targets(mask: ir.MaskExpr) -> list[tuple[Expr, tuple[float, float]]]:
    """Each decay expression of a mask with the range its value should take."""
    match mask:
        case ir.MaskSum() | ir.MaskProduct() | ir.Quasiseparable():  # mask algebra
            from ssmc.algebra import atoms

            return [t for m in atoms(mask) for t in _decay_targets(m)]
        case ir.Toeplitz(kernel=ir.LearnedKernel(log_decay=g)) if g is not None:
            return [(g, LOG_GAMMA)]
        case ir.ConstDecay(log_gamma=e):
            return [(e, LOG_GAMMA)]
        case ir.ScalarSemiseparable(log_a=e) | ir.DiagonalSemiseparable(log_a=e):
            return [(e, LOG_DECAY)]
        case ir.Toeplitz(kernel=ir.LtiKernel(A=A, dt=dt)):
            return [(dt, LTI_DT)] + ([(A, LTI_A)] if A is not None else [])
    return []


def _draw(
    shape: tuple[int, ...],
    interval: Interval,
    dtype: torch.dtype,
    generator: torch.Generator | None,
) -> Tensor:
    if interval is None:
        return torch.randn(shape, dtype=dtype, generator=generator)
    lo, hi = interval
    return lo + (hi - lo) * torch.rand(shape, dtype=dtype, generator=generator)


def _constant(expr: Expr, sizes: Mapping[str, int]) -> float | None:
    """The value of an expression that reads no tensor (numbers and dims), else None."""
    if any(name not in sizes for name in refs(expr)):
        return None
    value, _ = evaluate_named(expr, {}, sizes)
    return float(value)


@dataclass(frozen=True, slots=True)
class _Ranges:
    """Pushes target ranges down expressions into `found`, one range per tensor."""

    params: frozenset[str]
    sizes: Mapping[str, int]
    found: dict[str, Interval]

    def push(self, expr: Expr, target: Interval) -> None:
        """Give each tensor `expr` reads a range so that `expr` lands in `target`."""
        if target is not None and not target[0] < target[1]:
            target = None
        match expr:
            case Ref(name=name) if name not in self.sizes:
                self.found.setdefault(name, target)
            case Neg(operand=e):
                self.push(e, _scaled(target, -1.0))
            case BinOp(op=Op.ADD | Op.SUB as op, lhs=lhs, rhs=rhs):
                self._sum(lhs, rhs, target, 1.0 if op is Op.ADD else -1.0)
            case BinOp(op=Op.MUL | Op.DIV as op, lhs=lhs, rhs=rhs):
                self._product(lhs, rhs, target, op is Op.DIV)
            case Call(func=Func.CLAMP, args=(e, _, _)):
                self.push(e, target)
            case Call(func=Func.MIN | Func.MAX, args=args):
                for e in args:
                    self.push(e, target)
            case Call(func=func, args=(e,)):
                self.push(e, _inverse(func, target))
            case BinOp(lhs=lhs, rhs=rhs):
                self.push(lhs, None)
                self.push(rhs, None)
            case Call(args=args):
                for e in args:
                    self.push(e, None)

    def _sum(self, lhs: Expr, rhs: Expr, target: Interval, sign: float) -> None:
        """lhs + sign·rhs in target: a constant shifts the range, else each takes half."""
        c_lhs, c_rhs = _constant(lhs, self.sizes), _constant(rhs, self.sizes)
        if target is None:
            self.push(lhs, None)
            self.push(rhs, None)
        elif c_lhs is not None:
            self.push(rhs, _scaled((target[0] - c_lhs, target[1] - c_lhs), sign))
        elif c_rhs is not None:
            self.push(lhs, (target[0] - sign * c_rhs, target[1] - sign * c_rhs))
        else:
            half = _scaled(target, 0.5)
            self.push(lhs, half)
            self.push(rhs, _scaled(half, sign))

    def _product(self, lhs: Expr, rhs: Expr, target: Interval, divide: bool) -> None:
        """lhs · rhs (or lhs / rhs) in target: divide out constants, else split (see below)."""
        c_lhs, c_rhs = _constant(lhs, self.sizes), _constant(rhs, self.sizes)
        if target is None or 0 in (c_lhs, c_rhs) or target[0] <= 0 <= target[1]:
            self.push(lhs, None)
            self.push(rhs, None)
        elif c_rhs is not None:
            self.push(lhs, _scaled(target, c_rhs if divide else 1 / c_rhs))
        elif c_lhs is not None:
            inverse = (1 / target[1], 1 / target[0]) if divide else target
            self.push(rhs, _scaled(inverse, c_lhs if divide else 1 / c_lhs))
        elif divide:
            self.push(lhs, target)
            self.push(rhs, (0.9, 1.1))
        else:
            for e, t in zip((lhs, rhs), self._split(target, lhs, rhs), strict=True):
                self.push(e, t)

    def _split(
        self, target: tuple[float, float], lhs: Expr, rhs: Expr
    ) -> tuple[Interval, Interval]:
        """Ranges with lhs·rhs in target (one sign): the params-only factor gets ±FACTOR."""
        sign = 1.0 if target[0] > 0 else -1.0
        m_lo, m_hi = sorted((abs(target[0]), abs(target[1])))
        rest = (m_lo / FACTOR[0], m_hi / FACTOR[1])
        factor = FACTOR
        if not rest[0] < rest[1]:
            rest = factor = (math.sqrt(m_lo), math.sqrt(m_hi))
        signed = _scaled(factor, sign)
        lhs_params, rhs_params = (bool(refs(e)) and refs(e) <= self.params for e in (lhs, rhs))
        return (signed, rest) if lhs_params and not rhs_params else (rest, signed)


def _scaled(interval: Interval, factor: float) -> Interval:
    """The interval times a factor (None stays None)."""
    if interval is None:
        return None
    a, b = interval[0] * factor, interval[1] * factor
    return (min(a, b), max(a, b))


def _inverse(func: Func, target: Interval) -> Interval:
    """The range of x giving func(x) in `target`, for the monotone functions; else None."""
    if target is None:
        return None
    lo, hi = target
    match func:
        case Func.EXP if lo > 0:
            return (math.log(lo), math.log(hi))
        case Func.LOG:
            return (math.exp(lo), math.exp(hi))
        case Func.SOFTPLUS if lo > 0:
            return (math.log(math.expm1(lo)), math.log(math.expm1(hi)))
        case Func.SIGMOID if 0 < lo and hi < 1:
            return (math.log(lo / (1 - lo)), math.log(hi / (1 - hi)))
        case Func.LOGSIGMOID if hi < 0:
            return (-math.log(math.expm1(-lo)), -math.log(math.expm1(-hi)))
        case Func.TANH if -1 < lo and hi < 1:
            return (math.atanh(lo), math.atanh(hi))
        case Func.SQRT if lo >= 0:
            return (lo * lo, hi * hi)
        case Func.ABS if lo >= 0:
            return target
    return None
