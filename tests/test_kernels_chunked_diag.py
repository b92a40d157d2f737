"""The `chunked_diag` stages against the fp64 recurrent form (interpreted without a GPU)."""

import os

import torch

# Without a GPU the kernels run under the Triton interpreter; triton.jit reads the variable
# when a kernel is decorated, so it is set before any generated module is loaded.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import functools
import zlib
from dataclasses import dataclass

import pytest

from ssmc import forms_torch
from ssmc.load import load_source
from ssmc.render import render_stage

# an overflow or inf·0 anywhere inside the kernels (numpy warns under the interpreter) fails
pytestmark = [pytest.mark.interpret, pytest.mark.filterwarnings("error::RuntimeWarning")]

# On a GPU machine the same cases run compiled, on CUDA tensors.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

HEADER = "import math\nimport torch\nimport triton\nimport triton.language as tl\n\n"


@functools.cache
def stage():
    """The rendered `chunked_diag` stage (with its sub-stages), loaded as a module."""
    return load_source(HEADER + render_stage("chunked_diag", decay="diagonal"), "chunked_diag")


def oracle(x, s, log_a, B, C, heads, h0=None, cu_seqlens=None):
    """The fp64 recurrent reference on X̄ = x * s: y [b, T, H, P], final states."""

    def f64(t):
        return None if t is None else t.double().cpu()

    xbar = f64(x) * f64(s)[..., None] if s is not None else f64(x)
    return forms_torch.recurrent(
        xbar, f64(log_a), f64(B), f64(C), heads, initial_state=f64(h0), cu_seqlens=cu_seqlens
    )


def rel_err(out, ref):
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def to_device(*tensors):
    """The tensors (None kept) on DEVICE: inputs are drawn on the CPU for every device alike."""
    return tuple(None if t is None else t.to(DEVICE) for t in tensors)


def strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other element of a wider buffer)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


@dataclass(frozen=True)
class Case:
    id: str
    T: int = 33
    chunk: int = 16
    block_m: int | None = None  # rows of y per scan program (default min(chunk, 64))
    groups: tuple[int, int, int, int] = (4, 4, 4, 4)  # (Gv, Gk, Gq, Gd)
    P: int = 16
    N: int = 16
    scale: bool = True
    h0: bool = True
    ht: bool = True
    seqlens: tuple[int, ...] = ()
    noncontiguous: bool = False
    strongest: float = 1.0  # log a is drawn from [−strongest, −0.01]
    seq_splits: int | None = None  # segments of each sequence walked in parallel (default 1 here)


CASES = [
    Case("mha-T33"),
    Case("mha-T1", T=1),
    Case("mha-T15", T=15),
    Case("mha-T64", T=64),
    Case("chunk32-T64", T=64, chunk=32),
    Case("chunk64-T33", chunk=64),
    Case("chunk64-row-blocks16", chunk=64, block_m=16, T=70),
    Case("chunk128-T150", chunk=128, T=150),
    Case("mqa-G1", groups=(1, 1, 4, 4)),
    Case("mka-G2", groups=(2, 4, 2, 4)),
    Case("mva-G1", groups=(4, 1, 1, 1)),
    Case("mva-G2-shared-A", groups=(4, 2, 2, 2)),
    Case("mixed-groups", groups=(2, 1, 4, 2)),
    Case("bare", scale=False, h0=False, ht=False),
    Case("no-h0", h0=False),
    Case("mamba1-P1", P=1, groups=(4, 1, 1, 4)),
    Case("varlen", seqlens=(5, 37, 11)),
    Case("varlen-mva-empty-seq", seqlens=(17, 0, 16), groups=(4, 2, 2, 2)),
    Case("noncontiguous", groups=(4, 2, 2, 4), noncontiguous=True),
    Case("noncontiguous-varlen", seqlens=(20, 3, 9), noncontiguous=True),
    Case("strong-decay", strongest=8.0, T=64),
    Case("strong-decay-chunk64", strongest=8.0, T=64, chunk=64),
    Case("extreme-decay", strongest=60.0, T=40),
    # state dims that are not a power of two, and more than one n tile (BLOCK_N ≤ 64)
    Case("N40", N=40, T=50, chunk=32),
    Case("N80-strong-decay", N=80, T=40, chunk=32, strongest=4.0),
    # the state walk cut into segments and put together again (weak decays: states carry
    # across segments, so the combine and the scan's added term matter)
    Case("split2-weak", T=64, strongest=0.05, seq_splits=2),
    Case("split3-varlen-weak", seqlens=(70, 3, 40), strongest=0.05, seq_splits=3),
    Case("split2-N80-mva-weak", N=80, T=96, groups=(4, 1, 1, 1), strongest=0.05, seq_splits=2),
    Case("split2-bare-weak", T=64, scale=False, h0=False, ht=False, strongest=0.05,
         seq_splits=2),
    Case("split8-past-the-rows", T=64, strongest=0.05, seq_splits=8),
    Case("split2-mamba1-P1", P=1, T=64, groups=(4, 1, 1, 4), strongest=0.05, seq_splits=2),
    Case("split2-noncontiguous-weak", T=64, noncontiguous=True, strongest=0.05, seq_splits=2),
    Case("split3-strong-chunk32", T=130, chunk=32, strongest=8.0, seq_splits=3),
]


