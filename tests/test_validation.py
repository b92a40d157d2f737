"""Tensor validation: every op refuses bad tensors with a TensorError before launching.

Each case calls an op from `ssmc.load(...)` on CPU with one thing wrong and expects
`ssmc.errors.TensorError` whose message names the tensor, what was expected and what
came. The generated module's `forward` is replaced by a guard for the bad call, so a
case that slipped past validation fails the test instead of launching a kernel on bad
offsets (which corrupts memory: see test_cu_seqlens_values_are_checked_on_every_call).
"""

from __future__ import annotations

import functools
import importlib
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import ssmc
from ssmc.errors import TensorError
from ssmc.ops import SsmcOp
from ssmc.pipeline import parse, parse_file, with_dims
from ssmc.reference import random_inputs

ROOT = Path(__file__).resolve().parent.parent
B, T = 1, 10
CU = torch.tensor([0, 4, 10], dtype=torch.int32)
CACHE = tempfile.TemporaryDirectory(prefix="ssmc-validation-")
"""One cache folder for the ops of this file, removed when the session ends."""

# Every dim bound at call time: head counts are only known when the op is called.
OPEN_DIMS = """\
ssm open_dims
dim H, G, N, P
input x  : [batch, seq, H, P]
input dt : [batch, seq, H]
input B  : [batch, seq, G, N]
input C  : [batch, seq, G, N]
param A  : [H]
output y : [batch, seq, H, P]
mask semiseparable(log_a = softplus(dt) * A)
query C
key   B
value x
initial_state
final_state
"""


class Launched(AssertionError):
    """The generated module was called although the tensors are invalid."""


@functools.cache
def mamba2() -> SsmcOp:
    """examples/mamba2.ssm (MVA, varlen, initial and final state), dims shrunk."""
    checked = with_dims(
        parse_file(ROOT / "examples" / "mamba2.ssm"), {"H": 4, "G": 2, "N": 8, "P": 4}
    )
    return ssmc.load(checked, cache_dir=CACHE.name)


@functools.cache
def open_dims() -> SsmcOp:
    return ssmc.load(parse(OPEN_DIMS), cache_dir=CACHE.name)


def good_inputs(op: SsmcOp, **dims: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = random_inputs(
        op.checked, batch=B, seqlen=T, dims=dims, dtype=torch.float32, generator=gen
    )
    out.pop("initial_state", None)
    return out


def initial_state(count: int = B) -> torch.Tensor:
    """A valid fp32 initial state of mamba2() for `count` sequences."""
    return torch.randn(count, 4, 8, 4)


@pytest.fixture
def guarded(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[SsmcOp], SsmcOp]]:
    """Make `op`'s generated module refuse to run: validation must stop the call first."""

    def guard(op: SsmcOp) -> SsmcOp:
        def forward(**kwargs: Any) -> Any:
            raise Launched("the op launched kernels on tensors that should have been refused")

        monkeypatch.setattr(op.module, "forward", forward)
        return op

    yield guard


def refused(op: SsmcOp, *patterns: str, **kwargs: Any) -> str:
    """Call `op` with `kwargs`; it must raise TensorError matching every pattern."""
    with pytest.raises(TensorError) as info:
        op(**kwargs)
    message = str(info.value)
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in:\n{message}"
    return message


def test_the_good_call_runs() -> None:
    op = mamba2()
    inputs = good_inputs(op)
    y, state = op(**inputs, initial_state=initial_state(2), cu_seqlens=CU)
    assert y.shape == (B, T, 4, 4) and state is not None and state.shape == (2, 4, 8, 4)
    assert torch.isfinite(y).all()


