"""chunked_bwd(dbc="shared"): dB, dC's intra-chunk sums from W = Σ_h L^h ∘ dY^h X̄^hᵀ, formed
once per chunk and group of heads sharing B and C (chunked_bwd_w_kernel), then W B and Wᵀ C
(chunked_bwd_wbc_kernel); the per-head state terms stay in chunked_bwd_dbc (INTRA = False).

Against autograd of the fp64 recurrent form on fresh random inputs (every buffer the stage
allocates NaN-poisoned by RecordingTorch), and against the per-head path within fp32
rounding, under the Triton interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib

import pytest
from recording_torch import RecordingTorch
from test_adjoint import DEVICE, Case, fused_stage, inputs, reference, rel_err

GRADS = ("dx", "ds", "dlog_a", "dB", "dC", "dh0")


def run(case: Case, monkeypatch, log_a_scale: float = 1.0,
        **options) -> tuple[dict, dict, RecordingTorch]:
    """(got, want, recorder): chunked_bwd on fp32 inputs (chunks of 16 unless options say
    otherwise) and the fp64 reference gradients, X̄ = x s; log a scaled by `log_a_scale`."""
    t = inputs(case, torch.float64)
    if t["log_a"] is not None:
        t["log_a"] = t["log_a"] * log_a_scale
    g = torch.Generator().manual_seed(zlib.crc32(case.id.encode()) + 1)
    s = 0.5 + torch.rand(t["x"].shape[:3], generator=g, dtype=torch.float64)
    x = t["x"]
    t["x"] = x * s[..., None]
    dxbar, dla, dB, dC, dh0 = reference(t)
    want = dict(dx=dxbar * s[..., None], ds=(dxbar * x).sum(-1), dlog_a=dla, dB=dB, dC=dC,
                dh0=dh0)
    module = fused_stage(case.decay)
    recorder = RecordingTorch()
    monkeypatch.setattr(module, "torch", recorder)

    def dev(v):
        return None if v is None else v.to(DEVICE, torch.float32)

    out = module.chunked_bwd(
        dev(x), dev(s), dev(t["log_a"]), dev(t["B"]), dev(t["C"]), heads=t["heads"],
        initial_state=dev(t["h0"]),
        cu_seqlens=None if t["cu_seqlens"] is None else t["cu_seqlens"].to(DEVICE),
        dy=dev(t["dy"]), dfinal=dev(t["dfinal"]),
        **{"chunk_size": 16, "block_m": 16, "block_n": 16, "block_p": 16, **options},
    )
    return dict(zip(GRADS, out, strict=True)), want, recorder


def w_shapes(recorder: RecordingTorch, case: Case) -> list[tuple[int, ...]]:
    """The W buffers [R, Gw, Q, Q] the stage allocated (4-d, the last two equal)."""
    return [s for s in recorder.shapes if len(s) == 4 and s[2] == s[3] and s[1] < case.H]


# (Gv, Gk, Gq, Gd), H = 4: Mamba-2 (one B, C for every head, a decay per head), G = 2, and
# B, C groups that differ (W groups are lcm(Gq, Gk): several per output group on one side)
SHARED = [
    Case("s-mamba2", "scalar", (4, 1, 1, 4), T=37, N=16, P=16),
    Case("s-g2", "scalar", (4, 2, 2, 4), T=37, N=16, P=16),
    Case("s-g2-decay-shared", "scalar", (2, 2, 2, 1), T=37, h0=False, ht=False, N=16, P=16),
    Case("s-kq-1-2", "scalar", (4, 1, 2, 2), T=37, N=16, P=16),
    Case("s-kq-2-1", "scalar", (4, 2, 1, 4), T=37, ht=False, N=16, P=16),
    Case("s-none", "none", (4, 1, 1, 4), T=37, N=16, P=16),
    Case("s-none-g2", "none", (2, 2, 2, 4), T=20, h0=False, N=16, P=16),
    Case("s-varlen", "scalar", (4, 1, 1, 4), seqlens=(5, 0, 23, 1), N=16, P=16),
    Case("s-none-varlen", "none", (4, 2, 2, 4), seqlens=(17, 4, 0), N=16, P=16),
]


def check(case: Case, monkeypatch, **options) -> dict:
    """Every gradient within DESIGN §5's fp32 bound (dlog a 10×), fully written, and W used."""
    got, want, recorder = run(case, monkeypatch, dbc="shared", **options)
    for name, w in want.items():
        gr = got[name]
        assert (gr is None) == (w is None), name
        if w is not None:
            assert gr.shape == w.shape and gr.dtype == torch.float32, name
            assert not gr.isnan().any(), f"{name}: every element is written"
            limit = 1e-5 * (10 if name == "dlog_a" else 1)
            assert rel_err(gr, w) <= limit, (name, rel_err(gr, w))
    Gw = max(case.groups[1], case.groups[2])
    assert [s[1] for s in w_shapes(recorder, case)] == [Gw], recorder.shapes
    return got


@pytest.mark.interpret
@pytest.mark.parametrize("case", SHARED, ids=lambda c: c.id)
def test_shared_dbc(case: Case, monkeypatch) -> None:
    """dbc="shared" against fp64: Mamba-2-like G = 1, G = 2, differing B and C groups, no
    decay, varlen (an empty sequence, a 1-token one), h0 and dfinal; chunks of 16."""
    check(case, monkeypatch)


