"""Offsets past 2³¹ elements: the generated kernels index with int64 where it can overflow.

Hand-written SSD kernels are known to return silently wrong output past ~61K tokens from
32-bit offsets. Here batch·T·H·P is above 2³¹ and the last batch row starts exactly at
element 2³¹ of x (and of y), so any int32 offset in x, z, y or the per-chunk buffers wraps
for every token of that row. That row (and the first) is checked against the fp64
reference of the same rounded inputs. GPU only: the tensors take ~25 GB.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssmc.load import load
from ssmc.pipeline import parse_file, with_dims
from ssmc.reference import random_inputs, reference

pytestmark = pytest.mark.gpu

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mamba2.ssm"
DIMS = {"H": 64, "G": 1, "N": 64, "P": 64}
BATCH, SEQLEN = 9, 65536  # row 8 of x starts at 8·T·H·P = 2³¹
PER_TOKEN = ("x", "dt", "B", "C", "z")


def _relative(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_offsets_past_2_pow_31(dtype: torch.dtype) -> None:
    assert BATCH * SEQLEN * DIMS["H"] * DIMS["P"] > 2**31
    checked = with_dims(parse_file(EXAMPLE), DIMS)
    op = load(checked)
    # Parameters and the range of dt from the usual draw; the big per-token tensors are
    # drawn on the GPU (standard normal, as random_inputs draws them), dt row by row from
    # shuffles of one drawn row, so every row differs.
    base = random_inputs(checked, batch=1, seqlen=SEQLEN, dtype=torch.float32)
    base.pop("initial_state", None)
    torch.manual_seed(0)
    tensors = {k: v.cuda() for k, v in base.items() if k not in PER_TOKEN}
    shapes = {"x": ("H", "P"), "z": ("H", "P"), "B": ("G", "N"), "C": ("G", "N")}
    for name, (a, b) in shapes.items():
        shape = (BATCH, SEQLEN, DIMS[a], DIMS[b])
        tensors[name] = torch.randn(shape, device="cuda", dtype=torch.float32).to(dtype)
    dt_row = base["dt"].cuda()
    tensors["dt"] = torch.cat(
        [dt_row[:, torch.randperm(SEQLEN, device="cuda")] for _ in range(BATCH)]
    )
    y, state = op(**tensors)
    assert y.shape == (BATCH, SEQLEN, DIMS["H"], DIMS["P"])
    run_ref = reference(checked, "chunked", chunk_size=256)
    for row in (0, BATCH - 1):
        picked = {
            k: (v[row : row + 1] if k in PER_TOKEN else v).double() for k, v in tensors.items()
        }
        ref_y, ref_state = run_ref(**picked)
        out_y = y[row : row + 1]
        assert torch.isfinite(out_y).all(), f"row {row}: non-finite output"
        err = _relative(out_y, ref_y)
        assert err < 1e-2, f"row {row}: relative error {err:.2e} of y (bound 1e-2)"
        if state is not None and ref_state is not None:
            err_state = _relative(state[row : row + 1], ref_state)
            assert err_state < 1e-2, f"row {row}: relative error {err_state:.2e} of the state"
        del picked, ref_y, ref_state
        torch.cuda.empty_cache()
