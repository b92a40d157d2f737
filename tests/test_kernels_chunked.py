"""The `chunked` (SSD) stage against the fp64 recurrent reference, under TRITON_INTERPRET=1."""



import functools
import zlib
from dataclasses import dataclass

import pytest
import torch
from launches import record_launches

from ssmc import forms_torch
from ssmc.load import load_source
from ssmc.render import render_stage

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.interpret

HEADER = "import math\nimport torch\nimport triton\nimport triton.language as tl\n\n"


@functools.cache
def stage(decay: str):
    """The rendered `chunked` stage for one decay kind, loaded as a module."""
    return load_source(HEADER + render_stage("chunked", decay=decay), f"chunked_{decay}")


def oracle(x, s, log_a, B, C, heads, h0=None, cu_seqlens=None):
    """The fp64 recurrent reference on X̄ = x * s: y [b, T, H, P], final states."""

    def f64(t):
        return None if t is None else t.double()

    xbar = x.double() * s.double()[..., None] if s is not None else x.double()
    return forms_torch.recurrent(
        xbar, f64(log_a), f64(B), f64(C), heads, initial_state=f64(h0), cu_seqlens=cu_seqlens
    )


# DESIGN §5: fp32 ≲ 1e-5; 16-bit operands (and states stored in them) ≲ 1e-2 (fp16's
# 11-bit mantissa lands well under it).
BOUND = {torch.float32: 1e-5, torch.float16: 3e-3}


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values with seq and head axes swapped in memory (a transposed view)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@dataclass(frozen=True)
class Case:
    id: str
    decay: str = "scalar"
    T: int = 33
    groups: tuple[int, int, int, int] = (4, 4, 4, 4)  # (Gv, Gk, Gq, Gd)
    N: int = 16
    P: int = 16
    chunk: int = 16
    block_t: int | None = None  # tokens per step of the state walk: default min(chunk, 64)
    block_m: int | None = None  # rows per scan program: default min(chunk, 64)
    heads_per_program: int | None = None  # scan programs per C Bᵀ block: default (1 here)
    scale: bool = True
    h0: bool = True
    ht: bool = True
    seqlens: tuple[int, ...] = ()
    noncontiguous: bool = False
    strong: bool = False
    weak: bool = False  # log a in −[0.001, 0.05): states carry far (across segments too)
    dtype: torch.dtype = torch.float32  # of x, B, C (and of the stored chunk states if 16-bit)
    prefetch: bool = False  # the scan issues its loads before its dots
    seq_splits: int | None = None  # segments of each sequence walked in parallel (default 1 here)


# (Gv, Gk, Gq, Gd) of DESIGN §2's patterns with G groups, decay per head.
MHA = (4, 4, 4, 4)
MQA_G1 = (1, 1, 4, 4)
MKA_G2 = (2, 4, 2, 4)
MVA_G2 = (4, 2, 2, 4)
MVA_G1 = (4, 1, 1, 4)

