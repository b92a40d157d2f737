"""expr_grad: derivatives of the expression AST against torch autograd, in fp64 through the
torch evaluator (every rule, ties at non-smooth points as torch breaks them) and printed to
Triton through an elementwise kernel under the interpreter (relative error ≤ 1e-5)."""

from __future__ import annotations

import math

import pytest
import torch

from ssmc import expr as E
from ssmc import ir
from ssmc.elementwise import Target, elementwise
from ssmc.expr_grad import ONE, ZERO, Gradients, Step
from ssmc.expr_torch import evaluate
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


WIDE = torch.cat(
    [
        torch.linspace(-30, 30, 241),
        torch.logspace(-8, 1.2, 40),
        -torch.logspace(-8, 1.2, 40),
        torch.tensor([0.0, -1.5, 1.0]),
    ]
).double()
POSITIVE = (torch.rand(WIDE.shape, generator=torch.Generator().manual_seed(1)) * 3 + 0.25).double()

CASES = {
    "softplus": call("SOFTPLUS", ref("x")),
    "logsigmoid": call("LOGSIGMOID", ref("x")),
    "sigmoid": call("SIGMOID", ref("x")),
    "silu": call("SILU", ref("x")),
    "tanh": call("TANH", ref("x")),
    "exp": call("EXP", binop("*", ref("x"), num(0.1))),
    "log": call("LOG", ref("y")),
    "sqrt": call("SQRT", ref("y")),
    "abs": call("ABS", ref("x")),
    "min": call("MIN", ref("x"), ref("y")),
    "max": call("MAX", ref("x"), num(-1.5)),
    "max_tie": call("MAX", ref("x"), ref("x")),
    "clamp_open": call("CLAMP", ref("x"), num(0.0), num(math.inf)),
    "clamp_neg_inf": call("CLAMP", ref("x"), E.Neg(operand=num(math.inf)), num(1.0)),
    "clamp": call("CLAMP", ref("x"), num(-1.5), ref("y")),
    "clamp_crossed": call("CLAMP", ref("x"), ref("y"), binop("-", ref("y"), num(1.0))),
    "neg_div": binop("/", E.Neg(operand=ref("x")), ref("y")),
    "sub_mul": binop("-", binop("*", ref("x"), ref("y")), binop("*", ref("y"), ref("y"))),
    "pow_int": binop("**", ref("x"), num(3.0)),
    "pow_neg": binop("**", ref("y"), num(-2.0)),
    "pow_half": binop("**", ref("y"), num(0.5)),
    "pow_zero": binop("**", ref("x"), num(0.0)),
    "pow_tensor": binop("**", ref("y"), binop("*", ref("x"), num(0.1))),
    "mamba_delta": binop(
        "*",
        call("CLAMP", call("SOFTPLUS", binop("+", ref("x"), ref("y"))), num(0.0), num(math.inf)),
        num(-0.5),
    ),
    "gla_gate": binop("/", call("LOGSIGMOID", ref("x")), num(16.0)),
}


def autograd(expr: E.Expr, wrt: str) -> torch.Tensor:
    """∂expr/∂wrt per element by torch autograd of the torch evaluator, fp64."""
    x, y = WIDE.clone().requires_grad_(), POSITIVE.clone().requires_grad_()
    value = evaluate(expr, {"x": (x, ("t",)), "y": (y, ("t",))}, {}, ("t",))
    (grad,) = torch.autograd.grad(value.sum(), {"x": x, "y": y}[wrt], allow_unused=True)
    return torch.zeros_like(WIDE) if grad is None else grad


def evaluate_derivative(expr: E.Expr, steps: tuple[Step, ...]) -> torch.Tensor:
    """A derivative AST evaluated by the torch evaluator, each `@step` bound to its indicator."""
    env = {"x": (WIDE, ("t",)), "y": (POSITIVE, ("t",))}
    for step in steps:
        lhs, rhs = (evaluate(side, env, {}, ("t",)) for side in (step.lhs, step.rhs))
        env[step.name] = ((lhs > rhs if step.strict else lhs >= rhs).double(), ("t",))
    return evaluate(expr, env, {}, ("t",)).expand(WIDE.shape)