# --- shapes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "make", "patterns"),
    [
        (
            "x",
            lambda t: t[..., :3],
            [r"x: expected shape \[batch, seq, H=4, P=4\]", r"got \[1, 10, 4, 3\]"],
        ),
        ("x", lambda t: t[:, :, :2], [r"x: expected shape", r"got \[1, 10, 2, 4\]"]),
        ("x", lambda t: t[0], [r"x: expected 4 dims", r"got 3 dims \[10, 4, 4\]"]),
        ("x", lambda t: t[None], [r"x: expected 4 dims", r"got 5 dims"]),
        ("x", lambda t: torch.tensor(1.0), [r"x: expected 4 dims", r"got 0 dims \[\]"]),
        ("dt", lambda t: t[:, :7], [r"dt: expected shape \[batch, seq, H=4\]", r"got \[1, 7, 4\]"]),
        (
            "B",
            lambda t: t[..., :5],
            [r"B: expected shape \[batch, seq, G=2, N=8\]", r"got \[1, 10, 2, 5\]"],
        ),
        ("C", lambda t: torch.cat([t, t], dim=0), [r"C: expected shape", r"got \[2, 10, 2, 8\]"]),
        ("A", lambda t: t[None], [r"A: expected 1 dims \[H=4\]", r"got 2 dims \[1, 4\]"]),
        ("A", lambda t: t[:3], [r"A: expected shape \[H=4\] = \[4\]", r"got \[3\]"]),
        ("D", lambda t: torch.zeros(5), [r"D: expected shape \[H=4\]", r"got \[5\]"]),
        ("z", lambda t: t.transpose(2, 3)[..., :3], [r"z: expected shape", r"got \[1, 10, 4, 3\]"]),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_wrong_shape(
    name: str, make: Callable[[torch.Tensor], torch.Tensor], patterns: list[str], guarded
) -> None:  # type: ignore[no-untyped-def]
    op = guarded(mamba2())
    inputs = good_inputs(op)
    inputs[name] = make(inputs[name])
    refused(op, *patterns, **inputs)


def test_call_time_dims_must_agree(guarded) -> None:  # type: ignore[no-untyped-def]
    op = guarded(open_dims())
    inputs = good_inputs(op, H=4, G=2, N=8, P=4)
    inputs["C"] = inputs["C"][..., :6]  # N = 8 from B (declared first), 6 from C
    refused(op, r"C: expected shape \[batch, seq, G=2, N=8\]", r"got \[1, 10, 2, 6\]", **inputs)


@pytest.mark.parametrize(("H", "G"), [(4, 3), (6, 4), (5, 2)])
def test_head_counts_must_divide_at_call_time(H: int, G: int, guarded) -> None:  # type: ignore[no-untyped-def]
    op = guarded(open_dims())
    inputs = good_inputs(op, H=H, G=G, N=8, P=4)
    refused(op, rf"heads: G={G} does not divide the output head count H={H}", **inputs)


def test_head_count_error_names_the_tensors(guarded) -> None:  # type: ignore[no-untyped-def]
    op = guarded(open_dims())
    refused(op, r"\bC\b.*G=3", r"\bB\b.*G=3", **good_inputs(op, H=4, G=3, N=8, P=4))


@pytest.mark.parametrize(("dim", "carrier"), [("N", "B"), ("P", "x"), ("H", "x"), ("G", "B")])
def test_empty_call_time_dims(dim: str, carrier: str, guarded) -> None:  # type: ignore[no-untyped-def]
    """A call-time dim of size 0 is refused like a spec dim of 0 (dims lie in 1 … 2^24); it
    made the recurrent form divide by zero."""
    op = guarded(open_dims())
    inputs = good_inputs(op, **({"H": 4, "G": 2, "N": 8, "P": 4} | {dim: 0}))
    refused(op, rf"\b{carrier}: expected {dim} of at least 1, got {dim}=0 \(shape \[", **inputs)


@pytest.mark.parametrize("dim", ["N", "P"])
def test_generated_module_refuses_empty_dims(dim: str) -> None:
    """The generated `forward` on its own (as `ssmc compile` writes it) refuses a 0 dim too:
    the recurrent launcher divided by it."""
    op = open_dims()
    inputs = good_inputs(op, **({"H": 4, "G": 2, "N": 8, "P": 4} | {dim: 0}))
    with pytest.raises(ValueError, match=rf"the dim {dim} is 0 .*: dims are at least 1"):
        op.module.forward(**inputs, form="recurrent")


def test_head_counts_that_divide_run() -> None:
    op = open_dims()
    y, state = op(**good_inputs(op, H=6, G=3, N=8, P=4))
    assert y.shape == (B, T, 6, 4) and state is not None and torch.isfinite(y).all()


# --- dtypes and devices ---------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype",
    [
        torch.int32,
        torch.int64,
        torch.int8,
        torch.uint8,
        torch.bool,
        torch.complex64,
        torch.complex128,
    ],
)
@pytest.mark.parametrize("name", ["x", "dt", "A"])
def test_wrong_dtype(name: str, dtype: torch.dtype, guarded) -> None:  # type: ignore[no-untyped-def]
    op = guarded(mamba2())
    inputs = good_inputs(op)
    inputs[name] = inputs[name].to(dtype)
    refused(
        op, rf"{name}: expected dtype float16, bfloat16, float32 or float64, got {dtype}", **inputs
    )


