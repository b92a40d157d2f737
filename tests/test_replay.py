"""Decode calls replayed from their recorded launches (ssmc.replay, SsmcOp._run_recorded):
after a decode call of a layout whose every launch reached a compiled kernel's runner, later
calls of that layout run only the runners, with their own tensors in the recorded slots, and
agree with the fp64 reference; anything that changes what the launches would be (strides,
dtypes, an unaligned input, gradients, an asked form, offsets) takes the whole path.

Triton's JIT needs a GPU, so on the CPU the decode kernel is wrapped as on a GPU
(_FastKernel) around a stand-in whose compiled kernel's runner interprets the launch with
every argument in signature order, as Triton's runner takes them; on a GPU the real kernels
run (the `gpu` test)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch

from ssmc.load import load
from ssmc.pipeline import parse_file, with_dims
from ssmc.reference import random_inputs, reference
from ssmc.replay import Replay

ROOT = Path(__file__).resolve().parent.parent
DIMS = {"H": 4, "G": 2, "N": 6, "P": 3}

pytestmark = pytest.mark.interpret


class Param:
    def __init__(self, name: str, default: Any) -> None:
        self.name, self.default = name, default


class InterpretedJit:
    """A JIT function as _FastKernel sees one, run by Triton's interpreter; counts the
    launches that took Triton's path (`slow`) and those that reached the runner (`fast`)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        signature = inspect.signature(fn.fn)
        self.arg_names = list(signature.parameters)
        self.params = [Param(p.name, p.default) for p in signature.parameters.values()]
        self.constexprs = [i for i, p in enumerate(signature.parameters.values())
                           if "constexpr" in str(p.annotation)]
        self.slow = 0
        self.fast = 0

    def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        self.slow += 1
        if not warmup:
            self.fn[grid](*args, **kwargs)
        return Compiled(self)


class Compiled:
    def __init__(self, jit: InterpretedJit) -> None:
        self.jit = jit

    def __getitem__(self, grid: Any) -> Any:
        def runner(*args: Any) -> None:
            self.jit.fast += 1
            self.jit.fn[grid](*args)

        return runner


@pytest.fixture
def op(monkeypatch: pytest.MonkeyPatch) -> Any:
    """mamba2's op with its decode kernel launched as on a GPU (fast launch on) and every
    torch.empty poisoned with NaN, so an element a replay does not write fails the check."""
    if torch.cuda.is_available():
        pytest.skip("the stand-in wraps the interpreter; on a GPU the gpu test runs")
    op = load(with_dims(parse_file(ROOT / "examples" / "mamba2.ssm"), DIMS))
    module = op.module
    jit = InterpretedJit(module.decode_fwd_kernel)
    monkeypatch.setattr(module, "decode_fwd_kernel", module._FastKernel(jit))
    monkeypatch.setattr(module, "_FAST_LAUNCH", [True])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    empty = torch.empty

    def poisoned(*shape: Any, **kw: Any) -> torch.Tensor:
        t = empty(*shape, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)
    op.jit = jit
    return op


def _step(op: Any, gen: torch.Generator, batch: int = 2) -> dict[str, torch.Tensor]:
    """Fresh one-token inputs with an initial state, fp32."""
    inputs = random_inputs(op.checked, batch=batch, seqlen=1, generator=gen)
    return {k: v.float() for k, v in inputs.items()}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def _agrees(op: Any, inputs: dict[str, torch.Tensor]) -> None:
    y, state = op(**inputs)
    y_ref, state_ref = reference(op.checked)(**{k: v.double() for k, v in inputs.items()})
    assert op.last_form == "decode"
    assert not y.isnan().any() and not state.isnan().any()
    assert _rel(y, y_ref) < 1e-5 and _rel(state, state_ref) < 1e-5