@pytest.mark.parametrize("wrt", ["x", "y"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_derivatives_match_autograd(case: str, wrt: str) -> None:
    """fp64, per value, to 1e-8 relative (1e-12 absolute): torch's own backward formulas are
    that far from exact here (tanh′ as 1 − tanh², softplus = x past its threshold 20)."""
    grads = Gradients()
    derivative = grads.derivative(CASES[case], wrt)
    got = evaluate_derivative(derivative, grads.steps)
    want = autograd(CASES[case], wrt)
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-12), case


def test_derivatives_are_simplified() -> None:
    grads = Gradients()
    scaled = binop("*", ref("q"), num(0.125))
    assert grads.derivative(scaled, "q") == num(0.125)
    assert grads.derivative(scaled, "k") == ZERO
    assert grads.derivative(ref("q"), "q") == ONE
    delta = call("CLAMP", call("SOFTPLUS", ref("dt")), num(0.0), num(math.inf))
    grads.derivative(delta, "dt")
    # one indicator, [softplus(dt) ≥ 0]: the infinite upper bound adds none
    assert len(grads.steps) == 1 and not grads.steps[0].strict
    # shared: the same indicator again is not a new one
    grads.derivative(binop("*", delta, ref("A")), "dt")
    assert len(grads.steps) == 1


def test_spans_do_not_reach_derivatives() -> None:
    span = E.Span(line=1, column=1, end_line=1, end_column=2)
    expr = call("SIGMOID", E.Ref(name="z", span=span))
    assert Gradients().derivative(expr, "z") == Gradients().derivative(
        call("SIGMOID", ref("z")), "z"
    )


def _triton_derivative(expr: E.Expr, wrt: str) -> torch.Tensor:
    """∂expr/∂wrt printed into a backward elementwise kernel and run on WIDE, POSITIVE."""
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
    grads = Gradients()
    target = Target(role="d", expr=grads.derivative(expr, wrt), shape=(ir.BATCH, ir.SEQ))
    kernel = elementwise("probe", spec, [target], steps=grads.steps, direction="bwd")
    assert kernel.kernel == "probe_bwd_kernel" and kernel.launcher == "probe_bwd_launch"
    source = render_stage("prologue", kernels=(kernel,), core={"d": "d"}, lti=None)
    module = load_source(
        "import torch\nimport triton\nimport triton.language as tl\n" + source, f"grad_{wrt}"
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.full((1, WIDE.numel()), math.nan, device=device)
    inputs = (WIDE.float()[None].to(device), POSITIVE.float()[None].to(device))
    module.probe_bwd_launch(inputs, {"batch": 1, "seq": WIDE.numel()}, out)
    return out[0].cpu()


TRITON_CASES = [
    ("softplus", "x"),
    ("logsigmoid", "x"),
    ("sigmoid", "x"),
    ("silu", "x"),
    ("tanh", "x"),
    ("abs", "x"),
    ("clamp", "x"),
    ("clamp", "y"),
    ("min", "y"),
    ("max_tie", "x"),
    ("neg_div", "y"),
    ("pow_half", "y"),
    ("pow_tensor", "x"),
    ("mamba_delta", "x"),
]


@pytest.mark.interpret
@pytest.mark.parametrize(("case", "wrt"), TRITON_CASES, ids=[f"{c}-{w}" for c, w in TRITON_CASES])
def test_printed_derivatives_match_autograd(case: str, wrt: str) -> None:
    """fp32 kernels: 1e-5 in norm, and per value (the expansions are stable: σ′ = σ(u)σ(−u),
    tanh′ = 4σ(2u)σ(−2u), no 1 − tanh² cancellation)."""
    got = _triton_derivative(CASES[case], wrt).double()
    want = autograd(CASES[case], wrt)
    assert not got.isnan().any()
    scale = want.norm().item()
    assert (got - want).norm().item() <= 1e-5 * scale + 1e-30, case
    close = (got - want).abs() <= 1e-5 * want.abs() + 1e-6 * want.abs().max() + 1e-30
    assert close.float().mean() > 0.995, f"{case}: {(~close).sum()} values off"