def make_inputs(case: Case):
    g = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
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

    x, B, C = rand(batch, T, Gv, P), rand(batch, T, Gk, N), rand(batch, T, Gq, N)
    s = 0.5 + torch.rand(batch, T, Gv, generator=g) if case.scale else None
    log_a = -(0.01 + (case.strongest - 0.01) * torch.rand(batch, T, Gd, N, generator=g))
    h0 = rand(states, H, N, P) if case.h0 else None
    x, s, log_a, B, C, h0, cu_seqlens = to_device(x, s, log_a, B, C, h0, cu_seqlens)
    if case.noncontiguous:
        x, B, C, log_a = strided(x), strided(B), strided(C), strided(log_a)
        s = strided(s) if s is not None else None
        h0 = strided(h0) if h0 is not None else None
    return x, s, log_a, B, C, H, h0, cu_seqlens


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_chunked_diag_matches_recurrent(case: Case) -> None:
    x, s, log_a, B, C, H, h0, cu_seqlens = make_inputs(case)
    batch, T, _, P = x.shape
    N = B.shape[-1]
    states = len(case.seqlens) or batch
    out = torch.full((batch, T, H, P), float("nan"), device=DEVICE)
    if case.noncontiguous:
        out = strided(out)
    final = torch.full((states, H, N, P), float("nan"), device=DEVICE) if case.ht else None
    if case.ht and case.noncontiguous:
        final = strided(final)

    stage().chunked_diag_fwd(
        x,
        s,
        log_a,
        B,
        C,
        heads=H,
        out=out,
        initial_state=h0,
        final_state=final,
        cu_seqlens=cu_seqlens,
        chunk_size=case.chunk,
        block_m=case.block_m,
        seq_splits=case.seq_splits,
    )

    y_ref, final_ref = oracle(x, s, log_a, B, C, H, h0=h0, cu_seqlens=cu_seqlens)
    assert rel_err(out, y_ref) <= 1e-5
    if case.ht:
        assert rel_err(final, final_ref) <= 1e-5


@pytest.mark.parametrize("h0", [True, False], ids=["h0", "no-h0"])
def test_empty_sequence_passes_the_state(h0: bool) -> None:
    """T = 0: nothing is written to out and the final state is the initial state (or 0)."""
    g = torch.Generator().manual_seed(11)
    x, B, C = torch.randn(2, 0, 4, 16), torch.randn(2, 0, 4, 16), torch.randn(2, 0, 4, 16)
    log_a = -torch.rand(2, 0, 4, 16)
    initial = torch.randn(2, 4, 16, 16, generator=g) if h0 else None
    x, log_a, B, C, initial = to_device(x, log_a, B, C, initial)
    out = torch.empty(2, 0, 4, 16, device=DEVICE)
    final = torch.full((2, 4, 16, 16), float("nan"), device=DEVICE)
    stage().chunked_diag_fwd(
        x, None, log_a, B, C, heads=4, out=out, initial_state=initial, final_state=final
    )
    assert torch.equal(final, initial if h0 else torch.zeros_like(final))


def written_blocks(tiles: torch.Tensor, chunk: int) -> torch.Tensor:
    """The entries of A [R, 1, Q, Q] the intra writes: rows inside their chunk, on and below
    the diagonal (the others are never written, so tests compare these only)."""
    rows = torch.arange(chunk, device=tiles.device)
    inside = (rows[None, :] < tiles[:, 2, None])[:, None, :, None]
    return inside & torch.ones(chunk, chunk, dtype=torch.bool, device=tiles.device).tril()


@pytest.mark.parametrize("case", [CASES[6], CASES[10], CASES[16], CASES[21], CASES[22]],
                         ids=lambda c: c.id)
def test_intra_variants_agree(case: Case) -> None:
    """The intra block A is the same whichever grid order runs its sub-chunk programs (the
    adjacent order only changes which programs share L2) and whether the spread is taken
    before the main loop or in it (strong decays take the direct diagonal block either way)."""
    x, s, log_a, B, C, H, h0, cu_seqlens = make_inputs(case)
    mod = stage()
    tiles, _ = mod.seq_tiles(cu_seqlens, x.shape[0], x.shape[1], case.chunk, x.device)
    cs = mod.chunked_diag_cumsum_fwd(log_a, tiles=tiles, chunk_size=case.chunk, block_n=16)
    written = written_blocks(tiles, case.chunk)
    blocks = []
    for adjacent, one_pass in ((True, True), (False, True), (True, False)):
        A = mod.chunked_diag_intra_fwd(B, C, cs=cs, tiles=tiles, heads=H, chunk_size=case.chunk,
                                       dot_precision="ieee", adjacent=adjacent,
                                       one_pass=one_pass, whole=False)
        blocks.append(torch.where(written, A, 0.0))
    assert blocks[0].abs().sum() > 0 and torch.isfinite(blocks[0]).all()
    assert torch.equal(blocks[0], blocks[1])
    assert torch.equal(blocks[0], blocks[2])


