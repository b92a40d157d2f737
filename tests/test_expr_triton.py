"""The expression printer: names, numbers, shared subexpressions, and every function's
numerics under the interpreter against the fp64 torch evaluator (relative error ≤ 1e-5)."""

from __future__ import annotations

import math

import pytest
import torch

from ssmc import expr as E
from ssmc import ir
from ssmc.elementwise import Target, elementwise
from ssmc.expr_torch import evaluate
from ssmc.expr_triton import (
    Emitter,
    UnsafeNameError,
    fold,
    identifier,
    number,
    prefixed,
    to_triton,
)
from ssmc.load import load_source
from ssmc.render import render_stage


def ref(name: str) -> E.Ref:
    return E.Ref(name=name)


def num(value: float) -> E.Num:
    return E.Num(value=value)


def call(func: str, *args: E.Expr) -> E.Call:
    return E.Call(func=E.Func[func], args=args)


def binop(op: str, lhs: E.Expr, rhs: E.Expr) -> E.BinOp:
    return E.BinOp(op=E.Op(op), lhs=lhs, rhs=rhs)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "1x",
        "x y",
        "x;import os",
        "x\nimport os",
        "a.b",
        "x-1",
        "class",
        "lambda",
        "None",
        "ä",
        "x)",
        "__import__('os')",
    ],
)
def test_identifier_rejects_anything_but_plain_names(name: str) -> None:
    with pytest.raises(UnsafeNameError):
        identifier(name)


@pytest.mark.parametrize("name", ["x", "dt_bias", "_private", "A1", "match", "print"])
def test_identifier_accepts_plain_names(name: str) -> None:
    assert identifier(name) == name
    assert prefixed("b_", name) == "b_" + name


def test_emitter_rejects_unsafe_bound_names() -> None:
    with pytest.raises(UnsafeNameError):
        Emitter({"x": "b_x + 1"})
    with pytest.raises(UnsafeNameError):
        Emitter({"x": "t_0"})
    with pytest.raises(UnsafeNameError, match="no kernel value"):
        to_triton(ref("y"), {"x": "b_x"})


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.125, "0.125"),
        (1e-05, "1e-05"),
        (3.0, "3.0"),
        (-0.5, "(-0.5)"),
        (1e300, "1e+300"),
        (math.inf, 'float("inf")'),
        (-math.inf, '(-float("inf"))'),
        (math.nan, 'float("nan")'),
        (0.1 + 0.2, "0.30000000000000004"),
    ],
)
def test_numbers_are_printed_from_the_float(value: float, text: str) -> None:
    assert number(value) == text


def test_constant_subexpressions_fold_and_shared_ones_are_emitted_once() -> None:
    delta = call("SOFTPLUS", binop("+", ref("dt"), ref("dt_bias")))
    lines, result = to_triton(
        binop("*", binop("*", delta, ref("A")), delta),
        {"dt": "b_dt", "dt_bias": "b_dt_bias", "A": "b_A"},
    )
    assert sum("b_dt + b_dt_bias" in line for line in lines) == 1
    assert sum("tl.log(" in line for line in lines) == 1
    assert result == lines[-1].split(" = ")[0]
    assert fold(binop("*", call("EXP", num(0.0)), num(2.0))) == 2.0
    assert to_triton(binop("/", num(1.0), num(8.0)), {}) == ([], "0.125")


def _evaluate_with_triton(expr: E.Expr, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Run `expr` of two [seq] inputs through the real prologue kernel skeleton."""
    spec = ir.Spec(
        name="probe",
        dims=(),
        tensors=(
            ir.Tensor(name="x", kind=ir.TensorKind.INPUT, shape=(ir.BATCH, ir.SEQ)),
            ir.Tensor(name="y", kind=ir.TensorKind.INPUT, shape=(ir.BATCH, ir.SEQ)),
        ),
        output=ir.Output(name="out", shape=(ir.BATCH, ir.SEQ, 1, 1)),
        mask=ir.Causal(),
        query=None,
        key=None,
        value=ref("x"),
    )
    kernel = elementwise("probe", spec, [Target(role="r", expr=expr, shape=(ir.BATCH, ir.SEQ))])
    source = render_stage("prologue", kernels=(kernel,), core={"r": "r"}, lti=None)
    module = load_source(
        "import torch\nimport triton\nimport triton.language as tl\n" + source, "probe"
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.full((1, x.numel()), math.nan, device=device)
    inputs = (x[None].to(device), y[None].to(device))
    module.probe_launch(inputs, {"batch": 1, "seq": x.numel()}, out)
    return out[0].cpu()


WIDE = torch.cat(
    [
        torch.linspace(-100, 100, 401),
        torch.logspace(-12, 1.5, 60),
        -torch.logspace(-12, 1.5, 60),
        torch.tensor([0.0, 20.0, -20.0, 88.0]),
    ]
)
POSITIVE = torch.rand(WIDE.shape, generator=torch.Generator().manual_seed(0)) * 3 + 0.25

CASES = {
    "softplus": (call("SOFTPLUS", ref("x")), None),
    "logsigmoid": (call("LOGSIGMOID", ref("x")), None),
    "sigmoid": (call("SIGMOID", ref("x")), None),
    "silu": (call("SILU", ref("x")), None),
    "tanh": (call("TANH", ref("x")), None),
    "exp": (call("EXP", ref("x")), 80.0),
    "log": (call("LOG", ref("y")), None),
    "sqrt": (call("SQRT", ref("y")), None),
    "abs": (call("ABS", ref("x")), None),
    "min": (call("MIN", ref("x"), ref("y")), None),
    "max": (call("MAX", ref("x"), num(-1.5)), None),
    "clamp_open": (call("CLAMP", ref("x"), num(0.0), num(math.inf)), None),
    "clamp": (call("CLAMP", ref("x"), num(-1.5), ref("y")), None),
    "neg_div": (binop("/", E.Neg(operand=ref("x")), ref("y")), None),
    "pow_int": (binop("**", ref("x"), num(3.0)), None),
    "pow_neg": (binop("**", ref("y"), num(-2.0)), None),
    "pow_half": (binop("**", ref("y"), num(0.5)), None),
    "pow_zero": (binop("**", ref("x"), num(0.0)), None),
    "pow_tensor": (binop("**", ref("y"), ref("x")), 10.0),
    "constant": (call("SOFTPLUS", num(2.0)), None),
    "mamba_delta": (
        binop(
            "*",
            call(
                "CLAMP", call("SOFTPLUS", binop("+", ref("x"), ref("y"))), num(0.0), num(math.inf)
            ),
            num(-0.5),
        ),
        None,
    ),
}


@pytest.mark.interpret
@pytest.mark.parametrize("case", sorted(CASES))
def test_functions_match_torch_in_fp64(case: str) -> None:
    expr, limit = CASES[case]
    x = WIDE.clamp(-limit, limit) if limit is not None else WIDE.clone()
    y = POSITIVE.clone()
    got = _evaluate_with_triton(expr, x, y)
    env = {"x": (x.double(), ("t",)), "y": (y.double(), ("t",))}
    want = evaluate(expr, env, {}, ("t",)).expand(x.shape)
    assert not got.isnan().any(), "every element is written and finite where torch is"
    rel = ((got.double() - want).norm() / want.norm()).item()
    assert rel <= 1e-5, f"{case}: ‖out − ref‖/‖ref‖ = {rel:.2e}"
    # Elementwise, too: the expansions are accurate per value, not only in norm.
    close = (got.double() - want).abs() <= 1e-5 * want.abs() + 1e-30
    assert close.float().mean() > 0.999, f"{case}: {(~close).sum()} values off"