CASES = [
    Case("scalar-T1", T=1),
    Case("scalar-T15", T=15),
    Case("scalar-T16", T=16),
    Case("scalar-T64", T=64),
    Case("none-T33", decay="none"),
    Case("none-T64-mva", decay="none", T=64, groups=MVA_G2),
    Case("scalar-mqa-G1", groups=MQA_G1),
    Case("scalar-mka-G2", groups=MKA_G2),
    Case("scalar-mva-G2", groups=MVA_G2, heads_per_program=2),
    Case("scalar-mva-G1-whole-group", groups=MVA_G1, heads_per_program=4),
    Case("none-mva-G1-uneven-split", decay="none", groups=MVA_G1, heads_per_program=3),
    Case("scalar-mva-G1-decay-G2", groups=(4, 1, 1, 2)),
    Case("scalar-bare", scale=False, h0=False, ht=False),
    Case("scalar-no-h0", h0=False),
    Case("scalar-chunk32", chunk=32, T=64),
    Case("scalar-chunk32-walk16", chunk=32, block_t=16, T=75, groups=MVA_G1),
    Case("none-chunk64-walk16-varlen", decay="none", chunk=64, block_t=16, seqlens=(70, 3, 40)),
    Case("scalar-chunk64-rows16", chunk=64, block_m=16, T=75, groups=MVA_G1, heads_per_program=4),
    Case("none-chunk32-rows16-varlen", decay="none", chunk=32, block_m=16, seqlens=(40, 7, 33)),
    Case("scalar-strong-rows16", strong=True, chunk=64, block_m=16, T=64),
    Case(
        "scalar-chunk128-varlen-noncontiguous", chunk=128, seqlens=(130, 5, 60), noncontiguous=True
    ),
    Case("scalar-chunk256-mva", chunk=256, T=300, groups=MVA_G1, heads_per_program=2),
    Case("scalar-fp16", dtype=torch.float16, chunk=32, block_m=16, T=50, groups=MVA_G2),
    Case("scalar-ragged-dims", N=24, P=20),
    Case("scalar-varlen", seqlens=(5, 37, 11)),
    Case("scalar-varlen-mva", seqlens=(17, 1, 30), groups=MVA_G1, heads_per_program=4),
    Case("none-varlen-empty-seq", decay="none", seqlens=(9, 0, 20)),
    Case("scalar-noncontiguous", noncontiguous=True, groups=MVA_G2, heads_per_program=2),
    Case("scalar-noncontiguous-varlen", seqlens=(4, 19, 3), noncontiguous=True),
    Case("scalar-strong-decay", strong=True, T=64),
    Case("scalar-prefetch-rows16", chunk=64, block_m=16, T=75, groups=MVA_G2, prefetch=True),
    Case("none-prefetch-varlen", decay="none", chunk=32, seqlens=(40, 7, 33), prefetch=True),
    Case("scalar-prefetch-bare-fp16", scale=False, dtype=torch.float16, prefetch=True),
    # the state walk cut into segments (chunked_state_split_fwd) and put together again
    Case("scalar-split2", T=64, seq_splits=2),
    Case("scalar-split4-weak", T=128, weak=True, seq_splits=4),
    Case("scalar-split3-weak-varlen-rows16", chunk=32, block_m=16, seqlens=(150, 20, 90),
         weak=True, seq_splits=3),
    Case("scalar-split3-uneven", T=75, seq_splits=3, groups=MVA_G1, heads_per_program=4),
    Case("scalar-split8-past-the-rows", T=64, seq_splits=8),
    Case("scalar-split4-varlen", seqlens=(70, 3, 40), seq_splits=4),
    Case("scalar-split2-no-h0", T=64, h0=False, seq_splits=2),
    Case("scalar-split2-bare", T=64, scale=False, h0=False, ht=False, seq_splits=2),
    Case("scalar-split3-strong-rows16", strong=True, chunk=32, block_m=16, T=130, seq_splits=3),
    Case("none-split2-varlen", decay="none", seqlens=(40, 7, 33), seq_splits=2),
    Case("scalar-split2-noncontiguous-mka", T=70, groups=MKA_G2, noncontiguous=True,
         seq_splits=2),
    Case("scalar-split2-fp16-prefetch", dtype=torch.float16, chunk=32, block_m=16, T=97,
         prefetch=True, seq_splits=2),
]


def make_inputs(case: Case, seed: int):
    g = torch.Generator().manual_seed(seed)
    Gv, Gk, Gq, Gd = case.groups
    batch, H, N, P, T = 2, 4, case.N, case.P, case.T
    cu_seqlens = None
    if case.seqlens:
        batch, T = 1, sum(case.seqlens)
        cu_seqlens = torch.tensor(
            [0, *torch.tensor(case.seqlens).cumsum(0).tolist()], dtype=torch.int32
        )
    states = len(case.seqlens) or batch

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    x, B, C = (
        rand(*shape).to(case.dtype)
        for shape in ((batch, T, Gv, P), (batch, T, Gk, N), (batch, T, Gq, N))
    )
    s = 0.5 + torch.rand(batch, T, Gv, generator=g) if case.scale else None
    low = 8.0 if case.strong else 1.0
    log_a = None
    if case.decay == "scalar":
        log_a = -(0.01 + (low - 0.01) * torch.rand(batch, T, Gd, generator=g))
        if case.weak:
            log_a = -(0.001 + 0.049 * torch.rand(batch, T, Gd, generator=g))
    h0 = rand(states, H, N, P) if case.h0 else None
    if case.noncontiguous:
        x, B, C = transposed(x), transposed(B), transposed(C)
        s = transposed(s) if s is not None else None
        log_a = transposed(log_a) if log_a is not None else None
        h0 = transposed(h0) if h0 is not None else None
    inputs = dict(x=x, s=s, log_a=log_a, B=B, C=C, heads=H, h0=h0, cu_seqlens=cu_seqlens)
    # on the GPU where there is one (the interpreter runs CPU tensors)
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_chunked_matches_oracle(case: Case) -> None:
    inputs = make_inputs(case, seed=zlib.crc32(case.id.encode()))
    x, H, h0 = inputs["x"], inputs["heads"], inputs["h0"]
    batch, T, _, P = x.shape
    N = inputs["B"].shape[-1]
    states = len(case.seqlens) or batch
    out = torch.full((batch, T, H, P), float("nan"), device=DEVICE)
    if case.noncontiguous:
        out = transposed(out)
    final = torch.full((states, H, N, P), float("nan"), device=DEVICE) if case.ht else None

    stage(case.decay).chunked_fwd(
        x,
        inputs["s"],
        inputs["log_a"],
        inputs["B"],
        inputs["C"],
        heads=H,
        out=out,
        initial_state=h0,
        final_state=final,
        cu_seqlens=inputs["cu_seqlens"],
        chunk_size=case.chunk,
        block_t=case.block_t,
        block_m=case.block_m,
        block_n=16,
        block_p=16,
        heads_per_program=case.heads_per_program,
        prefetch=case.prefetch,
        seq_splits=case.seq_splits,
    )

    y_ref, final_ref = oracle(
        x,
        inputs["s"],
        inputs["log_a"],
        inputs["B"],
        inputs["C"],
        H,
        h0=h0,
        cu_seqlens=inputs["cu_seqlens"],
    )
    bound = BOUND[case.dtype]
    assert rel_err(out, y_ref) <= bound
    if case.ht:
        assert rel_err(final, final_ref) <= bound


