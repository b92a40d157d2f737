"""Quasiseparable (bidirectional, Hydra-like) masks: the dense fp64 reference against the
definition written as loops, the op (forward pass + flipped backward pass − diagonal) in
every form under the interpreter with gradients, non-causality, refused flags."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ssmc.errors import SpecError
from ssmc.load import load
from ssmc.pipeline import parse, parse_file, with_dims

ref = importlib.import_module("ssmc.reference")
ROOT = Path(__file__).resolve().parent.parent
SMALL = {"H": 2, "G": 1, "N": 4, "P": 4}


def hydra():  # type: ignore[no-untyped-def]
    return with_dims(parse_file(ROOT / "examples" / "hydra.ssm"), SMALL)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not a.isnan().any()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("groups", [1, 2])
def test_reference_is_the_quasiseparable_definition(groups: int, gen) -> None:  # type: ignore[no-untyped-def]
    """y_i = Σ_j L_ij (C_i·B_j) x̄_j + D x_i, then the gate, with L written as products;
    head h reads group h // (H // G) of B and C."""
    checked = with_dims(hydra(), {"H": 4, "G": groups})
    t = ref.random_inputs(checked, batch=1, seqlen=5, generator=gen)
    y, state = ref.reference(checked)(**t)
    assert state is None
    delta = F.softplus(t["dt"] + t["dt_bias"])[0]       # [T, H]
    a = (-delta * t["A_log"].exp()).exp()
    b = (-delta * t["A_log_back"].exp()).exp()
    x, B, C = t["x"][0], t["B"][0], t["C"][0]
    want = torch.zeros_like(x)
    T = x.shape[0]
    for h in range(4):
        g = h // (4 // groups)
        for i in range(T):
            for j in range(T):
                if i >= j:
                    L = math.prod(a[k, h].item() for k in range(j + 1, i + 1))
                else:
                    L = math.prod(b[k, h].item() for k in range(i, j))
                want[i, h] += L * (C[i, g] @ B[j, g]) * delta[j, h] * x[j, h]
    want = (want + t["D"][:, None] * x) * F.silu(t["z"][0])
    assert rel(y[0], want) < 1e-12


def test_the_mask_is_not_causal(gen) -> None:  # type: ignore[no-untyped-def]
    """A change at the last token moves every output (a causal mask moves only the last)."""
    checked = hydra()
    t = ref.random_inputs(checked, batch=1, seqlen=6, generator=gen)
    y, _ = ref.reference(checked)(**t)
    t["x"] = t["x"].clone()
    t["x"][:, -1] += 1.0
    y2, _ = ref.reference(checked)(**t)
    assert ((y2 - y).abs().amax(dim=(2, 3))[0] > 0).all()


@pytest.mark.interpret
@pytest.mark.parametrize(("form", "groups"), [("recurrent", 1), ("quadratic", 1),
                                             ("chunked", 1), ("chunked", 2)])
def test_op_and_gradients_match_the_dense_reference(form: str, groups: int, gen) -> None:  # type: ignore[no-untyped-def]
    checked = with_dims(hydra(), {"H": 4, "G": groups}) if groups > 1 else hydra()
    op = load(checked)
    t = ref.random_inputs(checked, batch=2, seqlen=19, generator=gen)
    want_leaves = {k: v.clone().requires_grad_() for k, v in t.items()}
    want, _ = ref.reference(checked)(**want_leaves)
    leaves = {k: v.float().requires_grad_() for k, v in t.items()}
    y, state = op(**leaves, form=form, chunk_size=8 if form == "chunked" else None)
    assert state is None and rel(y, want) <= 1e-5
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (want * dy).sum().backward()
    (y * dy.float()).sum().backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None
        assert rel(leaf.grad, want_leaves[name].grad) <= 1e-4, name


@pytest.mark.parametrize("flag", ["initial_state", "final_state", "varlen"])
def test_state_flags_are_refused_where_the_mask_is(flag: str) -> None:
    text = (ROOT / "examples" / "hydra.ssm").read_text() + f"\n{flag}\n"
    with pytest.raises(SpecError) as info:
        parse(text, "hydra.ssm")
    rendered = info.value.render()
    assert f"so no `{flag}`" in rendered and rendered.startswith("hydra.ssm:21:1: error:")


def test_default_backward_decay_and_scale() -> None:
    text = (ROOT / "examples" / "hydra.ssm").read_text()
    text = text.replace(", log_a_backward = -delta * exp(A_log_back))", ")").replace(
        "param A_log_back : [H]\n", "")
    checked = parse(text.replace("mask quasiseparable", "mask 2 * quasiseparable"))
    fwd, bwd = checked.pieces
    assert fwd.spec.mask == bwd.spec.mask
    from ssmc.expr import show

    assert show(fwd.spec.value) == "(x * softplus(dt + dt_bias)) * 2"