def direct_intra(B, C, cs, tiles, heads: int, chunk: int) -> torch.Tensor:
    """A [R, H, Q, Q] in fp64 straight from its definition, Σ_n C_i B_j exp(cs_i − cs_j) for
    j ≤ i inside the chunk (one head per A-group), 0 elsewhere."""
    R, Gd = cs.shape[:2]
    A = torch.zeros(R, heads, chunk, chunk, dtype=torch.float64)
    for r, (b, t0, n, *_) in enumerate(tiles.cpu().tolist()):
        for h in range(heads):
            c = cs[r, h * Gd // heads, :n].double().cpu()
            q = C[b, t0:t0 + n, h * C.shape[2] // heads].double().cpu()
            k = B[b, t0:t0 + n, h * B.shape[2] // heads].double().cpu()
            e = (c[:, None, :] - c[None, :, :]).clamp(max=0.0).exp()
            A[r, h, :n, :n] = torch.einsum("in,jn,ijn->ij", q, k, e).tril()
    return A


@pytest.mark.parametrize("case", [CASES[0], CASES[5], CASES[8], CASES[16], CASES[21],
                                  CASES[22], CASES[23]], ids=lambda c: c.id)
def test_intra_whole_chunk(case: Case) -> None:
    """The whole-chunk intra (one dot through the chunk's midpoint where its spread allows,
    the sub-chunk launch for the other chunks) gives A within fp32 rounding of its
    definition, for weak decays (the one dot) and strong ones (the sub-chunks, or a mix)."""
    x, s, log_a, B, C, H, h0, cu_seqlens = make_inputs(case)
    mod = stage()
    tiles, _ = mod.seq_tiles(cu_seqlens, x.shape[0], x.shape[1], case.chunk, x.device)
    cs = mod.chunked_diag_cumsum_fwd(log_a, tiles=tiles, chunk_size=case.chunk, block_n=16)
    spread = (cs[:, :, 0] - cs[:, :, -1]).amax(dim=(1, 2))[tiles[:, 2] > 0]  # chunks written
    want = direct_intra(B, C, cs, tiles, H, case.chunk)
    written = written_blocks(tiles, case.chunk).cpu()
    for blocks in (None, (16, 2)):
        A = mod.chunked_diag_intra_fwd(B, C, cs=cs, tiles=tiles, heads=H, chunk_size=case.chunk,
                                       dot_precision="ieee", whole=True,
                                       whole_blocks=blocks).cpu()
        Ga = A.shape[1]
        got = torch.where(written, A, 0.0).double().repeat_interleave(H // Ga, dim=1)
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # which path each case exercises: weak decays the one dot, strong ones the sub-chunks
    weak = spread <= mod.WHOLE_SPREAD
    assert weak.all() if case.strongest <= 1.0 else not weak.all()


@pytest.mark.parametrize("case", [CASES[5], CASES[16], CASES[21], CASES[23]], ids=lambda c: c.id)
def test_intra_narrow_dots_in_16_bit(case: Case) -> None:
    """With 16-bit C the intra's dot against the earlier keys takes 16-bit operands
    (intra_narrow; the interpreter has fp16, not bf16): A stays within 16-bit rounding of the
    fp32 dots' A, and y within fp16's bound of the fp64 recurrent form."""
    x, s, log_a, B, C, H, h0, cu_seqlens = make_inputs(case)
    x, B, C = x.half(), B.half(), C.half()
    mod = stage()
    assert mod.intra_narrow(C)
    tiles, _ = mod.seq_tiles(cu_seqlens, x.shape[0], x.shape[1], case.chunk, x.device)
    cs = mod.chunked_diag_cumsum_fwd(log_a, tiles=tiles, chunk_size=case.chunk, block_n=16)
    written = written_blocks(tiles, case.chunk)
    blocks = [
        torch.where(written, mod.chunked_diag_intra_fwd(
            B, C, cs=cs, tiles=tiles, heads=H, chunk_size=case.chunk, dot_precision="ieee",
            narrow=on), 0.0)
        for on in (True, False)
    ]
    scale = blocks[1].abs().max()
    assert scale > 0 and torch.isfinite(blocks[0]).all()
    assert (blocks[0] - blocks[1]).abs().max() <= 1e-3 * scale
    batch, T, _, P = x.shape
    out = torch.full((batch, T, H, P), float("nan"), device=DEVICE)
    mod.chunked_diag_fwd(x, s, log_a, B, C, heads=H, out=out, initial_state=h0,
                         cu_seqlens=cu_seqlens, chunk_size=case.chunk)
    y_ref, _ = oracle(x, s, log_a, B, C, H, h0=h0, cu_seqlens=cu_seqlens)
    assert rel_err(out, y_ref) <= 2e-3
