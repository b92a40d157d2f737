"""The `quadratic` stage against the fp64 recurrent reference, under TRITON_INTERPRET=1."""



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
def stage(decay: str):
    """The rendered `quadratic` stage for one decay kind, loaded as a module."""
    return load_source(HEADER + render_stage("quadratic", decay=decay), f"quadratic_{decay}")


def oracle(x, s, log_a, B, C, heads, h0=None, cu_seqlens=None):
    """The fp64 recurrent reference on X̄ = x * s: y [b, T, H, P], final states."""

    def f64(t):
        return None if t is None else t.double()

    xbar = x.double() * s.double()[..., None] if s is not None else x.double()
    return forms_torch.recurrent(
        xbar, f64(log_a), f64(B), f64(C), heads, initial_state=f64(h0), cu_seqlens=cu_seqlens
    )


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
    tiles: tuple[int, int] = (16, 16)  # (block_i, block_j)
    scale: bool = True
    h0: bool = True
    ht: bool = True
    seqlens: tuple[int, ...] = ()
    noncontiguous: bool = False
    strong: bool = False
    barriers: bool = False
    """log a = −1e4 at a third of the tokens, ≥ −0.01 elsewhere: decays of both extremes in
    one tile (differences of prefix sums lost ulp(1e4) ≈ 1e-3 to cancellation there)."""


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
    Case("none-T40-mva", decay="none", T=40, groups=MVA_G2),
    Case("scalar-mqa-G1", groups=MQA_G1),
    Case("scalar-mka-G2", groups=MKA_G2),
    Case("scalar-mva-G2", groups=MVA_G2),
    Case("scalar-mva-G1-decay-G2", groups=(4, 1, 1, 2)),
    Case("scalar-bare", scale=False, h0=False, ht=False),
    Case("scalar-no-h0", h0=False),
    Case("scalar-tiles-32x16", tiles=(32, 16), T=64),
    Case("scalar-tiles-16x32", tiles=(16, 32), T=64),
    Case("scalar-ragged-dims", N=24, P=20),
    Case("scalar-varlen", seqlens=(5, 37, 11)),
    Case("scalar-varlen-mva", seqlens=(17, 1, 30), groups=MVA_G1),
    Case("none-varlen-empty-seq", decay="none", seqlens=(9, 0, 20)),
    Case("scalar-noncontiguous", noncontiguous=True, groups=MVA_G2),
    Case("scalar-noncontiguous-varlen", seqlens=(4, 19, 3), noncontiguous=True),
    Case("scalar-strong-decay", strong=True, T=40),
    Case("scalar-barriers", barriers=True, T=64),
    Case("scalar-barriers-tiles-32x16", barriers=True, T=64, tiles=(32, 16), groups=MVA_G2),
    Case("scalar-barriers-varlen", barriers=True, seqlens=(21, 30, 13), tiles=(16, 32)),
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

    x, B, C = rand(batch, T, Gv, P), rand(batch, T, Gk, N), rand(batch, T, Gq, N)
    s = 0.5 + torch.rand(batch, T, Gv, generator=g) if case.scale else None
    low = 8.0 if case.strong else 1.0
    log_a = None
    if case.decay == "scalar":
        log_a = -(0.01 + (low - 0.01) * torch.rand(batch, T, Gd, generator=g))
        if case.barriers:
            strong = torch.rand(batch, T, Gd, generator=g) < 1 / 3
            log_a = torch.where(strong, -1e4, log_a / (100 * low))
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
def test_quadratic_matches_oracle(case: Case) -> None:
    inputs = make_inputs(case, seed=zlib.crc32(case.id.encode()))
    x, H, h0 = inputs["x"], inputs["heads"], inputs["h0"]
    batch, T, _, P = x.shape
    N = inputs["B"].shape[-1]
    states = len(case.seqlens) or batch
    out = torch.full((batch, T, H, P), float("nan"), device=DEVICE)
    if case.noncontiguous:
        out = transposed(out)
    final = torch.full((states, H, N, P), float("nan"), device=DEVICE) if case.ht else None

    block_i, block_j = case.tiles
    stage(case.decay).quadratic_fwd(
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
        block_i=block_i,
        block_j=block_j,
        block_n=16,
        block_p=16,
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
    assert rel_err(out, y_ref) <= 1e-5
    if case.ht:
        assert rel_err(final, final_ref) <= 1e-5


def test_quadratic_rejects_a_decay_it_was_not_generated_for() -> None:
    inputs = make_inputs(Case("x", decay="scalar", T=1), seed=0)
    out = torch.empty(2, 1, 4, 16)
    with pytest.raises(ValueError, match="causal"):
        stage("none").quadratic_fwd(
            inputs["x"], None, inputs["log_a"], inputs["B"], inputs["C"], heads=4, out=out
        )
