"""Initial values of a spec's params, by the role each plays, and how each is stored.

Parameter initialisation, by role (the ranges of `ssmc.reference.random_inputs`, retuned
for training and pushed down each decay expression the same way):
- scalar/diagonal decay `log a`: in [-1.6, -1e-3]; of a product Δ·A the params-only factor
  A gets magnitude uniform(1, 16) (Mamba-2), or S4D-real n + 1 when it has the state axis
  (Mamba-1), and the rest Δ ∈ [1e-3, 0.1], so `dt_bias` = softplus⁻¹(Δ) (its sum partner
  `dt` is a projection, ~0 on average);
- `const_decay`: RetNet's γ_h = 1 − 2^(−5−h), inverted through the expression;
- a composite mask (a sum, a quasiseparable mask, a decayed Toeplitz window): each atom's
  decay as above, as if it were the spec's only mask (`ssmc.algebra.atoms`);
- LTI: A = −(n + 1) (S4D-real), dt ∈ [1e-3, 0.1], B ones;
- `skip` and `gate` params (Mamba's D): ones (`skip_init`); anything else: normal, std 1/√(last axis).
A param that is a bare factor of the decay product (A) is stored as its log-magnitude (A_log),
one read bare under `log` (γ) as log(−log γ), so training cannot flip a decay's sign or push
γ past 1. `spec_params()` gives the values the op receives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ssmc import ir
from ssmc.bind import size_of
from ssmc.expr import BinOp, Call, Expr, Func, Neg, Op, Ref, refs
from ssmc.reference import _constant, _Ranges, _scaled

LOG_DECAY = (-1.6, -1e-3)
"""log a at initialisation: Mamba-2's Δ ∈ [1e-3, 0.1] times A ∈ [-16, -1]."""
DECAY_FACTOR = (1.0, 16.0)
"""Magnitude of the params-only factor of a decay product (Mamba-2's A)."""
LTI_DT = (1e-3, 1e-1)
LOG_GAMMA = (math.log1p(-(2.0**-5)), math.log1p(-(2.0**-12)))
"""log γ of RetNet's heads, γ_h = 1 − 2^(−5−h), h = 0 … 7."""


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
        lhs_params, rhs_params = (bool(refs(e)) and refs(e) <= self.params for e in (lhs, rhs))
        factor_side, rest_side = (lhs, rhs) if lhs_params and not rhs_params else (rhs, lhs)
        # The sign goes to the factor that can carry it: −Δ·exp(A_log) (Mamba-2's A written
        # −exp(A_log)) has the sign on Δ's side, Δ·A on A's.
        f_sign, r_sign = _sign_of(factor_side), _sign_of(rest_side)
        if f_sign is None and r_sign is not None:
            f_sign = sign * r_sign
        f_sign = sign if f_sign is None else f_sign
        factor, rest = _scaled(DECAY_FACTOR, f_sign), _scaled(rest, sign * f_sign)
        return (factor, rest) if factor_side is lhs else (rest, factor)


_POSITIVE = (Func.EXP, Func.SOFTPLUS, Func.SIGMOID, Func.SQRT, Func.ABS)


def _sign_of(expr: Expr) -> float | None:
    """+1 or −1 when an expression's sign is fixed by its form (exp, softplus, … and their
    negations, products and quotients), else None."""
    match expr:
        case Call(func=func) if func in _POSITIVE:
            return 1.0
        case Call(func=Func.CLAMP, args=(e, _, _)):
            return _sign_of(e)
        case Neg(operand=e):
            inner = _sign_of(e)
            return None if inner is None else -inner
        case BinOp(op=Op.MUL | Op.DIV, lhs=lhs, rhs=rhs):
            a, b = _sign_of(lhs), _sign_of(rhs)
            return None if a is None or b is None else a * b
    return None


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
    checked: ir.CheckedSpec, generator: torch.Generator | None = None, *, skip_init: float = 1.0
) -> dict[str, ParamInit]:
    """Initial value and storage of every param of a spec with all dims bound; the skip and
    gate params (Mamba's D) start at `skip_init`."""
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
            value = torch.full(shapes[name], skip_init, dtype=torch.float64)
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

    for atom in _atoms(checked.spec.mask):
        match atom:
            case ir.ConstDecay(log_gamma=e):
                contexts.update(_bare(e, params))
                axis = _head_axis(e, checked.spec)
                solve(e, lambda p, axis=axis: along(  # type: ignore[misc]
                    p, axis, lambda h: torch.log1p(-(2.0 ** (-5 - h)))))
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


def _atoms(mask: ir.MaskExpr) -> list[ir.Mask]:
    """The basic masks whose decays a mask reads, each initialised as if alone: the terms
    of a sum, both passes of a quasiseparable mask, a decayed window's const_decay."""
    from ssmc.algebra import atoms

    out = []
    for atom in atoms(mask):
        kernel = atom.kernel if isinstance(atom, ir.Toeplitz) else None
        if isinstance(kernel, ir.LearnedKernel) and kernel.log_decay is not None:
            out.append(ir.ConstDecay(log_gamma=kernel.log_decay, span=atom.span))
        else:
            out.append(atom)
    return out


def _head_axis(expr: Expr, spec: ir.Spec) -> str | None:
    """The head dim an expression reads (the axis RetNet's γ_h runs along), if any."""
    from ssmc.axes import expr_axes, head_dims

    return next((a for a in expr_axes(expr, spec) if a in head_dims(spec)), None)


__all__ = ["ParamInit", "param_inits"]
