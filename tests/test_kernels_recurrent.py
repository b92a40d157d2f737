"""The `recurrent` stage against the fp64 recurrent reference (interpreted without a GPU)."""

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

pytestmark = pytest.mark.interpret

# On a GPU machine the same cases run compiled, on CUDA tensors.
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"

HEADER = "import math\nimport torch\nimport triton\nimport triton.language as tl\n\n"


@functools.cache
def stage(decay: str):
    """The rendered `recurrent` stage for one decay kind, loaded as a module."""
    return load_source(HEADER + render_stage("recurrent", decay=decay), f"recurrent_{decay}")


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
    decay: str = "diagonal"
    T: int = 15
    groups: tuple[int, int, int, int] = (4, 4, 4, 4)  # (Gv, Gk, Gq, Gd)
    P: int = 16
    scale: bool = True
    h0: bool = True
    ht: bool = True
    seqlens: tuple[int, ...] = ()
    noncontiguous: bool = False
    strong: bool = False


CASES = [
    Case("none-mha-T33", decay="none", T=33),
    Case("scalar-mha-T33", decay="scalar", T=33),
    Case("diagonal-mha-T33", T=33),
    Case("diagonal-T1", T=1),
    Case("scalar-T64", decay="scalar", T=64),
    Case("diagonal-mqa-G1", groups=(1, 1, 4, 4)),
    Case("diagonal-mka-G2", groups=(2, 4, 2, 2)),
    Case("diagonal-mva-G1", groups=(4, 1, 1, 1)),
    Case("scalar-mva-G2", decay="scalar", groups=(4, 2, 2, 2)),
    Case("none-mixed-groups", decay="none", groups=(2, 1, 4, 4)),
    Case("diagonal-bare", scale=False, h0=False, ht=False),
    Case("scalar-no-h0", decay="scalar", h0=False),
    Case("diagonal-mamba1-P1", P=1, groups=(4, 1, 1, 4)),
    Case("diagonal-varlen", seqlens=(5, 17, 11)),
    Case("scalar-varlen-mva", decay="scalar", seqlens=(7, 1, 12), groups=(4, 2, 2, 1)),
    Case("none-varlen-empty-seq", decay="none", seqlens=(9, 0, 6)),
    Case("diagonal-noncontiguous", noncontiguous=True, groups=(4, 2, 2, 4)),
    Case("scalar-noncontiguous-varlen", decay="scalar", seqlens=(4, 9, 3), noncontiguous=True),
    Case("diagonal-strong-decay", strong=True, T=33),
    Case("scalar-strong-decay", decay="scalar", strong=True),
]


def make_inputs(case: Case, seed: int):
    g = torch.Generator().manual_seed(seed)
    Gv, Gk, Gq, Gd = case.groups
    batch, H, N, P = 2, 4, 16, case.P
    T = case.T
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
    log_a = {
        "none": None,
        "scalar": -(0.01 + (low - 0.01) * torch.rand(batch, T, Gd, generator=g)),
        "diagonal": -(0.01 + (low - 0.01) * torch.rand(batch, T, Gd, N, generator=g)),
    }[case.decay]
    h0 = rand(states, H, N, P) if case.h0 else None
    x, s, log_a, B, C, h0, cu_seqlens = to_device(x, s, log_a, B, C, h0, cu_seqlens)
    if case.noncontiguous:
        x, B, C = strided(x), strided(B), strided(C)
        s = strided(s) if s is not None else None
        log_a = strided(log_a) if log_a is not None else None
        h0 = strided(h0) if h0 is not None else None
    return dict(x=x, s=s, log_a=log_a, B=B, C=C, heads=H, h0=h0, cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_recurrent_matches_oracle(case: Case) -> None:
    inputs = make_inputs(case, seed=zlib.crc32(case.id.encode()))
    x, H, h0 = inputs["x"], inputs["heads"], inputs["h0"]
    batch, T, _, P = x.shape
    N = inputs["B"].shape[-1]
    states = len(case.seqlens) or batch
    out = torch.full((batch, T, H, P), float("nan"), device=DEVICE)
    if case.noncontiguous:
        out = strided(out)
    final = torch.full((states, H, N, P), float("nan"), device=DEVICE) if case.ht else None

    stage(case.decay).recurrent_fwd(
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
    stage("diagonal").recurrent_fwd(
        x, None, log_a, B, C, heads=4, out=out, initial_state=initial, final_state=final
    )
    assert torch.equal(final, initial if h0 else torch.zeros_like(final))