def test_chunked_rejects_a_decay_it_was_not_generated_for() -> None:
    inputs = make_inputs(Case("x", decay="scalar", T=1), seed=0)
    out = torch.empty(2, 1, 4, 16)
    with pytest.raises(ValueError, match="causal"):
        stage("none").chunked_fwd(
            inputs["x"], None, inputs["log_a"], inputs["B"], inputs["C"], heads=4, out=out
        )


def test_split_walk_really_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    """With seq_splits the walk runs segment programs and the combine, and the stored states
    are local to their segment (the scan adds the rest): a mutation dropping the scan's Z term
    would fail test_chunked_matches_oracle's split cases; here the launches themselves."""
    module = stage("scalar")
    launched = record_launches(monkeypatch, module, ("chunked_state_fwd_kernel",
                                                     "walk_combine_kernel"))
    inputs = make_inputs(Case("split", T=64), seed=3)
    x, H = inputs["x"], inputs["heads"]
    out = torch.empty(2, 64, H, 16, device=DEVICE)
    module.chunked_fwd(x, inputs["s"], inputs["log_a"], inputs["B"], inputs["C"], heads=H, out=out,
                       initial_state=inputs["h0"], chunk_size=16, block_n=16, block_p=16,
                       seq_splits=2)
    # 2 sequences × 2 segments × 4 heads, one tile; the combine per sequence and head
    assert launched == ["chunked_state_fwd_kernel(16,)", "walk_combine_kernel(8,)"]


def test_split_default_only_where_walkers_are_few(monkeypatch: pytest.MonkeyPatch) -> None:
    """chunked_state_splits: 1 off the GPU and unless the walkers are at most half the SMs;
    then about one walker an SM in segments of ≥ 8 chunks, at most 8 (the H100's measurements:
    docs/gpu-runs.md, twelfth session)."""
    module = stage("scalar")

    def splits(batch: int, T: int, H: int, dtype: torch.dtype = torch.bfloat16) -> int:
        x = torch.empty(batch, T, H, 64, dtype=dtype)
        B = torch.empty(batch, T, 1, 128, dtype=torch.bfloat16)
        first = torch.arange(batch + 1) * (T // 128)
        return module.chunked_state_splits(x, B, first=first, heads=H, chunk_size=128)

    assert splits(1, 16384, 16) == 1  # no GPU
    monkeypatch.setattr(module, "_sm_count", lambda device: 132)
    assert splits(1, 16384, 80) == 1  # Mamba-2 2.7B: 80 walkers of 132 (measured level)
    assert splits(2, 8192, 80) == 1
    assert splits(1, 16384, 40) == 3
    assert splits(1, 16384, 16) == 8
    assert splits(1, 16384, 16, torch.float64) == 1
    assert splits(8, 2048, 8) == 2  # 64 walkers; 16 chunks a sequence
    assert splits(1, 1024, 8) == 1  # 8 chunks: no two segments of 8
