"""The fused chunked (SSD) forward (chunked_fused_fwd: one walk per sequence, head and P tile,
no states buffer) against the fp64 recurrent reference, under TRITON_INTERPRET=1."""

import zlib

import pytest
import torch
from launches import record_launches
from test_kernels_chunked import (
    BOUND,
    CASES,
    DEVICE,
    Case,
    make_inputs,
    oracle,
    rel_err,
    stage,
    transposed,
)

pytestmark = pytest.mark.interpret

# every case of the unfused stage the fused walk serves (Q ≤ 128), plus its own
FUSED_CASES = [c for c in CASES if c.chunk <= 128] + [
    Case("scalar-chunk64-N128-P64", chunk=64, T=140, N=128, P=64, groups=(4, 1, 1, 4)),
    Case("scalar-ragged-P-tiles", N=24, P=40, T=40),
    Case("none-split3-weak-mva", decay="none", T=160, groups=(4, 1, 1, 4), seq_splits=3),
]


def run_fused(case: Case, inputs: dict, *, block_p: int = 16) -> tuple[torch.Tensor, torch.Tensor | None]:
    """out and the final state of chunked_fwd(fused=True), both NaN-poisoned first."""
    x, H = inputs["x"], inputs["heads"]
    batch, T, _, P = x.shape
    N = inputs["B"].shape[-1]
    out = torch.full((batch, T, H, P), float("nan"), device=DEVICE)
    if case.noncontiguous:
        out = transposed(out)
    states = len(case.seqlens) or batch
    final = torch.full((states, H, N, P), float("nan"), device=DEVICE) if case.ht else None
    stage(case.decay).chunked_fwd(
        x, inputs["s"], inputs["log_a"], inputs["B"], inputs["C"], heads=H, out=out,
        initial_state=inputs["h0"], final_state=final, cu_seqlens=inputs["cu_seqlens"],
        chunk_size=case.chunk, block_t=case.block_t, block_p=block_p,
        seq_splits=case.seq_splits, fused=True,
    )
    return out, final


@pytest.mark.parametrize("case", FUSED_CASES, ids=lambda c: c.id)
def test_fused_matches_oracle(case: Case) -> None:
    inputs = make_inputs(case, seed=zlib.crc32(case.id.encode()) + 1)
    out, final = run_fused(case, inputs)
    y_ref, final_ref = oracle(
        inputs["x"], inputs["s"], inputs["log_a"], inputs["B"], inputs["C"], inputs["heads"],
        h0=inputs["h0"], cu_seqlens=inputs["cu_seqlens"],
    )
    bound = BOUND[case.dtype]
    assert rel_err(out, y_ref) <= bound
    if case.ht:
        assert rel_err(final, final_ref) <= bound


def test_fused_launches_one_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unsplit, the fused forward is one launch (no state walk, no C Bᵀ, no scan); split, a
    state pass and the combine come first."""
    module = stage("scalar")
    names = ("chunked_state_fwd_kernel", "walk_combine_kernel", "chunked_scan_cb_fwd_kernel",
             "chunked_scan_fwd_kernel", "chunked_fused_fwd_kernel")
    launched = record_launches(monkeypatch, module, names)
    case = Case("launches", T=64)
    inputs = make_inputs(case, seed=5)
    run_fused(case, inputs)
    # 2 sequences × 4 heads × one P tile
    assert launched == ["chunked_fused_fwd_kernel(8,)"]
    launched.clear()
    run_fused(Case("launches", T=64, seq_splits=2), inputs)
    assert launched == ["chunked_state_fwd_kernel(16,)", "walk_combine_kernel(8,)",
                        "chunked_fused_fwd_kernel(16,)"]


def test_fused_falls_back_where_the_state_does_not_fit() -> None:
    """N > 128 (or Q > 128) takes the unfused stages; chunked_fused_fwd itself refuses it."""
    module = stage("scalar")
    case = Case("wide", T=20, N=160, chunk=16)
    inputs = make_inputs(case, seed=7)
    out, final = run_fused(case, inputs)
    y_ref, final_ref = oracle(
        inputs["x"], inputs["s"], inputs["log_a"], inputs["B"], inputs["C"], inputs["heads"],
        h0=inputs["h0"],
    )
    assert rel_err(out, y_ref) <= BOUND[torch.float32]
    assert rel_err(final, final_ref) <= BOUND[torch.float32]
    tiles, first = module.seq_tiles(None, 2, 20, 16, DEVICE)
    with pytest.raises(ValueError, match="N ≤ 128"):
        module.chunked_fused_fwd(
            inputs["x"], inputs["s"], inputs["log_a"], inputs["B"], inputs["C"], tiles=tiles,
            first=first, heads=4, out=out, initial_state=None, final_state=None, chunk_size=16,
            dot_precision="ieee",
        )
