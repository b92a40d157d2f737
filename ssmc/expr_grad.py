"""Derivatives of the expression AST, as expression AST: what backward kernels print.

`Gradients.gradients(expr, upstream)` is {name: upstream · ∂expr/∂name} for every name
`expr` reads, built by reverse accumulation: one walk from the root hands each node its
adjoint (an expression) and each leaf sums what reaches it, so a kernel's gradients cost
one pass over its expression however many tensors it reads. `derivative(expr, name)` is the
same with upstream 1. Results are in the same closed AST (so the Triton, torch and SymPy
printers all apply), with products by the literals 0 and 1 dropped so that a gradient
kernel does no dead work. The smooth functions differentiate into functions of the
language (softplus′ = sigmoid, tanh′ = 4 σ(2u) σ(−2u), silu′ = σ(u)(1 + u σ(−u)), ...),
each stable in fp32. The non-smooth ones (abs, clamp, min, max) differentiate into
indicators `[lhs ≥ rhs]` / `[lhs > rhs]`, which the language has no function for: each
becomes a `Ref` to an internal name `@step<k>` defined in `Gradients.steps`, and a printer
binds that name to the indicator's value. The conventions at ties are torch's: clamp
passes the gradient on its closed interval, abs′(0) = 0, and min/max split a tie in half.
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

    def gradients(self, expr: E.Expr, upstream: E.Expr) -> dict[str, E.Expr]:
        """{name: upstream · ∂expr/∂name} for the names `expr` reads (spans dropped), in order
        of first appearance; names whose gradient is 0 are left out."""
        found: dict[str, E.Expr] = {}
        self._back(E.strip_spans(expr), upstream, found)
        return {name: g for name, g in found.items() if g != ZERO}

    def derivative(self, expr: E.Expr, name: str) -> E.Expr:
        """∂expr/∂name; names other than `name` are constants."""
        return self.gradients(expr, ONE).get(name, ZERO)

    def step(self, lhs: E.Expr, rhs: E.Expr, *, strict: bool) -> E.Expr:
        """[lhs > rhs] or [lhs ≥ rhs]: a number when both sides are, else a `@step` Ref."""
        if isinstance(lhs, E.Num) and isinstance(rhs, E.Num):
            return ONE if (lhs.value > rhs.value if strict else lhs.value >= rhs.value) else ZERO
        key = (lhs, rhs, strict)
        if key not in self._steps:
            name = f"{STEP_PREFIX}{len(self._steps)}"
            self._steps[key] = Step(name=name, lhs=lhs, rhs=rhs, strict=strict)
        return E.Ref(name=self._steps[key].name)

    def _back(self, expr: E.Expr, adjoint: E.Expr, found: dict[str, E.Expr]) -> None:
        """Hand `adjoint` (∂ℓ/∂expr) down to the leaves of `expr`; literals absorb theirs."""
        match expr:
            case E.Num():
                return
            case E.Ref(name=name):
                found[name] = add(found.get(name, ZERO), adjoint)
            case E.Neg(operand=u):
                self._back(u, neg(adjoint), found)
            case E.BinOp(op=op, lhs=u, rhs=v):
                self._binop(op, u, v, adjoint, found)
            case E.Call(func=E.Func.CLAMP, args=(u, lo, hi)):
                self._clamp(u, lo, hi, adjoint, found)
            case E.Call(func=E.Func.MIN | E.Func.MAX as func, args=(u, v)):
                # ∂max/∂u = [u > v] + ½[u = v] = ½([u > v] + [u ≥ v]); min with the sides swapped
                for arg, other in ((u, v), (v, u)):
                    if not isinstance(arg, E.Num):
                        first, second = (arg, other) if func is E.Func.MAX else (other, arg)
                        wins = add(
                            self.step(first, second, strict=True),
                            self.step(first, second, strict=False),
                        )
                        self._back(arg, mul(adjoint, mul(num(0.5), wins)), found)
            case E.Call(func=func, args=(u,)):
                if not isinstance(u, E.Num):
                    self._back(u, mul(adjoint, self._unary(func, u)), found)
            case _:
                raise TypeError(f"cannot differentiate {expr!r}")

    def _binop(
        self, op: E.Op, u: E.Expr, v: E.Expr, adjoint: E.Expr, found: dict[str, E.Expr]
    ) -> None:
        constant_u, constant_v = isinstance(u, E.Num), isinstance(v, E.Num)
        match op:
            case E.Op.ADD:
                self._back(u, adjoint, found)
                self._back(v, adjoint, found)
            case E.Op.SUB:
                self._back(u, adjoint, found)
                self._back(v, neg(adjoint), found)
            case E.Op.MUL:
                self._back(u, mul(adjoint, v), found)
                self._back(v, mul(adjoint, u), found)
            case E.Op.DIV:
                # ∂/∂u = 1/v, ∂/∂v = −(u/v)/v: u/v is the forward's own node (shared when printed)
                if not constant_u:
                    self._back(u, div(adjoint, v), found)
                if not constant_v:
                    self._back(v, neg(mul(adjoint, div(div(u, v), v))), found)
            case E.Op.POW:
                # ∂/∂u = v·u^(v−1), ∂/∂v = u^v·log(u)
                if not constant_u:
                    self._back(u, mul(adjoint, mul(v, power(u, sub(v, ONE)))), found)
                if not constant_v:
                    log_u = call(E.Func.LOG, u)
                    self._back(v, mul(adjoint, mul(power(u, v), log_u)), found)
            case _:
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
        self, u: E.Expr, lo: E.Expr, hi: E.Expr, adjoint: E.Expr, found: dict[str, E.Expr]
    ) -> None:
        """clamp(u, lo, hi) = min(max(u, lo), hi): u on [lo, hi], lo below it (when lo < hi),
        hi otherwise; infinite bounds drop out."""
        inside: E.Expr = ONE
        if _constant(lo) != -math.inf:
            inside = mul(inside, self.step(u, lo, strict=False))
        if _constant(hi) != math.inf:
            inside = mul(inside, self.step(hi, u, strict=False))
        if not isinstance(u, E.Num):
            self._back(u, mul(adjoint, inside), found)
        if _constant(lo) is None or _constant(hi) is None:
            below = mul(self.step(lo, u, strict=True), self.step(hi, lo, strict=True))
            if _constant(lo) is None:
                self._back(lo, mul(adjoint, below), found)
            if _constant(hi) is None:
                self._back(hi, mul(adjoint, sub(sub(ONE, inside), below)), found)


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
