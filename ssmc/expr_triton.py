"""Print expression ASTs as Triton source: the only place expressions become kernel code.

An expression becomes straight-line code, one assignment per operation (`t_3 = t_1 * b_A`),
so every subexpression is computed once and shared between the outputs of a kernel.
Names reach the source only as validated identifiers chosen by the caller (`b_dt` for the
block loaded from tensor `dt`); numbers are printed from the parsed float, never from text.
Every function is expanded into overflow-free fp32 code: softplus and logsigmoid go through
log1p(exp(−|v|)), sigmoid and tanh through exp(−|v|), so no lane ever computes exp of a
large positive number (which the CPU interpreter also reports as an error).
"""

from __future__ import annotations

import keyword
import math
import re
from collections.abc import Callable, Mapping, Sequence

from ssmc import expr as E
from ssmc.errors import SsmcError
from ssmc.expr_grad import Step
from ssmc.expr_torch import evaluate_named

IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
TEMP_PREFIX = "t_"
"""Temporaries are `t_0, t_1, ...`; callers must not bind names that start with it."""

_SMALL_POWER = 64
"""Integer powers up to this size are computed by repeated squaring (no log of 0)."""
_TANH_SERIES = 0.125
"""Below this |v|, tanh uses its Taylor series (1 − exp(−2|v|) cancels there)."""


class UnsafeNameError(SsmcError, ValueError):
    """A name that would reach generated source is not a plain identifier."""


def identifier(name: str) -> str:
    """`name` itself if it is a plain identifier and not a Python keyword, else raise."""
    if not isinstance(name, str) or not IDENTIFIER.match(name) or keyword.iskeyword(name):
        raise UnsafeNameError(
            f"{name!r} cannot appear in generated code: names must match "
            f"[A-Za-z_][A-Za-z0-9_]* and not be a Python keyword"
        )
    return name


def prefixed(prefix: str, name: str) -> str:
    """`prefix + name`, a validated identifier that cannot shadow a builtin or a kernel local."""
    return identifier(identifier(prefix) + identifier(name))


def number(value: float) -> str:
    """A float literal Triton accepts, printed from the value (repr round-trips exactly)."""
    value = float(value)
    if math.isnan(value):
        return 'float("nan")'
    if math.isinf(value):
        return 'float("inf")' if value > 0 else '(-float("inf"))'
    text = repr(value)
    return f"({text})" if value < 0 or text.startswith("-") else text


def fold(expr: E.Expr) -> float | None:
    """The value of a constant expression (it reads no tensor or dim), else None.

    Constants are evaluated by the torch evaluator in fp64, so a folded value is exactly
    what the reference computes; Triton never sees an operation on two literals.
    """
    if E.refs(expr):
        return None
    value, _ = evaluate_named(expr, {}, {})
    return float(value)


class Emitter:
    """Turns expressions into assignments; shared subexpressions are emitted once.

    `names` maps each referenced name (tensor or dim) to the identifier that holds its
    value in the kernel; `steps` define the indicator names (`@step<k>`) of derivatives
    (ssmc.expr_grad), each computed where it is first used. `emit` returns the source
    atom holding the result: a temporary, a bound identifier or a number literal.
    """

    def __init__(self, names: Mapping[str, str], steps: Sequence[Step] = ()) -> None:
        for bound in names.values():
            identifier(bound)
            if bound.startswith(TEMP_PREFIX):
                raise UnsafeNameError(f"{bound!r} collides with the temporaries {TEMP_PREFIX}*")
        self._names = dict(names)
        self._steps = {step.name: step for step in steps}
        self._memo: dict[E.Expr, str] = {}
        self._codes: dict[str, str] = {}
        self.lines: list[str] = []

    def emit(self, expr: E.Expr) -> str:
        """Emit the code of `expr`; return the atom (identifier or literal) holding it."""
        return self._emit(E.strip_spans(expr))

    def _emit(self, expr: E.Expr) -> str:
        constant = fold(expr)
        if constant is not None:
            return number(constant)
        if isinstance(expr, E.Ref):
            if expr.name not in self._names and expr.name in self._steps:
                self._names[expr.name] = self._step(self._steps[expr.name])
            if expr.name not in self._names:
                raise UnsafeNameError(f"no kernel value is bound to the name {expr.name!r}")
            return self._names[expr.name]
        if expr not in self._memo:
            self._memo[expr] = self._compute(expr)
        return self._memo[expr]

    def _step(self, step: Step) -> str:
        lhs, rhs = self._emit(step.lhs), self._emit(step.rhs)
        return self.assign(f"tl.where({lhs} {'>' if step.strict else '>='} {rhs}, 1.0, 0.0)")

    def assign(self, code: str) -> str:
        """A temporary holding `code`; the same code (a pure function of atoms) is reused."""
        if code not in self._codes:
            self._codes[code] = f"{TEMP_PREFIX}{len(self.lines)}"
            self.lines.append(f"{self._codes[code]} = {code}")
        return self._codes[code]

    def _compute(self, expr: E.Expr) -> str:
        match expr:
            case E.Neg(operand=operand):
                return self.assign(f"-{self._emit(operand)}")
            case E.BinOp(op=E.Op.POW, lhs=lhs, rhs=rhs):
                return self._power(lhs, rhs)
            case E.BinOp(op=op, lhs=lhs, rhs=rhs):
                return self.assign(f"{self._emit(lhs)} {op.value} {self._emit(rhs)}")
            case E.Call(func=func, args=args):
                return _FUNCS[func](self, [self._emit(a) for a in args])
        raise TypeError(f"cannot print {expr!r}")

    def _power(self, lhs: E.Expr, rhs: E.Expr) -> str:
        base = self._emit(lhs)
        exponent = fold(rhs)
        if exponent is not None and exponent.is_integer() and abs(exponent) <= _SMALL_POWER:
            n = int(abs(exponent))
            if n == 0:
                return self.assign(f"tl.where({base} != {base}, 1.0, 1.0)")
            result = self._integer_power(base, n)
            return self.assign(f"1.0 / {result}") if exponent < 0 else result
        if exponent == 0.5:
            return self.assign(f"tl.sqrt({base})")
        log = self.assign(f"tl.log({base})")
        return self.assign(f"tl.exp({self._emit(rhs)} * {log})")

    def _integer_power(self, base: str, n: int) -> str:
        """base**n by repeated squaring."""
        result: str | None = None
        square = base
        while n:
            if n & 1:
                result = square if result is None else self.assign(f"{result} * {square}")
            n >>= 1
            if n:
                square = self.assign(f"{square} * {square}")
        assert result is not None
        return result

    def log1p(self, u: str) -> str:
        """log(1 + u) for u ≥ 0, exact to a few ulps even when 1 + u rounds to 1 (Goldberg)."""
        w = self.assign(f"1.0 + {u}")
        ratio = self.assign(f"{u} / tl.where({w} == 1.0, 1.0, {w} - 1.0)")
        return self.assign(f"tl.where({w} == 1.0, {u}, tl.log({w}) * {ratio})")

    def exp_neg_abs(self, v: str) -> str:
        """exp(−|v|) ∈ (0, 1]: never overflows."""
        return self.assign(f"tl.exp(-tl.abs({v}))")

    def sigmoid(self, v: str) -> str:
        e = self.exp_neg_abs(v)
        return self.assign(f"tl.where({v} >= 0, 1.0 / (1.0 + {e}), {e} / (1.0 + {e}))")