@pytest.mark.interpret
@pytest.mark.parametrize(
    "case, options",
    [
        (SHARED[0], {"chunk_size": 64}),
        (SHARED[3], {"chunk_size": 64}),
        (SHARED[7], {"chunk_size": 32}),
        (SHARED[7], {"chunk_size": 32, "block_t": 32}),  # the walks: one step a chunk
        # the dB/dC launches' own tile: two N tiles of 16 and 16-row blocks where the rest runs
        # one N tile of 32 and 32-row blocks
        (Case("s-mamba2-n32", "scalar", (4, 1, 1, 4), T=37, N=32, P=16),
         {"chunk_size": 64, "block_m": 32, "block_n": 32, "dbc_block_m": 16,
          "dbc_block_n": 16}),
        (Case("s-g2-n32", "scalar", (4, 2, 2, 4), T=37, N=32, P=16),
         {"chunk_size": 64, "block_m": 32, "block_n": 32, "dbc_block_m": 16,
          "dbc_block_n": 16}),
        (SHARED[5], {"chunk_size": 64}),
        (SHARED[1], {"chunk_size": 64, "head_splits": 2, "stored_cc": True}),
        (SHARED[3], {"chunk_size": 64, "stages_of": {"dbc": 1, "dx": 2}, "walk_stages": 1}),
        (SHARED[0], {"chunk_size": 64, "warps_of": {"dx": 8, "walk": 2}, "walk_block_n": 16,
                     "walk_block_p": 16}),
    ],
    ids=lambda v: v.id if isinstance(v, Case) else "-".join(
        f"{k}{'.'.join(map(str, x.values())) if isinstance(x, dict) else x}" for k, x in v.items()
    ),
)
def test_shared_dbc_row_blocks(case: Case, options, monkeypatch) -> None:
    """Chunks of several 16-row blocks (W's tiles below the diagonal, W B along a row of
    blocks, Wᵀ C down a column up to the chunk's end), with head splits and the stored cc."""
    check(case, monkeypatch, **{"block_t": 16, **options})


@pytest.mark.interpret
def test_per_head_dbc_with_its_own_tile(monkeypatch) -> None:
    """dbc="per_head" (the intra-chunk sums inside the dB/dC launches) with their own tile:
    16-row blocks and two N tiles where the other launches run 32 rows and one N tile."""
    case = Case("s-g2-n32", "scalar", (4, 2, 2, 4), T=37, N=32, P=16)
    got, want, _ = run(case, monkeypatch, dbc="per_head", chunk_size=64, block_t=16,
                       block_m=32, block_n=32, dbc_block_m=16, dbc_block_n=16)
    for name, w in want.items():
        if w is not None:
            assert not got[name].isnan().any(), name
            limit = 1e-5 * (10 if name == "dlog_a" else 1)
            assert rel_err(got[name], w) <= limit, (name, rel_err(got[name], w))


@pytest.mark.interpret
@pytest.mark.parametrize("case", [SHARED[0], SHARED[3], SHARED[7]], ids=lambda c: c.id)
def test_shared_matches_per_head(case: Case, monkeypatch) -> None:
    """The two paths give the same gradients within fp32 rounding (they sum the same
    products in another order: dB, dC differ by 5-9e-8 of their norm, the rest not at all),
    chunks of four row blocks."""
    opts = dict(chunk_size=64, block_t=16)
    shared, want, _ = run(case, monkeypatch, dbc="shared", **opts)
    per_head, _, _ = run(case, monkeypatch, dbc="per_head", **opts)
    for name in GRADS:
        a, b = shared[name], per_head[name]
        assert (a is None) == (b is None), name
        if a is not None:
            scale = want[name].norm().item()
            assert (a.double() - b.double()).norm().item() <= 5e-7 * scale, name


@pytest.mark.interpret
def test_shared_without_sharing_runs_per_head(monkeypatch) -> None:
    """Where no two heads share both B and C (lcm(Gq, Gk) = H) there is nothing to sum:
    dbc="shared" runs the per-head path (no W buffer), same gradients."""
    case = Case("s-mha", "scalar", (4, 4, 2, 4), T=20, N=16, P=16)
    got, want, recorder = run(case, monkeypatch, dbc="shared")
    assert w_shapes(recorder, case) == []
    assert rel_err(got["dB"], want["dB"]) <= 1e-5
    assert rel_err(got["dC"], want["dC"]) <= 1e-5


def test_shared_dbc_options_refused() -> None:
    """An unknown dbc, and dbc="shared" with dla="suffix", are refused by name."""
    module = fused_stage("scalar")
    x = torch.randn(1, 4, 2, 16)
    args = (x, None, -torch.rand(1, 4, 2), torch.randn(1, 4, 1, 16), torch.randn(1, 4, 1, 16))
    kw = dict(heads=2, initial_state=None, cu_seqlens=None, dy=torch.randn(1, 4, 2, 16),
              dfinal=None)
    with pytest.raises(ValueError, match="dbc must be"):
        module.chunked_bwd(*args, **kw, dbc="grouped")
    with pytest.raises(ValueError, match="dla='straddle'"):
        module.chunked_bwd(*args, **kw, dbc="shared", dla="suffix")
