"""The spec's expression language: one closed AST for decays, gates and scales.

Every expression in a `.ssm` file becomes these nodes. Printers (PyTorch, SymPy,
Triton) walk the AST; nothing ever evaluates spec text. The function list is fixed.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class Span:
    """A region of the source text, 1-based lines and columns (end exclusive)."""

    line: int
    column: int
    end_line: int
    end_column: int


class Op(enum.Enum):
    """Binary operators of the expression language."""

    ADD = "+"
    SUB = "-"
    MUL = "*"
    DIV = "/"
    POW = "**"


class Func(enum.Enum):
    """The fixed list of functions an expression may call."""

    EXP = "exp"
    LOG = "log"
    SOFTPLUS = "softplus"
    SIGMOID = "sigmoid"
    LOGSIGMOID = "logsigmoid"
    SILU = "silu"
    TANH = "tanh"
    SQRT = "sqrt"
    ABS = "abs"
    CLAMP = "clamp"
    MIN = "min"
    MAX = "max"


FUNC_ARITY: dict[Func, int] = {
    Func.EXP: 1,
    Func.LOG: 1,
    Func.SOFTPLUS: 1,
    Func.SIGMOID: 1,
    Func.LOGSIGMOID: 1,
    Func.SILU: 1,
    Func.TANH: 1,
    Func.SQRT: 1,
    Func.ABS: 1,
    Func.CLAMP: 3,
    Func.MIN: 2,
    Func.MAX: 2,
}
FUNC_NAMES: tuple[str, ...] = tuple(f.value for f in Func)


@dataclass(frozen=True, slots=True, kw_only=True)
class Num:
    """A numeric literal, kept as the parsed float (never as source text)."""

    value: float
    span: Span | None = None

    def __post_init__(self) -> None:
        if math.isnan(self.value):
            raise ValueError("Num cannot hold NaN")


@dataclass(frozen=True, slots=True, kw_only=True)
class Ref:
    """A reference to a declared tensor, parameter or dim (after `let` inlining)."""

    name: str
    span: Span | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Neg:
    """Unary minus."""

    operand: Expr
    span: Span | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BinOp:
    """`lhs op rhs`, broadcast by named axis."""

    op: Op
    lhs: Expr
    rhs: Expr
    span: Span | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    """A call of one of the fixed functions."""

    func: Func
    args: tuple[Expr, ...]
    span: Span | None = None


Expr = Num | Ref | Neg | BinOp | Call


def refs(expr: Expr) -> frozenset[str]:
    """Names an expression reads."""
    match expr:
        case Num():
            return frozenset()
        case Ref(name=name):
            return frozenset((name,))
        case Neg(operand=operand):
            return refs(operand)
        case BinOp(lhs=lhs, rhs=rhs):
            return refs(lhs) | refs(rhs)
        case Call(args=args):
            return frozenset().union(*(refs(a) for a in args))
    raise TypeError(f"not an expression node: {expr!r}")


def depth(expr: Expr) -> int:
    """Nesting depth of an expression (1 for a leaf)."""
    match expr:
        case Num() | Ref():
            return 1
        case Neg(operand=operand):
            return 1 + depth(operand)
        case BinOp(lhs=lhs, rhs=rhs):
            return 1 + max(depth(lhs), depth(rhs))
        case Call(args=args):
            return 1 + max((depth(a) for a in args), default=0)
    raise TypeError(f"not an expression node: {expr!r}")


def substitute(expr: Expr, mapping: dict[str, Expr]) -> Expr:
    """Replace references by expressions (used to inline `let` and to bind roles)."""
    match expr:
        case Num():
            return expr
        case Ref(name=name):
            return mapping.get(name, expr)
        case Neg(operand=operand, span=span):
            return Neg(operand=substitute(operand, mapping), span=span)
        case BinOp(op=op, lhs=lhs, rhs=rhs, span=span):
            return BinOp(
                op=op, lhs=substitute(lhs, mapping), rhs=substitute(rhs, mapping), span=span
            )
        case Call(func=func, args=args, span=span):
            return Call(func=func, args=tuple(substitute(a, mapping) for a in args), span=span)
    raise TypeError(f"not an expression node: {expr!r}")


def strip_spans(expr: Expr) -> Expr:
    """The same expression without source spans (for hashing and comparison)."""
    match expr:
        case Num(value=value):
            return Num(value=value)
        case Ref(name=name):
            return Ref(name=name)
        case Neg(operand=operand):
            return Neg(operand=strip_spans(operand))
        case BinOp(op=op, lhs=lhs, rhs=rhs):
            return BinOp(op=op, lhs=strip_spans(lhs), rhs=strip_spans(rhs))
        case Call(func=func, args=args):
            return Call(func=func, args=tuple(strip_spans(a) for a in args))
    raise TypeError(f"not an expression node: {expr!r}")


def show(expr: Expr) -> str:
    """Readable infix text of an expression, fully parenthesised where needed."""
    match expr:
        case Num(value=value):
            if math.isinf(value):
                return "inf" if value > 0 else "-inf"
            return repr(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
        case Ref(name=name):
            return name
        case Neg(operand=operand):
            return f"-{_show_operand(operand)}"
        case BinOp(op=op, lhs=lhs, rhs=rhs):
            return f"{_show_operand(lhs)} {op.value} {_show_operand(rhs)}"
        case Call(func=func, args=args):
            return f"{func.value}({', '.join(show(a) for a in args)})"
    raise TypeError(f"not an expression node: {expr!r}")


def _show_operand(expr: Expr) -> str:
    text = show(expr)
    return f"({text})" if isinstance(expr, BinOp | Neg) else text