def test_later_calls_of_a_layout_run_only_the_recorded_launch(op: Any, gen: torch.Generator,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _agrees(op, _step(op, gen))  # Triton's path (a first launch key): not replayable
    assert not op._replays and op.jit.slow == 1
    _agrees(op, _step(op, gen))  # through the runner: recorded
    assert len(op._replays) == 1 and op.jit.fast == 1
    ran = []
    monkeypatch.setattr(op.module, "_ssmc_run", lambda *a, **k: ran.append(a))
    for _ in range(3):
        _agrees(op, _step(op, gen))  # fresh inputs each time, outputs poisoned
    assert not ran and op.jit.slow == 1 and op.jit.fast == 4


def test_a_replayed_call_reads_the_inputs_it_is_given(op: Any, gen: torch.Generator) -> None:
    """The recorded call's tensors are not kept: an input rewritten in place is read anew."""
    inputs = _step(op, gen)
    for _ in range(2):
        op(**inputs)
    assert op._replays
    y_before, _ = op(**inputs)
    inputs["x"].mul_(-2.0)
    _agrees(op, inputs)
    assert _rel(op(**inputs)[0], y_before) > 0.1


@pytest.mark.parametrize(
    "change",
    [
        "strides",  # x a strided view: other strides in the launch
        "dtype",  # B in fp64: another specialisation
        "batch",  # other sizes
        "unaligned",  # x 4 bytes off a 16-byte boundary
        "grad",  # gradients wanted: the autograd path
        "form",  # an asked form
        "no_state",  # initial_state left out
    ],
)
def test_a_change_of_layout_takes_the_whole_path(op: Any, gen: torch.Generator, change: str) -> None:
    for _ in range(2):
        op(**_step(op, gen))
    assert len(op._replays) == 1
    slow, fast = op.jit.slow, op.jit.fast
    inputs = _step(op, gen, batch=3 if change == "batch" else 2)
    kwargs: dict[str, Any] = {}
    if change == "strides":
        inputs["x"] = torch.cat([inputs["x"], inputs["x"]], dim=-1)[..., : inputs["x"].shape[-1]]
    elif change == "dtype":
        inputs["B"] = inputs["B"].double()
    elif change == "unaligned":
        flat = torch.randn(inputs["x"].numel() + 1, generator=gen)
        inputs["x"] = flat[1:].view(inputs["x"].shape)
    elif change == "grad":
        inputs["x"].requires_grad_()
    elif change == "form":
        kwargs["form"] = "recurrent"
    elif change == "no_state":
        del inputs["initial_state"]
    ran = []
    module = op.module
    original = module._ssmc_run
    module._ssmc_run = lambda *a, **k: ran.append(1) or original(*a, **k)
    try:
        y, state = op(**inputs, **kwargs)
    finally:
        module._ssmc_run = original
    assert ran, "the whole path ran"
    if change not in ("form", "grad"):  # these still launch the decode kernel
        assert op.jit.slow + op.jit.fast > slow + fast
    y_ref, state_ref = reference(op.checked)(**{k: v.double().detach() for k, v in inputs.items()})
    assert _rel(y.detach(), y_ref) < 1e-5 and _rel(state.detach(), state_ref) < 1e-5


def test_a_call_with_a_tensor_given_twice_is_not_replayed(op: Any, gen: torch.Generator) -> None:
    """x passed as z too: one tensor in two slots would be ambiguous; every call takes the path."""
    for _ in range(3):
        inputs = _step(op, gen)
        inputs["z"] = inputs["x"]
        _agrees(op, inputs)
    assert not op._replays


def test_a_launch_of_a_tensor_made_inside_the_call_is_not_kept() -> None:
    made = torch.zeros(4)
    x, out = torch.zeros(4), torch.zeros(4)
    launch = (lambda *a: None, (x, made, 4))
    assert Replay.build([x], [out], [launch]) is None
    assert Replay.build([x], [out], [(launch[0], (x, out, 4))]) is not None
    assert Replay.build([x, x], [out], [(launch[0], (x, out, 4))]) is None  # given twice
    assert Replay.build([x], [out.t() if out.dim() > 1 else out[::2]], []) is None  # not contiguous


def test_without_fast_launch_nothing_is_recorded(op: Any, gen: torch.Generator) -> None:
    """Under the interpreter (TRITON_INTERPRET=1, as in CI) the fast launcher is off."""
    op.module._FAST_LAUNCH[0] = False
    for _ in range(4):
        _agrees(op, _step(op, gen))
    assert not op._replays and op.jit.fast == 0


@pytest.mark.gpu
def test_replayed_decode_steps_on_the_gpu_equal_the_reference(gen: torch.Generator) -> None:
    op = load(with_dims(parse_file(ROOT / "examples" / "mamba2.ssm"), DIMS))
    for step in range(6):
        inputs = {k: v.cuda() for k, v in _step(op, gen).items()}
        y, state = op(**inputs)
        y_ref, state_ref = reference(op.checked)(**{k: v.double() for k, v in inputs.items()})
        assert _rel(y, y_ref) < 1e-5 and _rel(state, state_ref) < 1e-5, f"step {step}"
    assert op._replays, "a decode layout seen six times is replayed"
