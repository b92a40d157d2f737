"""The SymPy printer: every function of the AST, derivatives, and no way to run spec text."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import sympy

import ssmc.expr_sympy as expr_sympy
from ssmc.expr import BinOp, Call, Func, Neg, Num, Op, Ref
from ssmc.expr_sympy import derivative, number, symbol, to_sympy

u, v, w = (sympy.Symbol(n, real=True) for n in "uvw")
SYMS = {"u": u, "v": v, "w": w}
U, V, W = Ref(name="u"), Ref(name="v"), Ref(name="w")


def call(func: Func, *args) -> Call:
    return Call(func=func, args=args)


@pytest.mark.parametrize(
    ("node", "expected"),
    [
        (call(Func.EXP, U), sympy.exp(u)),
        (call(Func.LOG, U), sympy.log(u)),
        (call(Func.SOFTPLUS, U), sympy.log(1 + sympy.exp(u))),
        (call(Func.SIGMOID, U), 1 / (1 + sympy.exp(-u))),
        (call(Func.LOGSIGMOID, U), -sympy.log(1 + sympy.exp(-u))),
        (call(Func.SILU, U), u / (1 + sympy.exp(-u))),
        (call(Func.TANH, U), sympy.tanh(u)),
        (call(Func.SQRT, U), sympy.sqrt(u)),
        (call(Func.ABS, U), sympy.Abs(u)),
        (call(Func.CLAMP, U, V, W), sympy.Min(sympy.Max(u, v), w)),
        (call(Func.MIN, U, V), sympy.Min(u, v)),
        (call(Func.MAX, U, V), sympy.Max(u, v)),
        (BinOp(op=Op.ADD, lhs=U, rhs=V), u + v),
        (BinOp(op=Op.SUB, lhs=U, rhs=V), u - v),
        (BinOp(op=Op.MUL, lhs=U, rhs=V), u * v),
        (BinOp(op=Op.DIV, lhs=U, rhs=V), u / v),
        (BinOp(op=Op.POW, lhs=U, rhs=Num(value=2.0)), u**2),
        (Neg(operand=U), -u),
        (Num(value=0.125), sympy.Rational(1, 8)),
        (Num(value=3.0), sympy.Integer(3)),
        (Num(value=math.inf), sympy.oo),
        (Num(value=-math.inf), -sympy.oo),
    ],
    ids=lambda p: p.func.value if isinstance(p, Call) else type(p).__name__,
)
def test_each_node_prints_exactly(node, expected) -> None:
    got = to_sympy(node, SYMS)
    assert got == expected or sympy.simplify(got - expected) == 0


@pytest.mark.parametrize("func", list(Func), ids=lambda f: f.value)
def test_functions_agree_with_math_numerically(func: Func) -> None:
    exact = {
        Func.EXP: math.exp,
        Func.LOG: math.log,
        Func.SOFTPLUS: lambda a: math.log1p(math.exp(a)),
        Func.SIGMOID: lambda a: 1 / (1 + math.exp(-a)),
        Func.LOGSIGMOID: lambda a: -math.log1p(math.exp(-a)),
        Func.SILU: lambda a: a / (1 + math.exp(-a)),
        Func.TANH: math.tanh,
        Func.SQRT: math.sqrt,
        Func.ABS: abs,
        Func.CLAMP: lambda a, lo, hi: min(max(a, lo), hi),
        Func.MIN: min,
        Func.MAX: max,
    }[func]
    values = (0.7, 0.2, 0.5)[: {Func.CLAMP: 3, Func.MIN: 2, Func.MAX: 2}.get(func, 1)]
    node = call(func, *(Num(value=a) for a in values))
    assert float(to_sympy(node, {})) == pytest.approx(exact(*values), rel=1e-14)


def test_clamp_to_infinity_drops_the_open_bound() -> None:
    node = call(Func.CLAMP, call(Func.SOFTPLUS, U), Num(value=0.0), Num(value=math.inf))
    assert to_sympy(node, SYMS) == sympy.log(1 + sympy.exp(u))


def test_mapped_names_take_their_value_and_unmapped_names_become_symbols() -> None:
    node = BinOp(op=Op.MUL, lhs=Ref(name="delta"), rhs=Ref(name="A"))
    assert to_sympy(node, {"delta": u + 1}) == (u + 1) * sympy.Symbol("A", real=True)


def test_derivatives_of_the_gates() -> None:
    silu = call(Func.SILU, U)
    d = derivative(silu, "u", SYMS)
    sig = 1 / (1 + sympy.exp(-u))
    assert sympy.simplify(d - (sig + u * sig * (1 - sig))) == 0
    softplus = call(Func.SOFTPLUS, BinOp(op=Op.ADD, lhs=U, rhs=V))
    assert sympy.simplify(derivative(softplus, "v", SYMS) - 1 / (1 + sympy.exp(-u - v))) == 0
    assert derivative(BinOp(op=Op.MUL, lhs=Ref(name="dt"), rhs=U), "dt", SYMS) == u


def test_derivative_needs_a_symbol() -> None:
    with pytest.raises(ValueError, match="not to a symbol"):
        derivative(U, "u", {"u": u + v})


HOSTILE = "__import__('os').system('touch {}')"


@pytest.mark.parametrize("name", ["1x", "a b", "x;y", "lambda", "", HOSTILE])
def test_names_must_be_identifiers(name: str) -> None:
    with pytest.raises(ValueError, match="identifier"):
        symbol(name)
    with pytest.raises(ValueError, match="identifier"):
        to_sympy(Ref(name=name), {})


def test_a_hostile_symbol_name_is_inert(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    name = HOSTILE.format(marker)
    hostile = sympy.Symbol(name)
    # Everything this package does with a symbol: arithmetic, expansion, printing,
    # substitution, differentiation and numeric evaluation. None of it reads the name as code.
    e = sympy.expand((hostile + 1) ** 2 * sympy.exp(hostile))
    str(e), repr(e), sympy.srepr(e)
    sympy.diff(e, hostile)
    e.xreplace({hostile: sympy.Integer(2)}).evalf()
    # Through the printer the name is refused before it ever becomes a symbol.
    with pytest.raises(ValueError):
        to_sympy(Ref(name=name), {})
    assert to_sympy(Ref(name="x"), {"x": hostile}) is hostile
    assert not marker.exists()


def test_literals_must_be_numbers() -> None:
    with pytest.raises(ValueError):
        number("1+1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        number(math.nan)


BANNED = {"sympify", "parse_expr", "eval", "exec", "compile", "S", "__import__"}
TEXT_PARSERS = {"lambdify", "Rational", "Float", "Integer", "Matrix", "symbols"}


def _name(func: ast.expr) -> str:
    dotted = ast.unparse(func)
    # re.compile builds a regular expression; it is not the code-compiling builtin.
    return "" if dotted == "re.compile" else dotted.rsplit(".", 1)[-1]


@pytest.mark.parametrize("module", ["expr_sympy", "symbolic"])
def test_no_string_evaluation_in_the_symbolic_modules(module: str) -> None:
    path = Path(expr_sympy.__file__).with_name(f"{module}.py")
    if not path.exists():
        pytest.skip(f"{path.name} not written yet")
    calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]
    assert not {_name(c.func) for c in calls} & BANNED
    for c in calls:
        if _name(c.func) in TEXT_PARSERS:
            args = [*c.args, *(k.value for k in c.keywords)]
            assert not any(isinstance(a, ast.Constant | ast.JoinedStr) and
                           isinstance(getattr(a, "value", ""), str) for a in args), ast.unparse(c)