def _softplus(em: Emitter, args: list[str]) -> str:
    (v,) = args
    tail = em.log1p(em.exp_neg_abs(v))
    return em.assign(f"tl.maximum({v}, 0.0) + {tail}")


def _logsigmoid(em: Emitter, args: list[str]) -> str:
    (v,) = args
    tail = em.log1p(em.exp_neg_abs(v))
    return em.assign(f"tl.minimum({v}, 0.0) - {tail}")


def _silu(em: Emitter, args: list[str]) -> str:
    (v,) = args
    return em.assign(f"{v} * {em.sigmoid(v)}")


def _tanh(em: Emitter, args: list[str]) -> str:
    (v,) = args
    a = em.assign(f"tl.abs({v})")
    e = em.assign(f"tl.exp(-2.0 * {a})")
    big = em.assign(f"(1.0 - {e}) / (1.0 + {e})")
    v2 = em.assign(f"{v} * {v}")
    small = em.assign(
        f"{a} * (1.0 + {v2} * (-1.0 / 3.0 + {v2} * (2.0 / 15.0 - {v2} * (17.0 / 315.0))))"
    )
    magnitude = em.assign(f"tl.where({a} < {_TANH_SERIES!r}, {small}, {big})")
    return em.assign(f"tl.where({v} < 0, -{magnitude}, {magnitude})")


def _clamp(em: Emitter, args: list[str]) -> str:
    v, lo, hi = args
    if lo != number(-math.inf):
        v = em.assign(f"tl.maximum({v}, {lo})")
    if hi != number(math.inf):
        v = em.assign(f"tl.minimum({v}, {hi})")
    return v


def _unary(template: str) -> Callable[[Emitter, list[str]], str]:
    def emit(em: Emitter, args: list[str]) -> str:
        return em.assign(template.format(*args))

    return emit


_FUNCS: dict[E.Func, Callable[[Emitter, list[str]], str]] = {
    E.Func.EXP: _unary("tl.exp({0})"),
    E.Func.LOG: _unary("tl.log({0})"),
    E.Func.SQRT: _unary("tl.sqrt({0})"),
    E.Func.ABS: _unary("tl.abs({0})"),
    E.Func.MIN: _unary("tl.minimum({0}, {1})"),
    E.Func.MAX: _unary("tl.maximum({0}, {1})"),
    E.Func.SOFTPLUS: _softplus,
    E.Func.LOGSIGMOID: _logsigmoid,
    E.Func.SIGMOID: lambda em, args: em.sigmoid(args[0]),
    E.Func.SILU: _silu,
    E.Func.TANH: _tanh,
    E.Func.CLAMP: _clamp,
}
assert set(_FUNCS) == set(E.Func), "every function of the language has a Triton expansion"


def to_triton(
    expr: E.Expr, names: Mapping[str, str], steps: Sequence[Step] = ()
) -> tuple[list[str], str]:
    """Straight-line Triton code for one expression: (assignments, result atom)."""
    em = Emitter(names, steps)
    result = em.emit(expr)
    return em.lines, result
