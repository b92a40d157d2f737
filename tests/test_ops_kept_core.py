"""ops: the core kept for the backward (`keep_core`). Where the gate's gradient reads y before
the output roles, an eager call that needs gradients keeps it from the forward: the backward
then runs no forward again, gives the gradients the recomputing backward gives, and frees the
kept y once read. Interpreter sizes; fp32, so the two paths agree to rounding."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

from ssmc.load import load
from ssmc.pipeline import parse_file, with_dims
from ssmc.reference import random_inputs

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GATED = {
    "mamba2": {"H": 4, "G": 2, "N": 8, "P": 4},
    "mamba1": {"H": 4, "N": 8},
}
CASES = [(name, form) for name in GATED for form in ("chunked", "recurrent")]


def _op_and_inputs(name: str, seed: int) -> tuple[Any, dict[str, torch.Tensor]]:
    checked = with_dims(parse_file(ROOT / "examples" / f"{name}.ssm"), GATED[name])
    op = load(checked)
    gen = torch.Generator().manual_seed(seed)
    inputs = random_inputs(checked, batch=2, seqlen=40, generator=gen, dtype=torch.float32)
    return op, {k: v.to(DEVICE) for k, v in inputs.items()}


def _grads(op: Any, inputs: dict[str, torch.Tensor], dy: torch.Tensor, form: str,
           retain: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of ⟨y, dy⟩ twice from one graph: the first backward reads the kept core, the
    second (retain_graph) has none left and runs the forward again."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, _ = op(**leaves, form=form, chunk_size=16)
    loss = (y * dy).sum()
    first = torch.autograd.grad(loss, list(leaves.values()), retain_graph=retain)
    second = torch.autograd.grad(loss, list(leaves.values())) if retain else []
    return list(first), list(second)


@pytest.mark.interpret
@pytest.mark.parametrize(("name", "form"), CASES)
def test_a_kept_core_gives_the_gradients_of_the_recomputed_forward(name: str, form: str) -> None:
    op, inputs = _op_and_inputs(name, seed=len(name) * 7 + len(form))
    assert op.module.KEEPS_CORE
    gen = torch.Generator().manual_seed(3)
    y_shape = op(**inputs, form=form, chunk_size=16)[0].shape
    dy = torch.randn(y_shape, generator=gen).to(DEVICE)
    kept, recomputed = _grads(op, inputs, dy, form, retain=True)
    for name_, a, b in zip(inputs, kept, recomputed, strict=True):
        err = float((a - b).norm() / b.norm().clamp_min(1e-30))
        assert err < 1e-6, (name, form, name_, err)


@pytest.mark.interpret
@pytest.mark.parametrize("name", list(GATED))
def test_the_backward_runs_no_forward_and_frees_the_kept_core(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    op, inputs = _op_and_inputs(name, seed=11)
    module = op.module
    kept: list[weakref.ref[torch.Tensor]] = []
    run, core_fwd = module._ssmc_run, module._core_fwd
    forwards: list[str] = []

    def spy_run(*args: Any, keep_core: bool = False, **kwargs: Any) -> Any:
        result = run(*args, keep_core=keep_core, **kwargs)
        if keep_core:
            assert result[2] is not None and result[2].shape == result[0].shape
            kept.append(weakref.ref(result[2]))
        return result

    def spy_core_fwd(*args: Any, **kwargs: Any) -> Any:
        forwards.append("core")
        return core_fwd(*args, **kwargs)

    monkeypatch.setattr(module, "_ssmc_run", spy_run)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y, _ = op(**leaves, form="chunked", chunk_size=16)
    # on a GPU the first call of a kind runs once compile-only (its core is dropped at once)
    assert kept and kept[-1]() is not None
    monkeypatch.setattr(module, "_core_fwd", spy_core_fwd)
    y.sum().backward()
    assert forwards == []  # the gate's gradient read the kept y
    gc.collect()
    assert kept[-1]() is None  # freed, though the graph's y and inputs live on
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves.values())


@pytest.mark.interpret
def test_calls_without_gradients_keep_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    op, inputs = _op_and_inputs("mamba2", seed=5)
    asked: list[bool] = []
    run = op.module._ssmc_run

    def spy_run(*args: Any, keep_core: bool = False, **kwargs: Any) -> Any:
        asked.append(keep_core)
        return run(*args, keep_core=keep_core, **kwargs)

    monkeypatch.setattr(op.module, "_ssmc_run", spy_run)
    op(**inputs, form="chunked", chunk_size=16)
    with torch.no_grad():
        op(**{k: v.requires_grad_() for k, v in inputs.items()}, form="chunked", chunk_size=16)
    # (on a GPU the first call of a kind also runs once compile-only: a third, unkept call)
    assert len(asked) >= 2 and not any(asked), asked
