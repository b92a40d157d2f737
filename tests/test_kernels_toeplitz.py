"""The `toeplitz` stage against the fp64 Toeplitz reference, under TRITON_INTERPRET=1."""



import functools
import zlib
from dataclasses import dataclass

import pytest
import torch

from ssmc import forms_torch
from ssmc.load import load_source
from ssmc.render import render_stage

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.interpret

HEADER = "import math\nimport torch\nimport triton\nimport triton.language as tl\n\n"


@functools.cache
def stage():
    """The rendered `toeplitz` stage, loaded as a module."""
    return load_source(HEADER + render_stage("toeplitz"), "toeplitz")


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


def transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values with the first two axes swapped in memory (a transposed view)."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


@dataclass(frozen=True)
class Case:
    id: str
    T: int = 33
    L: int = 8
    groups: tuple[int, int] = (4, 4)  # (Gv, Gd)
    P: int = 16
    tiles: tuple[int, int] = (16, 16)  # (block_i, block_j)
    scale: bool = True
    seqlens: tuple[int, ...] = ()
    noncontiguous: bool = False


CASES = [
    Case("T1", T=1),
    Case("T15", T=15),
    Case("T16-L1", T=16, L=1),
    Case("T64-window-5", T=64, L=5),
    Case("T64-window-40", T=64, L=40),
    Case("kernel-longer-than-T", T=33, L=50),
    Case("shared-value-G1", groups=(1, 4)),
    Case("shared-kernel-G1", groups=(4, 1)),
    Case("groups-G2", groups=(2, 2)),
    Case("no-scale", scale=False),
    Case("tiles-32x16", T=64, L=24, tiles=(32, 16)),
    Case("tiles-16x32", T=64, L=24, tiles=(16, 32)),
    Case("ragged-P", P=20),
    Case("varlen", L=12, seqlens=(5, 37, 11)),
    Case("varlen-long-kernel", L=64, seqlens=(17, 1, 30), groups=(2, 4)),
    Case("varlen-empty-seq", seqlens=(9, 0, 20)),
    Case("noncontiguous", noncontiguous=True, groups=(2, 4)),
    Case("noncontiguous-varlen", seqlens=(4, 19, 3), noncontiguous=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_toeplitz_matches_reference(case: Case) -> None:
    g = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    Gv, Gd = case.groups
    batch, H, T, P = 2, 4, case.T, case.P
    cu_seqlens = None
    if case.seqlens:
        batch, T = 1, sum(case.seqlens)
        cu_seqlens = torch.tensor(
            [0, *torch.tensor(case.seqlens).cumsum(0).tolist()], dtype=torch.int64
        )
    x = torch.randn(batch, T, Gv, P, generator=g)
    s = 0.5 + torch.rand(batch, T, Gv, generator=g) if case.scale else None
    kernel = torch.randn(Gd, case.L, generator=g) * 0.8 ** torch.arange(case.L)
    # on the GPU where there is one (the interpreter runs CPU tensors)
    x, kernel = x.to(DEVICE), kernel.to(DEVICE)
    s = s.to(DEVICE) if s is not None else None
    cu_seqlens = cu_seqlens.to(DEVICE) if cu_seqlens is not None else None
    out = torch.full((batch, T, H, P), float("nan"), device=DEVICE)
    if case.noncontiguous:
        x, kernel, out = transposed(x), transposed(kernel), transposed(out)
        s = transposed(s) if s is not None else None

    block_i, block_j = case.tiles
    stage().toeplitz_fwd(
        x,
        s,
        kernel,
        heads=H,
        out=out,
        cu_seqlens=cu_seqlens,
        block_i=block_i,
        block_j=block_j,
        block_p=16,
    )

    xbar = x.double() * s.double()[..., None] if s is not None else x.double()
    ref = forms_torch.toeplitz_quadratic(xbar, kernel.double(), H, cu_seqlens=cu_seqlens)
    assert rel_err(out, ref) <= 1e-5
