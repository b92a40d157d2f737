"""Evaluate an expression AST with torch, broadcasting by named axis (docs/semantics.md).

A value is a tensor with one name per axis. Binary operations align their operands by
name (the k-th axis called `n` in one operand meets the k-th axis called `n` in the
other, so a dense `[H, N, N]` keeps both N axes); absent axes broadcast as size 1.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from ssmc import ir
from ssmc.axes import tensor_axes
from ssmc.expr import BinOp, Call, Expr, Func, Neg, Num, Op, Ref

Env = Mapping[str, tuple[Tensor, tuple[str, ...]]]
Named = tuple[Tensor, tuple[str, ...]]

_UNARY: dict[Func, Callable[[Tensor], Tensor]] = {
    Func.EXP: torch.exp,
    Func.LOG: torch.log,
    Func.SOFTPLUS: F.softplus,
    Func.SIGMOID: torch.sigmoid,
    Func.LOGSIGMOID: F.logsigmoid,
    Func.SILU: F.silu,
    Func.TANH: torch.tanh,
    Func.SQRT: torch.sqrt,
    Func.ABS: torch.abs,
}

_BINARY: dict[Op, Callable[[Tensor, Tensor], Tensor]] = {
    Op.ADD: torch.add,
    Op.SUB: torch.sub,
    Op.MUL: torch.mul,
    Op.DIV: torch.div,
    Op.POW: torch.pow,
}


def squeeze_literals(tensor: ir.Tensor, value: Tensor) -> Named:
    """`value` viewed with the literal-1 axes of the declaration dropped, and its axis names."""
    literal = tuple(i for i, size in enumerate(tensor.shape) if not isinstance(size, str))
    return value.squeeze(literal) if literal else value, tensor_axes(tensor.shape)


def evaluate(
    expr: Expr, env: Env, scalars: Mapping[str, float], out_axes: tuple[str, ...]
) -> Tensor:
    """`expr` as a tensor whose dims are `out_axes` (size 1 where the expression lacks one)."""
    value, axes = evaluate_named(expr, env, scalars)
    extra = Counter(axes) - Counter(out_axes)
    if extra:
        raise ValueError(f"expression has axes {sorted(extra)} not in {list(out_axes)}")
    return _to_axes(value, axes, out_axes)


def evaluate_named(expr: Expr, env: Env, scalars: Mapping[str, float]) -> Named:
    """`expr` as a tensor and the names of its axes, in order of first appearance."""
    value, axes = _eval(expr, env, scalars)
    devices = {t.device for t, _ in env.values()}
    if value.device.type == "cpu" and value.dim() == 0 and len(devices) == 1:
        value = value.to(devices.pop())
    return value, axes


def _eval(expr: Expr, env: Env, scalars: Mapping[str, float]) -> Named:
    match expr:
        case Num(value=number):
            return torch.tensor(number, dtype=torch.float64), ()
        case Ref(name=name):
            if name in env:
                return env[name]
            if name in scalars:
                return torch.tensor(float(scalars[name]), dtype=torch.float64), ()
            raise KeyError(f"no tensor or dim called {name!r}")
        case Neg(operand=operand):
            inner, axes = _eval(operand, env, scalars)
            return -inner, axes
        case BinOp(op=op, lhs=lhs, rhs=rhs):
            (a, b), axes = _align([_eval(lhs, env, scalars), _eval(rhs, env, scalars)])
            if op is Op.POW and isinstance(rhs, Num):
                return torch.pow(a, rhs.value), axes
            return _BINARY[op](a, b), axes
        case Call(func=Func.CLAMP, args=(arg, Num(value=lo), Num(value=hi))):
            inner, axes = _eval(arg, env, scalars)
            if lo == -math.inf and hi == math.inf:
                return inner, axes
            low, high = (None if lo == -math.inf else lo), (None if hi == math.inf else hi)
            return torch.clamp(inner, min=low, max=high), axes
        case Call(func=Func.CLAMP, args=args):
            (inner, low, high), axes = _align([_eval(a, env, scalars) for a in args])
            return torch.clamp(inner, min=low, max=high), axes
        case Call(func=Func.MIN | Func.MAX as func, args=args):
            (a, b), axes = _align([_eval(a, env, scalars) for a in args])
            return (torch.minimum if func is Func.MIN else torch.maximum)(a, b), axes
        case Call(func=func, args=(arg,)):
            inner, axes = _eval(arg, env, scalars)
            return _UNARY[func](inner), axes
    raise TypeError(f"cannot evaluate {expr!r}")


def _align(values: list[Named]) -> tuple[list[Tensor], tuple[str, ...]]:
    """Operands viewed on the union of their axes (by name and occurrence), size 1 if absent."""
    union: list[str] = []
    for _, axes in values:
        missing = Counter(axes) - Counter(union)
        for name in axes:
            if missing[name]:
                union.append(name)
                missing[name] -= 1
    out = tuple(union)
    # 0-dim operands (numbers, dims) stay 0-dim so they never promote a tensor's dtype.
    return [t if t.dim() == 0 else _to_axes(t, axes, out) for t, axes in values], out


def _to_axes(value: Tensor, axes: tuple[str, ...], out_axes: tuple[str, ...]) -> Tensor:
    """Permute `value` (dims named `axes`) into `out_axes` order, size 1 where absent."""
    positions = _occurrences(axes)
    order = [positions[key] for key in _occurrences_list(out_axes) if key in positions]
    result = value.permute(order) if order else value.reshape(())
    for i, key in enumerate(_occurrences_list(out_axes)):
        if key not in positions:
            result = result.unsqueeze(i)
    return result


def _occurrences_list(axes: tuple[str, ...]) -> list[tuple[str, int]]:
    """Each axis as (name, how many times the name came before)."""
    seen: Counter[str] = Counter()
    keys = []
    for name in axes:
        keys.append((name, seen[name]))
        seen[name] += 1
    return keys


def _occurrences(axes: tuple[str, ...]) -> dict[tuple[str, int], int]:
    return {key: i for i, key in enumerate(_occurrences_list(axes))}
