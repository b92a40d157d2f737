"""bind: every dim from the tensors, and one TensorError naming each bad tensor and shape."""

from __future__ import annotations

import pytest
import torch

from ssmc.bind import bind
from ssmc.errors import TensorError
from ssmc.pipeline import parse

SPEC = """
ssm bindtest
dim H = 4, G, N = 8, P
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
varlen
"""

PLAIN = SPEC.replace("initial_state\n", "").replace("varlen\n", "")


@pytest.fixture(scope="module")
def checked():
    return parse(SPEC)


def tensors(b: int = 2, T: int = 6, G: int = 1, P: int = 3) -> dict[str, torch.Tensor]:
    return {
        "x": torch.randn(b, T, 4, P),
        "dt": torch.randn(b, T, 4),
        "B": torch.randn(b, T, G, 8),
        "C": torch.randn(b, T, G, 8),
        "A": torch.randn(4),
    }


def problem(checked, **kwargs) -> str:
    """The TensorError message bind raises for these arguments."""
    given = kwargs.pop("tensors")
    with pytest.raises(TensorError) as info:
        bind(checked, given, **kwargs)
    return str(info.value)


def test_binds_every_dim(checked) -> None:
    dims = bind(checked, tensors(b=2, T=6, G=2, P=5))
    assert dims == {"batch": 2, "seq": 6, "H": 4, "G": 2, "N": 8, "P": 5}


def test_wrong_shape_names_tensor_and_shapes(checked) -> None:
    message = problem(checked, tensors={**tensors(), "B": torch.randn(2, 6, 1, 9)})
    assert "B: expected shape [batch, seq, G=1, N=8] = [2, 6, 1, 8], got [2, 6, 1, 9]" in message


def test_head_dim_mismatch_between_tensors(checked) -> None:
    """G is bound from B; a C with another G is reported against B's binding."""
    message = problem(checked, tensors={**tensors(), "C": torch.randn(2, 6, 2, 8)})
    assert "C: expected shape [batch, seq, G=1, N=8] = [2, 6, 1, 8], got [2, 6, 2, 8]" in message


def test_batch_mismatch(checked) -> None:
    message = problem(checked, tensors={**tensors(), "dt": torch.randn(3, 6, 4)})
    assert "dt: expected shape [batch, seq, H=4] = [2, 6, 4], got [3, 6, 4]" in message


def test_wrong_rank(checked) -> None:
    message = problem(checked, tensors={**tensors(), "dt": torch.randn(2, 6)})
    assert "dt: expected 3 dims [batch, seq, H=4] = [2, 6, 4], got 2 dims [2, 6]" in message


def test_missing_and_unknown_tensors(checked) -> None:
    given = {k: v for k, v in tensors().items() if k != "A"} | {"D": torch.randn(4)}
    message = problem(checked, tensors=given)
    assert "A: missing, expected shape [H=4]" in message
    assert "D: not a tensor of spec bindtest" in message


def test_head_count_must_divide(checked) -> None:
    message = problem(checked, tensors=tensors(G=3))
    assert "query heads: G=3 does not divide the output head count H=4" in message


def test_integer_dtype(checked) -> None:
    message = problem(
        checked, tensors={**tensors(), "x": torch.ones(2, 6, 4, 3, dtype=torch.int64)}
    )
    assert "x: expected dtype float16, bfloat16, float32 or float64, got torch.int64" in message


def test_devices_must_agree(checked) -> None:
    message = problem(checked, tensors={**tensors(), "A": torch.randn(4, device="meta")})
    assert "one device" in message and "A on meta" in message and "x on cpu" in message


CU_CASES = {
    "float": (
        torch.tensor([0.0, 2.0, 6.0]),
        "cu_seqlens: expected dtype int32 or int64, got torch.float32",
    ),
    "2d": (
        torch.tensor([[0, 6]]),
        "cu_seqlens: expected shape [num_seqs + 1] (at least 2), got [1, 2]",
    ),
    "start": (torch.tensor([1, 3, 6]), "cu_seqlens: expected to start at 0, got 1"),
    "decreasing": (
        torch.tensor([0, 4, 2, 6]),
        "cu_seqlens: expected non-decreasing offsets, got [0, 4, 2, 6]",
    ),
    "end": (
        torch.tensor([0, 2, 7], dtype=torch.int32),
        "cu_seqlens: expected to end at seq = 6, got 7",
    ),
}


@pytest.mark.parametrize(("cu", "expected"), list(CU_CASES.values()), ids=list(CU_CASES))
def test_bad_cu_seqlens(checked, cu: torch.Tensor, expected: str) -> None:
    assert expected in problem(checked, tensors=tensors(b=1), cu_seqlens=cu)


def test_varlen_needs_batch_one(checked) -> None:
    message = problem(checked, tensors=tensors(b=2), cu_seqlens=torch.tensor([0, 2, 6]))
    assert "cu_seqlens: packed sequences need batch = 1, got batch = 2" in message


def test_initial_state_shape(checked) -> None:
    message = problem(checked, tensors=tensors(b=2), initial_state=torch.randn(2, 4, 8, 4))
    assert (
        "initial_state: expected shape [batch, H=4, N=8, P=3] = [2, 4, 8, 3], got [2, 4, 8, 4]"
        in message
    )


def test_initial_state_per_sequence(checked) -> None:
    cu = torch.tensor([0, 1, 4, 6])
    message = problem(
        checked, tensors=tensors(b=1), cu_seqlens=cu, initial_state=torch.randn(1, 4, 8, 3)
    )
    assert (
        "initial_state: expected shape [num_seqs, H=4, N=8, P=3] = [3, 4, 8, 3], got [1, 4, 8, 3]"
        in message
    )
    bind(checked, tensors(b=1), cu_seqlens=cu, initial_state=torch.randn(3, 4, 8, 3))


def test_flags_the_spec_does_not_declare() -> None:
    plain = parse(PLAIN)
    message = problem(
        plain,
        tensors=tensors(b=1),
        initial_state=torch.randn(1, 4, 8, 3),
        cu_seqlens=torch.tensor([0, 6]),
    )
    assert "initial_state: spec bindtest does not declare `initial_state`" in message
    assert "cu_seqlens: spec bindtest does not declare `varlen`" in message


def test_all_problems_at_once(checked) -> None:
    given = {
        **tensors(),
        "B": torch.randn(2, 6, 1, 9),
        "dt": torch.randn(2, 6, 4, dtype=torch.float64),
    }
    given["x"] = given["x"].to(torch.int32)
    message = problem(checked, tensors=given)
    assert message.startswith("2 problem(s)")
    assert "B: expected shape" in message and "x: expected dtype" in message