@pytest.mark.parametrize("name", ["x", "B", "A", "dt_bias"])
def test_mixed_devices(name: str, guarded) -> None:  # type: ignore[no-untyped-def]
    op = guarded(mamba2())
    inputs = good_inputs(op)
    inputs[name] = inputs[name].to("meta")
    refused(op, "one device", rf"{name} on meta", r"x on (cpu|meta)", **inputs)


def test_initial_state_on_another_device(guarded) -> None:  # type: ignore[no-untyped-def]
    op = guarded(mamba2())
    refused(
        op,
        "one device",
        "initial_state on meta",
        **good_inputs(op),
        initial_state=initial_state().to("meta"),
    )


# --- cu_seqlens -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cu", "patterns"),
    [
        (
            torch.tensor([0, 7, 5, 10], dtype=torch.int32),
            [r"cu_seqlens: expected non-decreasing offsets, got \[0, 7, 5, 10\]"],
        ),
        (
            torch.tensor([2, 4, 10], dtype=torch.int64),
            [r"cu_seqlens: expected to start at 0, got 2"],
        ),
        (
            torch.tensor([0, 4, 9], dtype=torch.int32),
            [r"cu_seqlens: expected to end at seq = 10, got 9"],
        ),
        (torch.tensor([0, 4, 1000], dtype=torch.int32), [r"expected to end at seq = 10, got 1000"]),
        (torch.tensor([-4, 0, 10], dtype=torch.int32), [r"expected to start at 0, got -4"]),
        (
            torch.tensor([0.0, 4.0, 10.0]),
            [r"cu_seqlens: expected dtype int32 or int64, got torch.float32"],
        ),
        (
            torch.tensor([0, 4, 10], dtype=torch.int16),
            [r"expected dtype int32 or int64, got torch.int16"],
        ),
        (torch.tensor([True, False]), [r"expected dtype int32 or int64, got torch.bool"]),
        (
            torch.tensor([[0, 4, 10]], dtype=torch.int32),
            [r"cu_seqlens: expected shape \[num_seqs \+ 1\]", r"got \[1, 3\]"],
        ),
        (
            torch.tensor([10], dtype=torch.int32),
            [r"expected shape \[num_seqs \+ 1\] \(at least 2\), got \[1\]"],
        ),
        (
            torch.tensor([], dtype=torch.int32),
            [r"expected shape \[num_seqs \+ 1\] \(at least 2\), got \[0\]"],
        ),
    ],
    ids=[
        "non-monotonic",
        "start-2",
        "end-short",
        "end-past-seq",
        "negative",
        "float",
        "int16",
        "bool",
        "2-d",
        "one-offset",
        "empty",
    ],
)
def test_bad_cu_seqlens(cu: torch.Tensor, patterns: list[str], guarded) -> None:  # type: ignore[no-untyped-def]
    op = guarded(mamba2())
    refused(op, *patterns, **good_inputs(op), cu_seqlens=cu)


def test_cu_seqlens_needs_batch_one(guarded) -> None:  # type: ignore[no-untyped-def]
    op = guarded(mamba2())
    inputs = {k: torch.cat([v, v]) if v.dim() >= 3 else v for k, v in good_inputs(op).items()}
    refused(
        op, r"cu_seqlens: packed sequences need batch = 1, got batch = 2", **inputs, cu_seqlens=CU
    )


def test_cu_seqlens_without_varlen(guarded) -> None:  # type: ignore[no-untyped-def]
    op = guarded(open_dims())
    refused(
        op,
        r"cu_seqlens: spec open_dims does not declare `varlen`",
        **good_inputs(op, H=4, G=2, N=8, P=4),
        cu_seqlens=CU,
    )


