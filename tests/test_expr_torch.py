"""Expressions evaluate with torch, broadcasting by axis name."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssmc import ir
from ssmc.expr import BinOp, Call, Func, Neg, Num, Op, Ref
from ssmc.expr_torch import evaluate, evaluate_named, squeeze_literals

F64 = torch.float64


def ref(name: str) -> Ref:
    return Ref(name=name)


def call(func: Func, *args) -> Call:
    return Call(func=func, args=tuple(args))


@pytest.fixture
def env(gen):
    """dt [b, T, H], A [H, N], x [b, T, H, P], g [b, T, H] with b=2, T=3, H=4, N=5, P=6."""
    return {
        "dt": (torch.randn(2, 3, 4, dtype=F64, generator=gen), ("batch", "seq", "H")),
        "A": (torch.randn(4, 5, dtype=F64, generator=gen), ("H", "N")),
        "x": (torch.randn(2, 3, 4, 6, dtype=F64, generator=gen), ("batch", "seq", "H", "P")),
        "g": (torch.randn(2, 3, 4, dtype=F64, generator=gen), ("batch", "seq", "H")),
    }


def test_broadcast_by_name(env) -> None:
    """dt [batch, seq, H] * A [H, N] has axes {batch, seq, H, N}."""
    out = evaluate(
        BinOp(op=Op.MUL, lhs=ref("dt"), rhs=ref("A")), env, {}, ("batch", "seq", "H", "N")
    )
    dt, A = env["dt"][0], env["A"][0]
    assert out.shape == (2, 3, 4, 5)
    torch.testing.assert_close(out, dt[..., None] * A, rtol=0, atol=0)


def test_out_axes_permute_and_unsqueeze(env) -> None:
    """Axes the expression lacks come out as size 1; present ones follow out_axes order."""
    out = evaluate(ref("A"), env, {}, ("batch", "seq", "N", "H"))
    assert out.shape == (1, 1, 5, 4)
    torch.testing.assert_close(out[0, 0], env["A"][0].T, rtol=0, atol=0)


def test_extra_axis_is_an_error(env) -> None:
    with pytest.raises(ValueError, match="N"):
        evaluate(ref("A"), env, {}, ("H",))


def test_named_axes_in_order_of_appearance(env) -> None:
    _, axes = evaluate_named(BinOp(op=Op.ADD, lhs=ref("A"), rhs=ref("x")), env, {})
    assert axes == ("H", "N", "batch", "seq", "P")


UNARY = {
    Func.EXP: torch.exp,
    Func.LOG: lambda t: torch.log(t.abs()),
    Func.SOFTPLUS: F.softplus,
    Func.SIGMOID: torch.sigmoid,
    Func.LOGSIGMOID: F.logsigmoid,
    Func.SILU: F.silu,
    Func.TANH: torch.tanh,
    Func.SQRT: lambda t: torch.sqrt(t.abs()),
    Func.ABS: torch.abs,
}


@pytest.mark.parametrize("func", list(UNARY), ids=[f.value for f in UNARY])
def test_unary_functions(env, func: Func) -> None:
    arg = call(Func.ABS, ref("g")) if func in (Func.LOG, Func.SQRT) else ref("g")
    out = evaluate(call(func, arg), env, {}, ("batch", "seq", "H"))
    torch.testing.assert_close(out, UNARY[func](env["g"][0]), rtol=1e-15, atol=0)


def test_clamp_with_infinite_bound(env) -> None:
    expr = call(Func.CLAMP, ref("g"), Num(value=0.0), Num(value=math.inf))
    out = evaluate(expr, env, {}, ("batch", "seq", "H"))
    torch.testing.assert_close(out, env["g"][0].clamp(min=0), rtol=0, atol=0)


def test_clamp_with_tensor_bounds(env) -> None:
    expr = call(Func.CLAMP, ref("dt"), Neg(operand=ref("g")), Num(value=0.5))
    out = evaluate(expr, env, {}, ("batch", "seq", "H"))
    expected = torch.minimum(
        torch.maximum(env["dt"][0], -env["g"][0]), torch.tensor(0.5, dtype=F64)
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize(("func", "op"), [(Func.MIN, torch.minimum), (Func.MAX, torch.maximum)])
def test_min_max_broadcast(env, func: Func, op) -> None:
    out = evaluate(call(func, ref("dt"), ref("A")), env, {}, ("batch", "seq", "H", "N"))
    torch.testing.assert_close(out, op(env["dt"][0][..., None], env["A"][0]), rtol=0, atol=0)


def test_arithmetic_pow_neg_and_dims(env) -> None:
    """-(x / sqrt(P)) ** 2 + dt - 1, with the dim P as a scalar."""
    scaled = BinOp(op=Op.DIV, lhs=ref("x"), rhs=call(Func.SQRT, ref("P")))
    expr = BinOp(
        op=Op.SUB,
        lhs=BinOp(
            op=Op.ADD,
            lhs=Neg(operand=BinOp(op=Op.POW, lhs=scaled, rhs=Num(value=2.0))),
            rhs=ref("dt"),
        ),
        rhs=Num(value=1.0),
    )
    out = evaluate(expr, env, {"P": 6}, ("batch", "seq", "H", "P"))
    x, dt = env["x"][0], env["dt"][0]
    torch.testing.assert_close(
        out, -((x / math.sqrt(6)) ** 2) + dt[..., None] - 1, rtol=1e-15, atol=0
    )


def test_pow_with_tensor_exponent(env) -> None:
    expr = BinOp(op=Op.POW, lhs=call(Func.ABS, ref("g")), rhs=ref("dt"))
    out = evaluate(expr, env, {}, ("batch", "seq", "H"))
    torch.testing.assert_close(out, env["g"][0].abs() ** env["dt"][0], rtol=1e-15, atol=0)


def test_repeated_axis_names_align_by_occurrence(gen) -> None:
    """A dense [H, N, N] keeps both N axes when scaled by a [H] tensor."""
    A = torch.randn(4, 3, 3, dtype=F64, generator=gen)
    dt = torch.rand(4, dtype=F64, generator=gen)
    env = {"A": (A, ("H", "N", "N")), "dt": (dt, ("H",))}
    out = evaluate(BinOp(op=Op.MUL, lhs=ref("dt"), rhs=ref("A")), env, {}, ("H", "N", "N"))
    torch.testing.assert_close(out, dt[:, None, None] * A, rtol=0, atol=0)


def test_constant_keeps_tensor_dtype(env) -> None:
    """Numbers are 0-dim: they never promote a tensor's dtype."""
    env32 = {k: (t.float(), axes) for k, (t, axes) in env.items()}
    out = evaluate(
        BinOp(op=Op.MUL, lhs=ref("x"), rhs=Num(value=0.125)), env32, {}, ("batch", "seq", "H", "P")
    )
    assert out.dtype == torch.float32


def test_squeeze_literals() -> None:
    """B : [batch, seq, 1, N] is seen with axes (batch, seq, N)."""
    decl = ir.Tensor(name="B", kind=ir.TensorKind.INPUT, shape=("batch", "seq", 1, "N"))
    value, axes = squeeze_literals(decl, torch.ones(2, 3, 1, 5))
    assert axes == ("batch", "seq", "N") and value.shape == (2, 3, 5)


def test_gradients_flow(env) -> None:
    """softplus(dt + bias) * A is differentiable in every input (fp64 gradcheck)."""
    dt = env["dt"][0].clone().requires_grad_()
    A = env["A"][0].clone().requires_grad_()
    expr = BinOp(op=Op.MUL, lhs=call(Func.SOFTPLUS, ref("dt")), rhs=ref("A"))

    def f(dt, A):
        e = {"dt": (dt, ("batch", "seq", "H")), "A": (A, ("H", "N"))}
        return evaluate(expr, e, {}, ("batch", "seq", "H", "N"))

    assert torch.autograd.gradcheck(f, (dt, A))
