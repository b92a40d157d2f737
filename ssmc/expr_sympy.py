"""The SymPy printer of the expression AST: exact symbolic values of decays, gates, scales.

SymPy objects are built node by node from the closed AST; names become `sympy.Symbol`s
from validated identifiers. No text is ever handed to `sympify`, `parse_expr` or
`lambdify` (they evaluate strings), so a spec cannot run code through this module.
"""

from __future__ import annotations

import keyword
import math
import re
from collections.abc import Mapping

import sympy

from ssmc.expr import BinOp, Call, Expr, Func, Neg, Num, Op, Ref

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def symbol(name: str) -> sympy.Symbol:
    """A real SymPy symbol for a spec name; ValueError unless `name` is a plain identifier."""
    if not isinstance(name, str) or not _IDENTIFIER.match(name) or keyword.iskeyword(name):
        raise ValueError(f"not a valid identifier for a symbol: {name!r}")
    return sympy.Symbol(name, real=True)


def number(value: float) -> sympy.Expr:
    """The exact SymPy value of a literal: the float's binary value as a rational, or ±∞."""
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        raise ValueError(f"not a numeric literal: {value!r}")
    if math.isinf(value):
        return sympy.oo if value > 0 else -sympy.oo
    return sympy.Rational(value)


def to_sympy(expr: Expr, symbols: Mapping[str, sympy.Expr]) -> sympy.Expr:
    """The SymPy expression of `expr`; a `Ref` takes `symbols[name]`, else a fresh symbol."""
    match expr:
        case Num(value=value):
            return number(value)
        case Ref(name=name):
            return symbols[name] if name in symbols else symbol(name)
        case Neg(operand=operand):
            return -to_sympy(operand, symbols)
        case BinOp(op=op, lhs=lhs, rhs=rhs):
            return _binop(op, to_sympy(lhs, symbols), to_sympy(rhs, symbols))
        case Call(func=func, args=args):
            return _call(func, tuple(to_sympy(a, symbols) for a in args))
    raise TypeError(f"not an expression node: {expr!r}")


def derivative(expr: Expr, name: str, symbols: Mapping[str, sympy.Expr]) -> sympy.Expr:
    """∂expr/∂name, exact; `name` must map to a symbol (or be unmapped, then a fresh one)."""
    var = symbols[name] if name in symbols else symbol(name)
    if not isinstance(var, sympy.Symbol):
        raise ValueError(f"{name!r} maps to {var}, not to a symbol; cannot differentiate")
    return sympy.diff(to_sympy(expr, symbols), var)


def _binop(op: Op, lhs: sympy.Expr, rhs: sympy.Expr) -> sympy.Expr:
    match op:
        case Op.ADD:
            return lhs + rhs
        case Op.SUB:
            return lhs - rhs
        case Op.MUL:
            return lhs * rhs
        case Op.DIV:
            return lhs / rhs
        case Op.POW:
            return lhs**rhs
    raise TypeError(f"not an operator: {op!r}")


def _call(func: Func, args: tuple[sympy.Expr, ...]) -> sympy.Expr:
    match func, args:
        case Func.EXP, (u,):
            return sympy.exp(u)
        case Func.LOG, (u,):
            return sympy.log(u)
        case Func.SOFTPLUS, (u,):
            return sympy.log(1 + sympy.exp(u))
        case Func.SIGMOID, (u,):
            return 1 / (1 + sympy.exp(-u))
        case Func.LOGSIGMOID, (u,):
            return -sympy.log(1 + sympy.exp(-u))
        case Func.SILU, (u,):
            return u / (1 + sympy.exp(-u))
        case Func.TANH, (u,):
            return sympy.tanh(u)
        case Func.SQRT, (u,):
            return sympy.sqrt(u)
        case Func.ABS, (u,):
            return sympy.Abs(u)
        case Func.CLAMP, (u, lo, hi):
            return sympy.Min(sympy.Max(u, lo), hi)
        case Func.MIN, (u, v):
            return sympy.Min(u, v)
        case Func.MAX, (u, v):
            return sympy.Max(u, v)
    raise TypeError(f"{func.value} does not take {len(args)} argument(s)")