@pytest.mark.parametrize(
    "bad", [[0, 7, 5], [0, 4, 1000], [3, 4, 10]], ids=["decreasing", "past-seq", "start-3"]
)
def test_cu_seqlens_values_are_checked_on_every_call(
    bad: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    op = mamba2()
    inputs = good_inputs(op)
    op(**inputs, cu_seqlens=CU)  # a good call first: its metadata is now "seen"

    def forward(**kwargs: Any) -> Any:
        raise Launched(f"launched with cu_seqlens={kwargs['cu_seqlens'].tolist()}")

    monkeypatch.setattr(op.module, "forward", forward)
    with pytest.raises(TensorError, match="cu_seqlens"):
        op(**inputs, cu_seqlens=torch.tensor(bad, dtype=CU.dtype))


def test_cu_seqlens_written_in_place_is_checked_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The values of the very tensor that passed last are not read again unless it changed
    (its version counter): an in-place write is caught."""
    op = mamba2()
    inputs = good_inputs(op)
    cu = CU.clone()
    op(**inputs, cu_seqlens=cu)
    op(**inputs, cu_seqlens=cu)  # unchanged: still runs
    monkeypatch.setattr(op.module, "forward", lambda **kwargs: pytest.fail("launched"))
    cu[1] = 11
    with pytest.raises(TensorError, match=r"cu_seqlens: expected non-decreasing offsets"):
        op(**inputs, cu_seqlens=cu)
    cu[1] = 4
    cu[2:] += 990  # through a view: the version counter is shared
    with pytest.raises(TensorError, match=r"expected to end at seq = 10, got 1000"):
        op(**inputs, cu_seqlens=cu)


def test_cu_seqlens_values_checked_under_inference_mode(guarded) -> None:  # type: ignore[no-untyped-def]
    """Inference tensors have no version counter: their values are read on every call."""
    op = mamba2()
    inputs = good_inputs(op)
    with torch.inference_mode():
        op(**inputs, cu_seqlens=CU.clone())
        bad = torch.tensor([0, 4, 1000], dtype=CU.dtype)
        guarded(op)
        refused(op, r"got 1000", **inputs, cu_seqlens=bad)
        refused(op, r"got 1000", **inputs, cu_seqlens=bad)


def test_cu_seqlens_on_another_device(guarded) -> None:  # type: ignore[no-untyped-def]
    op = guarded(mamba2())
    refused(op, "one device", "cu_seqlens on meta", **good_inputs(op), cu_seqlens=CU.to("meta"))


# --- initial_state ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "got"),
    [
        ((1, 2, 8, 4), r"\[1, 2, 8, 4\]"),
        ((1, 4, 8), r"\[1, 4, 8\]"),
        ((2, 4, 8, 4), r"\[2, 4, 8, 4\]"),
        ((1, 4, 4, 8), r"\[1, 4, 4, 8\]"),
    ],
)
def test_initial_state_wrong_shape(shape: tuple[int, ...], got: str, guarded) -> None:  # type: ignore[no-untyped-def]
    op = guarded(mamba2())
    refused(
        op,
        r"initial_state: expected shape \[batch, H=4, N=8, P=4\] = \[1, 4, 8, 4\]",
        rf"got {got}",
        **good_inputs(op),
        initial_state=torch.zeros(shape),
    )


def test_initial_state_per_sequence_with_cu_seqlens(guarded) -> None:  # type: ignore[no-untyped-def]
    op = guarded(mamba2())
    refused(
        op,
        r"initial_state: expected shape \[num_seqs, H=4, N=8, P=4\] = \[2, 4, 8, 4\]",
        r"got \[1, 4, 8, 4\]",
        **good_inputs(op),
        initial_state=initial_state(),
        cu_seqlens=CU,
    )


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64])
def test_initial_state_wrong_dtype(dtype: torch.dtype, guarded) -> None:  # type: ignore[no-untyped-def]
    op = guarded(mamba2())
    refused(
        op,
        rf"initial_state: expected dtype .*, got {dtype}",
        **good_inputs(op),
        initial_state=initial_state().to(dtype),
    )


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.detach().double() - want.detach()).norm() / want.detach().norm())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_initial_state_of_any_float_dtype(dtype: torch.dtype) -> None:
    """Like mamba_ssm's initial_states, any float dtype is taken (the kernels carry the state in
    fp32); y, the final state and the state's gradient (in its own dtype) match fp64."""
    op = mamba2()
    inputs = good_inputs(op)
    h0 = initial_state(2).to(dtype).requires_grad_()
    y, state = op(**inputs, initial_state=h0, cu_seqlens=CU)
    reference = importlib.import_module("ssmc.reference").reference(op.checked)
    leaf = h0.detach().double().requires_grad_()
    want_y, want_state = reference(
        **{k: v.double() for k, v in inputs.items()}, initial_state=leaf, cu_seqlens=CU
    )
    assert state is not None and want_state is not None and state.dtype == torch.float32
    assert rel(y, want_y) < 1e-5 and rel(state, want_state) < 1e-5
    y.sum().backward()
    want_y.sum().backward()
    assert h0.grad is not None and leaf.grad is not None and h0.grad.dtype == dtype
    assert rel(h0.grad, leaf.grad) < {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-5)


