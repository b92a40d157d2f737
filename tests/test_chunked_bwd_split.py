"""chunked_bwd with its two walks cut into segments walked in parallel (seq_splits): each
segment's states local to it, the segments' entering states combined in order and added back
in place (walk_combine, chunked_bwd_walk_fixup), the reverse walk's boundary terms corrected too.

Against autograd of the fp64 recurrent form on fresh random inputs with weak decays (states
carry across segments, so the combine and the fix-up matter), every buffer NaN-poisoned
(RecordingTorch), under the Triton interpreter; and against the unsplit walks.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from launches import record_launches
from test_adjoint import Case, fused_stage, rel_err
from test_chunked_bwd_shared import run

pytestmark = pytest.mark.interpret


def check(case: Case, monkeypatch, weak: bool = True, **options) -> None:
    """Every gradient within DESIGN §5's fp32 bound (dlog a 10×) and fully written; `weak`:
    log a scaled to −[0.0005, 0.05] a token."""
    got, want, _ = run(case, monkeypatch, 0.05 if weak else 1.0,
                       **{"block_t": 16, **options})
    for name, w in want.items():
        gr = got[name]
        assert (gr is None) == (w is None), name
        if w is not None:
            assert not gr.isnan().any(), f"{name}: every element is written"
            limit = 1e-5 * (10 if name == "dlog_a" else 1)
            assert rel_err(gr, w) <= limit, (name, rel_err(gr, w))


# (Gv, Gk, Gq, Gd), H = 4; T 70 at chunks of 16: 5 chunks a sequence
CASES = [
    (Case("w-mamba2", "scalar", (4, 1, 1, 4), T=70, N=16, P=16), {"seq_splits": 2}),
    (Case("w-mamba2-3", "scalar", (4, 1, 1, 4), T=70, N=16, P=16), {"seq_splits": 3}),
    (Case("w-g2-past-rows", "scalar", (4, 2, 2, 4), T=70, N=16, P=16), {"seq_splits": 8}),
    (Case("w-bare", "scalar", (4, 1, 1, 4), T=70, h0=False, ht=False, N=16, P=16),
     {"seq_splits": 2}),
    (Case("w-none", "none", (4, 1, 1, 4), T=70, N=16, P=16), {"seq_splits": 2}),
    (Case("w-varlen", "scalar", (4, 1, 1, 4), seqlens=(70, 0, 23, 1, 40), N=16, P=16),
     {"seq_splits": 3}),
    (Case("w-suffix", "scalar", (4, 1, 1, 4), T=70, N=16, P=16),
     {"seq_splits": 2, "dla": "suffix"}),
    (Case("w-suffix-varlen", "scalar", (4, 2, 2, 4), seqlens=(45, 9, 30), N=16, P=16),
     {"seq_splits": 3, "dla": "suffix"}),
    (Case("w-two-tiles", "scalar", (2, 1, 1, 2), T=130, N=32, P=32, H=2),
     {"seq_splits": 2, "chunk_size": 32}),  # two 16-token steps a chunk
]


@pytest.mark.parametrize("case, options", CASES, ids=lambda v: v.id if isinstance(v, Case)
                         else "-".join(f"{k}{x}" for k, x in v.items()))
def test_split_walks_match_fp64(case: Case, options: dict, monkeypatch) -> None:
    """Weak decays (states carry across segments); Mamba-2-like G = 1, G = 2, no decay,
    varlen with empty and short sequences, dlog a by the suffix sum (its boundary terms
    ⟨H_{r+1}, Λ_r⟩ at the segments' edges), more segments than chunks, two N × P tiles and
    two walk steps a chunk."""
    check(case, monkeypatch, **options)


def test_split_walks_with_ordinary_decays(monkeypatch) -> None:
    """The tests' usual decays, −[0.01, 1.01] a token: the split loses nothing there."""
    check(Case("o-mamba2", "scalar", (4, 1, 1, 4), T=70, N=16, P=16), monkeypatch, weak=False,
          seq_splits=3)


def test_split_walks_launch_the_combine_and_fixup(monkeypatch) -> None:
    """seq_splits=2 runs both walks as segment programs, each followed by its combine and its
    fix-up; seq_splits=1 (the default off the GPU) none of them."""
    module = fused_stage("scalar")
    launched = record_launches(monkeypatch, module, ("chunked_bwd_walk_kernel",
                                                     "walk_combine_kernel",
                                                     "chunked_bwd_walk_fixup_kernel"))
    case = Case("count", "scalar", (4, 1, 1, 4), T=64, N=16, P=16)
    run(case, monkeypatch, 0.05, block_t=16, seq_splits=2)
    # batch 2 × 2 segments × 4 heads × one tile; 2 × 4 sequences-heads; 8 chunks × 4 heads
    walk, combine, fixup = ("chunked_bwd_walk_kernel(16,)", "walk_combine_kernel(8,)",
                            "chunked_bwd_walk_fixup_kernel(8, 4)")
    assert launched == [walk, combine, fixup] * 2
    launched.clear()
    run(case, monkeypatch, 0.05, block_t=16, seq_splits=1)
    assert launched == ["chunked_bwd_walk_kernel(8,)"] * 2
