"""Derivatives of the expression AST, as expression AST: what backward kernels print.

`Gradients.derivative(expr, name)` is ∂expr/∂name built node by node by the chain rule, in
the same closed AST (so the Triton, torch and SymPy printers all apply), with products by
the literals 0 and 1 dropped so that a gradient kernel does no dead work. The smooth
functions differentiate into functions of the language (softplus′ = sigmoid, tanh′ =
4 σ(2u) σ(−2u), silu′ = σ(u)(1 + u σ(−u)), ...), each stable in fp32. The non-smooth ones
(abs, clamp, min, max) differentiate into indicators `[lhs ≥ rhs]` / `[lhs > rhs]`, which the
language has no function for: each becomes a `Ref` to an internal name `@step<k>` defined in
`Gradients.steps`, and a printer binds that name to the indicator's value. The conventions
at ties are torch's: clamp passes the gradient on its closed interval, abs′(0) = 0, and
min/max split a tie in half.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ssmc import expr as E

STEP_PREFIX = "@step"
"""Names of indicator values: `@step0`, `@step1`, ... (never a declared name: `@`)."""

ZERO = E.Num(value=0.0)
ONE = E.Num(value=1.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """The indicator 1.0 where lhs > rhs (`strict`) or lhs ≥ rhs, else 0.0."""

    name: str
    lhs: E.Expr
    rhs: E.Expr
    strict: bool


class Gradients:
    """Builds derivatives; the indicators they use are collected in `steps` (shared, once each)."""

    def __init__(self) -> None:
        self._steps: dict[tuple[E.Expr, E.Expr, bool], Step] = {}

    @property
    def steps(self) -> tuple[Step, ...]:
        """Every indicator the derivatives built so far refer to, in order of creation."""
        return tuple(self._steps.values())

    def derivative(self, expr: E.Expr, name: str) -> E.Expr:
        """∂expr/∂name (spans dropped); names other than `name` are constants."""
        return self._d(E.strip_spans(expr), name)

    def step(self, lhs: E.Expr, rhs: E.Expr, *, strict: bool) -> E.Expr:
        """[lhs > rhs] or [lhs ≥ rhs]: a number when both sides are, else a `@step` Ref."""
        if isinstance(lhs, E.Num) and isinstance(rhs, E.Num):
            return ONE if (lhs.value > rhs.value if strict else lhs.value >= rhs.value) else ZERO
        key = (lhs, rhs, strict)
        if key not in self._steps:
            name = f"{STEP_PREFIX}{len(self._steps)}"
            self._steps[key] = Step(name=name, lhs=lhs, rhs=rhs, strict=strict)
        return E.Ref(name=self._steps[key].name)

    def _d(self, expr: E.Expr, name: str) -> E.Expr:
        match expr:
            case E.Num():
                return ZERO
            case E.Ref(name=ref):
                return ONE if ref == name else ZERO
            case E.Neg(operand=u):
                return neg(self._d(u, name))
            case E.BinOp(op=op, lhs=u, rhs=v):
                return self._binop(op, u, v, self._d(u, name), self._d(v, name))
            case E.Call(func=E.Func.CLAMP, args=(u, lo, hi)):
                return self._clamp(u, lo, hi, *(self._d(a, name) for a in (u, lo, hi)))
            case E.Call(func=E.Func.MIN | E.Func.MAX as func, args=(u, v)):
                # ∂max/∂u = [u > v] + ½[u = v] = ½([u > v] + [u ≥ v]); min with the sides swapped
                total: E.Expr = ZERO
                for arg, other in ((u, v), (v, u)):
                    d_arg = self._d(arg, name)
                    if d_arg != ZERO:
                        first, second = (arg, other) if func is E.Func.MAX else (other, arg)
                        wins = add(
                            self.step(first, second, strict=True),
                            self.step(first, second, strict=False),
                        )
                        total = add(total, mul(wins, d_arg))
                return mul(num(0.5), total)
            case E.Call(func=func, args=(u,)):
                du = self._d(u, name)
                return ZERO if du == ZERO else mul(self._unary(func, u), du)
        raise TypeError(f"cannot differentiate {expr!r}")

    def _binop(self, op: E.Op, u: E.Expr, v: E.Expr, du: E.Expr, dv: E.Expr) -> E.Expr:
        match op:
            case E.Op.ADD:
                return add(du, dv)
            case E.Op.SUB:
                return sub(du, dv)
            case E.Op.MUL:
                return add(mul(du, v), mul(u, dv))
            case E.Op.DIV:
                # u′/v − (u/v)·v′/v: u/v is the forward's own node (shared when printed)
                return sub(div(du, v), mul(div(u, v), div(dv, v)))
            case E.Op.POW:
                # v·u^(v−1)·u′ + u^v·log(u)·v′
                base = mul(mul(v, power(u, sub(v, ONE))), du)
                return add(base, mul(mul(power(u, v), call(E.Func.LOG, u)), dv))
        raise TypeError(f"not an operator: {op!r}")

    def _unary(self, func: E.Func, u: E.Expr) -> E.Expr:
        """f′(u) of a one-argument function."""
        sigmoid, minus = E.Func.SIGMOID, neg(u)
        match func:
            case E.Func.EXP:
                return call(E.Func.EXP, u)
            case E.Func.LOG:
                return div(ONE, u)
            case E.Func.SOFTPLUS:
                return call(sigmoid, u)
            case E.Func.SIGMOID:
                return mul(call(sigmoid, u), call(sigmoid, minus))
            case E.Func.LOGSIGMOID:
                return call(sigmoid, minus)
            case E.Func.SILU:
                return mul(call(sigmoid, u), add(ONE, mul(u, call(sigmoid, minus))))
            case E.Func.TANH:
                # 1 − tanh² without the cancellation: 4 σ(2u) σ(−2u)
                twice = mul(num(2.0), u)
                return mul(num(4.0), mul(call(sigmoid, twice), call(sigmoid, neg(twice))))
            case E.Func.SQRT:
                return div(num(0.5), call(E.Func.SQRT, u))
            case E.Func.ABS:
                # sign(u), 0 at 0
                return sub(self.step(u, ZERO, strict=True), self.step(ZERO, u, strict=True))
        raise TypeError(f"{func.value} is not a one-argument function")

    def _clamp(
        self, u: E.Expr, lo: E.Expr, hi: E.Expr, du: E.Expr, dlo: E.Expr, dhi: E.Expr
    ) -> E.Expr:
        """clamp(u, lo, hi) = min(max(u, lo), hi): u on [lo, hi], lo below it (when lo < hi),
        hi otherwise; infinite bounds drop out."""
        if du == dlo == dhi == ZERO:
            return ZERO
        inside: E.Expr = ONE
        if _constant(lo) != -math.inf:
            inside = mul(inside, self.step(u, lo, strict=False))
        if _constant(hi) != math.inf:
            inside = mul(inside, self.step(hi, u, strict=False))
        result = mul(inside, du)
        if dlo != ZERO or dhi != ZERO:
            below = mul(self.step(lo, u, strict=True), self.step(hi, lo, strict=True))
            result = add(result, mul(below, dlo))
            if dhi != ZERO:
                result = add(result, mul(sub(sub(ONE, inside), below), dhi))
        return result


# ---------------------------------------------------------------------------------------
# Constructors that fold literals, so derivatives carry no `x * 0` or `1 * x`.
# ---------------------------------------------------------------------------------------


def num(value: float) -> E.Num:
    return E.Num(value=float(value))


def call(func: E.Func, *args: E.Expr) -> E.Expr:
    return E.Call(func=func, args=args)


def _value(expr: E.Expr) -> float | None:
    return expr.value if isinstance(expr, E.Num) else None


def _constant(expr: E.Expr) -> float | None:
    """The value of a literal or a negated literal (how `-inf` is written), else None."""
    if isinstance(expr, E.Neg) and isinstance(expr.operand, E.Num):
        return -expr.operand.value
    return _value(expr)


def neg(u: E.Expr) -> E.Expr:
    a = _value(u)
    if a is not None:
        return num(-a)
    return u.operand if isinstance(u, E.Neg) else E.Neg(operand=u)


def add(u: E.Expr, v: E.Expr) -> E.Expr:
    a, b = _value(u), _value(v)
    if a is not None and b is not None:
        return num(a + b)
    if a == 0.0:
        return v
    if b == 0.0:
        return u
    return E.BinOp(op=E.Op.ADD, lhs=u, rhs=v)


def sub(u: E.Expr, v: E.Expr) -> E.Expr:
    a, b = _value(u), _value(v)
    if a is not None and b is not None:
        return num(a - b)
    if b == 0.0:
        return u
    if a == 0.0:
        return neg(v)
    return E.BinOp(op=E.Op.SUB, lhs=u, rhs=v)


def mul(u: E.Expr, v: E.Expr) -> E.Expr:
    a, b = _value(u), _value(v)
    if a is not None and b is not None:
        return num(a * b)
    if a == 0.0 or b == 0.0:
        return ZERO
    if a == 1.0:
        return v
    if b == 1.0:
        return u
    return E.BinOp(op=E.Op.MUL, lhs=u, rhs=v)


def div(u: E.Expr, v: E.Expr) -> E.Expr:
    a, b = _value(u), _value(v)
    if a == 0.0:
        return ZERO
    if b == 1.0:
        return u
    if a is not None and b is not None and b != 0.0:
        return num(a / b)
    return E.BinOp(op=E.Op.DIV, lhs=u, rhs=v)


def power(u: E.Expr, v: E.Expr) -> E.Expr:
    b = _value(v)
    if b == 0.0:
        return ONE
    if b == 1.0:
        return u
    return E.BinOp(op=E.Op.POW, lhs=u, rhs=v)