def test_initial_state_without_the_flag(guarded) -> None:  # type: ignore[no-untyped-def]
    checked = with_dims(parse_file(ROOT / "examples" / "mqa.ssm"), {"H": 4, "G": 2, "N": 8, "P": 4})
    op = guarded(ssmc.load(checked, cache_dir=CACHE.name))
    refused(
        op,
        r"initial_state: spec mqa_ssd does not declare `initial_state`",
        **good_inputs(op),
        initial_state=torch.zeros(1, 4, 8, 4),
    )


# --- names ----------------------------------------------------------------------------


def test_missing_tensor(guarded) -> None:  # type: ignore[no-untyped-def]
    op = guarded(mamba2())
    inputs = good_inputs(op)
    del inputs["z"], inputs["D"]
    refused(
        op,
        r"z: missing, expected shape \[batch, seq, H=4, P=4\]",
        r"D: missing, expected shape \[H=4\]",
        **inputs,
    )


def test_unknown_tensor(guarded) -> None:  # type: ignore[no-untyped-def]
    op = guarded(mamba2())
    refused(
        op,
        r"w: not a tensor of spec mamba2 \(it has x, dt, B, C, z, A, dt_bias, D\)",
        **good_inputs(op),
        w=torch.zeros(1),
    )


def test_misspelt_tensor(guarded) -> None:  # type: ignore[no-untyped-def]
    op = guarded(mamba2())
    inputs = good_inputs(op)
    inputs["dtbias"] = inputs.pop("dt_bias")
    refused(op, "dtbias: not a tensor", r"dt_bias: missing", **inputs)


def test_every_problem_reported_at_once(guarded) -> None:  # type: ignore[no-untyped-def]
    op = guarded(mamba2())
    inputs = good_inputs(op)
    inputs["x"] = inputs["x"].int()
    inputs["A"] = inputs["A"][:2]
    del inputs["z"]
    message = refused(op, "x: expected dtype", "A: expected shape", "z: missing", **inputs)
    assert message.startswith("3 problem(s) with the tensors for mamba2")


@pytest.mark.parametrize(
    "value", [[1.0, 2.0], None, np.zeros((1, 10, 4, 4))], ids=["list", "None", "numpy"]
)
def test_not_a_tensor(value: object, guarded) -> None:  # type: ignore[no-untyped-def]
    op = guarded(mamba2())
    got = r"got (list|NoneType|numpy\.ndarray)"
    refused(op, rf"x: expected a torch\.Tensor, {got}", **(good_inputs(op) | {"x": value}))
    if value is not None:
        for name in ("initial_state", "cu_seqlens"):
            refused(
                op, rf"{name}: expected a torch\.Tensor, {got}", **good_inputs(op), **{name: value}
            )


def test_validation_runs_again_when_metadata_changes(guarded) -> None:  # type: ignore[no-untyped-def]
    op = mamba2()
    inputs = good_inputs(op)
    op(**inputs)  # seen once, valid
    guarded(op)
    refused(op, "A: expected shape", **(inputs | {"A": inputs["A"][:3]}))
    refused(op, "x: expected dtype", **(inputs | {"x": inputs["x"].int()}))
