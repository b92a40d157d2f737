"""The `decode` stage: consecutive steps equal the fp64 recurrent form (interpreted without a GPU)."""

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
STEPS = 5


@functools.cache
def stage(decay: str):
    """The rendered `decode` stage for one decay kind, loaded as a module."""
    return load_source(HEADER + render_stage("decode", decay=decay), f"decode_{decay}")


def oracle(x, s, log_a, B, C, heads, h0):
    """The fp64 recurrent reference over the whole sequence of steps, on X̄ = x * s."""

    def f64(t):
        return None if t is None else t.double().cpu()

    xbar = f64(x) * f64(s)[..., None] if s is not None else f64(x)
    return forms_torch.recurrent(xbar, f64(log_a), f64(B), f64(C), heads, initial_state=f64(h0))


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
    groups: tuple[int, int, int, int] = (4, 4, 4, 4)  # (Gv, Gk, Gq, Gd)
    batch: int = 2
    heads: int = 4
    steps: int = 5
    P: int = 16
    scale: bool = True
    noncontiguous: bool = False
    strong: bool = False


CASES = [
    Case("none-mha", decay="none"),
    Case("scalar-mha", decay="scalar"),
    Case("diagonal-mha"),
    Case("scalar-mva-G1", decay="scalar", groups=(4, 1, 1, 4)),
    Case("diagonal-mva-G2", groups=(4, 2, 2, 2)),
    Case("diagonal-mqa-G1", groups=(1, 1, 4, 4)),
    Case("scalar-mka-G2", decay="scalar", groups=(2, 4, 2, 1)),
    Case("diagonal-no-scale", scale=False),
    Case("diagonal-mamba1-P1", P=1, groups=(4, 1, 1, 4)),
    Case("scalar-noncontiguous", decay="scalar", noncontiguous=True, groups=(4, 2, 2, 2)),
    Case("diagonal-noncontiguous", noncontiguous=True),
    Case("diagonal-strong-decay", strong=True),
    # the interpreter runs programs one by one: batch 256 with 2 heads and one step
    Case("scalar-batch256", decay="scalar", batch=256, heads=2, steps=1, groups=(2, 1, 1, 2)),
]


def make_inputs(case: Case):
    """A sequence of `steps` tokens as [b, steps, G, ...] tensors plus an initial state."""
    g = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    Gv, Gk, Gq, Gd = case.groups
    batch, H, N, P, steps = case.batch, case.heads, 16, case.P, case.steps

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    x, B, C = rand(batch, steps, Gv, P), rand(batch, steps, Gk, N), rand(batch, steps, Gq, N)
    s = 0.5 + torch.rand(batch, steps, Gv, generator=g) if case.scale else None
    low = 8.0 if case.strong else 1.0
    log_a = {
        "none": None,
        "scalar": -(0.01 + (low - 0.01) * torch.rand(batch, steps, Gd, generator=g)),
        "diagonal": -(0.01 + (low - 0.01) * torch.rand(batch, steps, Gd, N, generator=g)),
    }[case.decay]
    h0 = rand(batch, H, N, P)
    return (*to_device(x, s, log_a, B, C), H, *to_device(h0))


def step_inputs(t: int, x, s, log_a, B, C, noncontiguous: bool):
    """Token t of every role, [b, G, ...]; a strided copy when asked."""
    picked = [None if u is None else u[:, t] for u in (x, s, log_a, B, C)]
    if noncontiguous:
        picked = [None if u is None else strided(u) for u in picked]
    return picked


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_decode_steps_match_recurrent(case: Case) -> None:
    x, s, log_a, B, C, H, h0 = make_inputs(case)
    batch, _, _, P = x.shape
    state = h0.clone()
    if case.noncontiguous:
        state = strided(state)
    ys = []
    for t in range(case.steps):
        out = torch.full((batch, H, P), float("nan"), device=DEVICE)
        if case.noncontiguous:
            out = strided(out)
        stage(case.decay).decode_fwd(
            *step_inputs(t, x, s, log_a, B, C, case.noncontiguous), heads=H, state=state, out=out
        )
        ys.append(out)
    y_ref, state_ref = oracle(x, s, log_a, B, C, H, h0)
    assert rel_err(torch.stack(ys, dim=1), y_ref) <= 1e-5
    assert rel_err(state, state_ref) <= 1e-5


@pytest.mark.parametrize("decay", ["scalar", "diagonal"])
def test_decode_state_batch_indices(decay: str) -> None:
    """Rows map to slots of a larger pool; a padding row (−1) leaves the pool untouched."""
    case = Case(f"{decay}-slots", decay=decay, batch=3, groups=(4, 2, 2, 4))
    x, s, log_a, B, C, H, _ = make_inputs(case)
    slots, pool = to_device(
        torch.tensor([4, -1, 1]),
        torch.randn(6, H, 16, 16, generator=torch.Generator().manual_seed(7)),
    )
    before = pool.clone()
    ys = []
    for t in range(STEPS):
        out = torch.full((3, H, 16), float("nan"), device=DEVICE)
        stage(decay).decode_fwd(
            *step_inputs(t, x, s, log_a, B, C, False),
            heads=H,
            state=pool,
            out=out,
            state_batch_indices=slots,
        )
        ys.append(out)
    y = torch.stack(ys, dim=1)

    def rows(u, r):
        return None if u is None else u[r]

    live = [0, 2]
    y_ref, state_ref = oracle(*(rows(u, live) for u in (x, s, log_a, B, C)), H, before[[4, 1]])
    assert rel_err(y[live], y_ref) <= 1e-5
    assert rel_err(pool[[4, 1]], state_ref) <= 1e-5
    assert torch.equal(pool[[0, 2, 3, 5]], before[[0, 2, 3, 5]])
    # the padding row runs every step from a zero state: one-token sequences
    pad = torch.cat(
        [
            oracle(*(rows(u, [1])[:, t : t + 1] for u in (x, s, log_a, B, C)), H, None)[0]
            for t in range(STEPS)
        ],
        dim=1,
    )
    assert rel_err(y[[1]], pad) <= 1e-5
