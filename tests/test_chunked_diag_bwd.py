"""The fused chunked backward for diagonal decays (stage chunked_diag_bwd) and its selection.

`chunked_diag_bwd` is checked against autograd of the fp64 recurrent form (every gradient:
dx, ds, dlog a, dB, dC, dh0), with several chunks and row blocks per sequence, packed
sequences, shared heads and strong decays; every buffer the stage allocates starts as NaN
and is recorded, to show that no per-head [b, T, H, N] buffer of a shared role exists. dlog a
by straddling pairs (the default), by the suffix sum inside each chunk (dla="chunk", the
default for 16-bit inputs) and by the sequence's suffix sum (dla="suffix"),
and over 512 tokens the first at the fp32 reference's accuracy where the last is not. The
generated modules of examples/gla.ssm, examples/mamba1.ssm and a shared-head diagonal spec
then run it through `backward` against the fp64 reference of the whole spec.
"""

import os

import torch

# triton.jit reads the variable when a kernel is decorated: set before any stage is loaded.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import functools
import math
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from recording_torch import RecordingTorch

from ssmc import forms_torch, ir
from ssmc.load import load, load_source
from ssmc.pipeline import parse, parse_file, with_dims
from ssmc.reference import random_inputs, reference
from ssmc.render import backward_path, render_module, render_stage

HEADER = "import math\nimport torch\nimport triton\nimport triton.language as tl\n\n"
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
ROOT = Path(__file__).resolve().parent.parent


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ (‖out − ref‖ where ref is exactly 0)."""
    diff = (out.double().cpu() - ref).norm().item()
    scale = ref.norm().item()
    return diff / scale if scale > 0 else diff


@functools.cache
def diag_stage():
    """The stages a generated diagonal module holds for its backward, as one module."""
    source = "\n\n".join(
        render_stage(name) for name in ("chunked_diag", "adjoint", "chunked_diag_bwd")
    )
    return load_source(HEADER + source, "chunked_diag_bwd_stage")


@dataclass(frozen=True)
class Case:
    id: str
    groups: tuple[int, int, int, int]  # (Gv, Gk, Gq, Gd)
    H: int = 4
    N: int = 16
    P: int = 16
    T: int = 37
    h0: bool = True
    ht: bool = True
    seqlens: tuple[int, ...] = ()
    strength: float = 1.0  # log a in −strength·[0.01, 1.01]
    strength_late: float | None = None  # from token T // 2 on, if given


def inputs(case: Case, dtype: torch.dtype = torch.float32):
    """Fresh fp64 inputs seeded by the case id: x, B, C, dY exactly their `dtype` values (the
    kernel's inputs), the others their fp32 values."""
    g = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    Gv, Gk, Gq, Gd = case.groups
    batch, T = 2, case.T
    cu = None
    if case.seqlens:
        batch, T = 1, sum(case.seqlens)
        cu = torch.tensor([0, *torch.tensor(case.seqlens).cumsum(0).tolist()])
    S = len(case.seqlens) or batch

    def rand(*shape, cast=torch.float32):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(cast).double()

    log_a = -case.strength * (
        0.01 + torch.rand(batch, T, Gd, case.N, generator=g, dtype=torch.float64)
    )
    if case.strength_late is not None:
        log_a[:, T // 2 :] *= case.strength_late / case.strength
    return dict(
        x=rand(batch, T, Gv, case.P, cast=dtype),
        s=(0.5 + torch.rand(batch, T, Gv, generator=g, dtype=torch.float64)).float().double(),
        log_a=log_a.float().double(),
        B=rand(batch, T, Gk, case.N, cast=dtype),
        C=rand(batch, T, Gq, case.N, cast=dtype),
        h0=rand(S, case.H, case.N, case.P) if case.h0 else None,
        dy=rand(batch, T, case.H, case.P, cast=dtype),
        dfinal=rand(S, case.H, case.N, case.P) if case.ht else None,
        cu_seqlens=cu,
    )


def expected(case: Case, t: dict) -> dict:
    """Autograd of the fp64 recurrent form with X̄ = x s: (dx, ds, dlog_a, dB, dC, dh0)."""
    leaves = {
        k: None if t[k] is None else t[k].clone().requires_grad_()
        for k in ("x", "s", "log_a", "B", "C", "h0")
    }
    xbar = leaves["x"] * leaves["s"][..., None]
    y, final = forms_torch.recurrent(
        xbar,
        leaves["log_a"],
        leaves["B"],
        leaves["C"],
        case.H,
        initial_state=leaves["h0"],
        cu_seqlens=t["cu_seqlens"],
    )
    outputs, grads = [y], [t["dy"]]
    if t["dfinal"] is not None:
        outputs.append(final)
        grads.append(t["dfinal"])
    wanted = [k for k, v in leaves.items() if v is not None]
    got = torch.autograd.grad(outputs, [leaves[k] for k in wanted], grads)
    out = dict.fromkeys(("x", "s", "log_a", "B", "C", "h0"))
    out.update(zip(wanted, got, strict=True))
    return out


def run_check(
    case: Case, monkeypatch, bound: float = 1e-5, dtype: torch.dtype = torch.float32, **options
) -> RecordingTorch:
    """chunked_diag_bwd (Q = 32 in 16-row blocks: several chunks, row blocks and a partial
    last chunk) against `expected`; every gradient written, each within `bound` (dlog a with
    dla="suffix", a suffix sum of differences, 10×; by straddling pairs it lands at 1-2e-7 in
    fp32, as dB and dC). x, B, C, dY in `dtype`, the rest fp32."""
    t = inputs(case, dtype)
    want = expected(case, t)
    module = diag_stage()
    recorder = RecordingTorch()
    monkeypatch.setattr(module, "torch", recorder)

    def dev(v, cast=torch.float32):
        return None if v is None else v.to(DEVICE, cast)

    got = module.chunked_diag_bwd(
        dev(t["x"], dtype),
        dev(t["s"]),
        dev(t["log_a"]),
        dev(t["B"], dtype),
        dev(t["C"], dtype),
        heads=case.H,
        initial_state=dev(t["h0"]),
        dy=dev(t["dy"], dtype),
        dfinal=dev(t["dfinal"]),
        cu_seqlens=None if t["cu_seqlens"] is None else t["cu_seqlens"].to(DEVICE),
        **{"chunk_size": 32, "block_m": 16, "block_n": 16, "block_p": 16, **options},
    )
    for name, g in zip(("x", "s", "log_a", "B", "C", "h0"), got, strict=True):
        w = want[name]
        assert (g is None) == (w is None), name
        if w is None:
            continue
        # dx comes in x's dtype (its gradient's), the rest in fp32
        assert g.shape == w.shape and g.dtype == (dtype if name == "x" else torch.float32), name
        assert not g.isnan().any(), f"d{name}: every element is written"
        limit = bound * (10 if name == "log_a" and options.get("dla") == "suffix" else 1)
        assert rel_err(g, w) <= limit, (name, rel_err(g, w))
    return recorder


CASES = [
    Case("mha", (4, 4, 4, 4)),
    # Mamba-1: a head per channel (P = 1), B and C shared by all, a decay per head
    Case("mamba1-like", (8, 1, 1, 8), H=8, P=1),
    # shared B, C and decay (MVA with a grouped decay), N over two tiles, P not a power of 2
    Case("mva-shared", (4, 2, 2, 2), N=24, P=12),
    Case("mqa", (2, 2, 4, 2)),
    Case("mka-bare", (2, 4, 2, 1), h0=False, ht=False),
    # H = 6, groups of 3 (x, C) and of 2 (B, decay): the loop group is all six heads
    Case("grouped", (2, 3, 2, 3), H=6),
    Case("T1", (4, 2, 2, 2), T=1),
    Case("varlen", (4, 2, 2, 2), seqlens=(5, 0, 40, 1, 16)),
    Case("varlen-ht", (4, 1, 1, 4), h0=False, seqlens=(33, 7, 0)),
    # log a down to −30 a token: the exponents of every stage stay ≤ 0 (dX̄ from the
    # forward's A, shared by two heads; and from each head's own blocks)
    Case("strong", (4, 2, 2, 2), strength=30.0),
    Case("strong-mha", (4, 4, 4, 4), strength=30.0),
]


@pytest.mark.interpret
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_chunked_diag_bwd_matches_autograd(case: Case, monkeypatch) -> None:
    """fp32, every gradient within DESIGN §5's 1e-5 (dlog a 10×)."""
    run_check(case, monkeypatch)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_chunked_diag_bwd_half(dtype: torch.dtype, monkeypatch) -> None:
    """16-bit x, B, C, dY (chunk states in that type; dots in it on a GPU, fp32 on a CPU):
    DESIGN §5's bound for the type, with dlog a by the suffix sum inside each chunk (the
    default for 16-bit inputs) and by straddling pairs."""
    case = Case(f"half-{dtype}", (4, 2, 2, 2))
    bound = 1e-2 if dtype == torch.bfloat16 else 1e-3
    run_check(case, monkeypatch, bound, dtype)
    run_check(case, monkeypatch, bound, dtype, dla="straddle")


@pytest.mark.interpret
def test_chunked_diag_bwd_wide_half_takes_chunk(monkeypatch) -> None:
    """16-bit inputs (GLA's wide heads, Mamba-1's P = 1) form dlog a inside each chunk by
    default: the straddle launch is never reached, and every gradient is within fp16's bound."""
    monkeypatch.setattr(diag_stage(), "chunked_diag_bwd_dla_kernel", None)
    run_check(Case("wide-half", (2, 2, 2, 2), H=2, P=64, T=40), monkeypatch, 1e-3, torch.float16)
    run_check(replace(CASES[1], id="mamba1-half"), monkeypatch, 1e-3, torch.float16)


@pytest.mark.interpret
@pytest.mark.parametrize(
    ("case", "splits"),
    [(CASES[1], 4), (CASES[5], 2), (CASES[8], 3), (CASES[0], 2)],
    ids=lambda v: v.id if isinstance(v, Case) else str(v),
)
def test_chunked_diag_bwd_head_splits(case: Case, splits: int, monkeypatch) -> None:
    """A loop group's heads split over programs in whole decay groups (partial dB, dC sums,
    zero where a split has none of a group, summed after): the same gradients. Mamba-1-like
    H = 8 in 4 splits of 2 channels; H = 6 in splits of 4 and 2 heads, the second query group
    (heads 3-5) across both; packed sequences in 2 splits; MHA cannot split (one head a loop
    group)."""
    run_check(case, monkeypatch, head_splits=splits)


@pytest.mark.interpret
@pytest.mark.parametrize("groups", [(4, 2, 2, 2), (4, 4, 4, 4)], ids=["from-A", "own-A"])
def test_chunked_diag_bwd_other_tiles(groups: tuple[int, int, int, int], monkeypatch) -> None:
    """Chunks of 64 in 32-row blocks, the walks in 16-token steps, N tiles of 32 (two, the
    second partial): dX̄ from the forward's A, and from each head's own blocks."""
    case = Case(f"tiles-{groups}", groups, N=40, T=70, seqlens=())
    run_check(case, monkeypatch, chunk_size=64, block_m=32, block_n=32, block_t=16)


@pytest.mark.interpret
def test_chunked_diag_bwd_no_per_head_buffers(monkeypatch) -> None:
    """Shared B, C and decay (G = 2 of H = 8): no buffer of b·T·H·N elements or more exists
    but the two chunk-state buffers [R, H, N, P] (and the forward's A per A-group)."""
    case = Case("alloc", (8, 2, 2, 2), H=8, N=16, P=16, T=40)
    recorder = run_check(case, monkeypatch)
    b, T, H, N, P = 2, case.T, case.H, case.N, case.P
    # the gradients themselves (x's is per head here: Gv = H) and the boundary states
    grads = {(b, T, H, P), (b, T, 2, N), (b, T, 2), (b, H, N, P)}
    big = [s for s in recorder.shapes if math.prod(s) >= b * T * H * N and s not in grads]
    assert all(len(s) == 4 and s[1:] == (H, N, P) for s in big), big
    assert len(big) <= 2, big


def test_chunked_diag_bwd_empty_sequence() -> None:
    """T = 0: no tokens, so dh0 = dh_T and every other gradient is an empty zero tensor."""
    g = torch.Generator().manual_seed(7)
    x, B = torch.zeros(2, 0, 4, 16), torch.zeros(2, 0, 2, 16)
    dfinal = torch.randn(2, 4, 16, 16, generator=g)
    got = diag_stage().chunked_diag_bwd(
        x, torch.zeros(2, 0, 4), torch.zeros(2, 0, 2, 16), B, B, heads=4,
        initial_state=torch.randn(2, 4, 16, 16, generator=g), cu_seqlens=None,
        dy=torch.zeros(2, 0, 4, 16), dfinal=dfinal,
    )  # fmt: skip
    shapes = [(2, 0, 4, 16), (2, 0, 4), (2, 0, 2, 16), (2, 0, 2, 16), (2, 0, 2, 16)]
    assert [tuple(t.shape) for t in got[:5]] == shapes
    assert torch.equal(got[5], dfinal)


def test_chunked_diag_bwd_rejects_scalar_decay() -> None:
    x = torch.zeros(1, 4, 2, 16)
    with pytest.raises(ValueError, match="diagonal decay"):
        diag_stage().chunked_diag_bwd(
            x,
            None,
            torch.zeros(1, 4, 2),
            torch.zeros(1, 4, 2, 16),
            torch.zeros(1, 4, 2, 16),
            heads=2,
            initial_state=None,
            cu_seqlens=None,
            dy=torch.zeros(1, 4, 2, 16),
            dfinal=None,
        )


# ---------------------------------------------------------------------------------------
# dlog a: straddling pairs (the default) against the suffix sum of dcs.
# ---------------------------------------------------------------------------------------


@pytest.mark.interpret
@pytest.mark.parametrize(
    ("case", "options"),
    [
        (CASES[0], {}),
        (CASES[1], {"head_splits": 4}),
        (CASES[2], {}),
        (CASES[5], {}),
        (CASES[7], {}),
        (CASES[9], {}),
        # P = 40: the dla kernel's P tiles of 32, the second partial
        (Case("wide-p", (2, 2, 2, 2), P=40), {}),
    ],
    ids=lambda v: v.id if isinstance(v, Case) else "-".join(v) or "plain",
)
def test_chunked_diag_bwd_straddle_row_blocks(case: Case, options, monkeypatch) -> None:
    """dla="straddle" (the default) with chunks of 64 tokens in four 16-row blocks: the
    in-chunk states before and after a row block (H^c, Λ^c) over several blocks, the u, v of
    other blocks, a partial last chunk; MHA, Mamba-1-like in head splits, a decay group of two
    heads with N over two tiles, H = 6 in mixed groups, packed sequences, strong decays, P over
    two tiles."""
    long = replace(case, id=f"{case.id}-q64", T=90)
    run_check(long, monkeypatch, chunk_size=64, **options)


@pytest.mark.interpret
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[8]], ids=lambda c: c.id)
def test_chunked_diag_bwd_suffix(case: Case, monkeypatch) -> None:
    """dla="suffix" (the sequence's suffix sum of dcs = C ⊙ dC − B ⊙ dB, kept selectable):
    every gradient within the bounds, with h0, dfinal, shared heads and packed sequences."""
    run_check(case, monkeypatch, dla="suffix")


@pytest.mark.interpret
@pytest.mark.parametrize(
    ("case", "options"),
    [
        (CASES[0], {}),
        (CASES[1], {"head_splits": 4}),
        (CASES[2], {"chunk_size": 64}),
        (CASES[5], {"chunk_size": 64}),
        (CASES[7], {}),
        (CASES[8], {}),
        (CASES[10], {"chunk_size": 64, "bound": 1e-4}),
    ],
    ids=lambda v: v.id if isinstance(v, Case) else "-".join(map(str, v.values())) or "plain",
)
def test_chunked_diag_bwd_chunk(case: Case, options, monkeypatch) -> None:
    """dla="chunk" (the default for 16-bit inputs): dcs summed inside each chunk, Σ v per row
    block and the boundary product; h0, dfinal, Mamba-1-like head splits, shared heads over two
    N tiles, mixed groups, packed sequences with an empty one, four row blocks and a partial
    last chunk at Q = 64. With log a down to −30 the chunk's cancelling pairs leave 1.4e-5 in
    fp32 (straddle 1e-7), hence the looser bound there."""
    options = dict(options)
    case = replace(case, T=90) if options.get("chunk_size") == 64 else case
    run_check(case, monkeypatch, options.pop("bound", 1e-5), dla="chunk", **options)


class NoLaunch:
    """A kernel whose launches do nothing: shows that another launch wrote every output."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.interpret
@pytest.mark.parametrize(
    ("case", "options"),
    [
        (CASES[0], {}),
        (CASES[0], {"whole": False}),
        (replace(CASES[0], id="mha-late", T=90, strength_late=30.0), {"dbc_cross": "tf32x3"}),
        (replace(CASES[0], id="mha-varlen", seqlens=(5, 0, 40, 1, 16)), {"whole_blocks": (16, 1, 1), "walk_blocks": (16, 32, 2)}),
        (replace(CASES[0], id="mha-wide", N=24, P=40, T=90), {"chunk_size": 64, "whole_blocks": (16, 4, 2)}),
        (replace(CASES[0], id="mha-late-n", T=90, strength_late=30.0), {"whole_blocks": (16, 4, 1)}),
        (replace(CASES[0], id="mha-shared-x", groups=(2, 4, 4, 4)), {"dx_block_m": 32}),
    ],
    ids=lambda v: v.id if isinstance(v, Case) else "-".join(map(str, v.values())) or "plain",
)
def test_chunked_diag_bwd_whole(case: Case, options, monkeypatch) -> None:
    """dla="chunk" with B, C and the decay per head takes the whole chunk at once (one
    program per chunk, head and N tile for dC, dB and dlog a; dX̄ from the forward's A) where
    its decay spreads by at most 60, the row-block launches elsewhere: within 1e-5 with both
    kinds of chunk in one sequence (strong decays from T/2 on), packed sequences, N over two
    tiles, P not a power of two and x shared by two heads; and with whole=False."""
    run_check(case, monkeypatch, dla="chunk", **options)


@pytest.mark.interpret
def test_chunked_diag_bwd_whole_writes_every_chunk(monkeypatch) -> None:
    """Where every chunk's decay is within range the whole-chunk launch alone writes dC, dB
    and dlog a: with the row-block and dla launches made to do nothing (and every buffer
    NaN at first), the gradients are still right."""
    module = diag_stage()
    monkeypatch.setattr(module, "chunked_diag_bwd_dbc_kernel", NoLaunch())
    monkeypatch.setattr(module, "chunked_diag_bwd_dla_chunk_kernel", NoLaunch())
    run_check(CASES[0], monkeypatch, dla="chunk")


def test_chunked_diag_bwd_whole_refused() -> None:
    """whole=True where it cannot apply (shared B and C, or dla other than "chunk") is refused
    by name."""
    x = torch.zeros(1, 4, 2, 16)
    for shared, dla in ((1, "chunk"), (2, "straddle")):
        with pytest.raises(ValueError, match="whole"):
            diag_stage().chunked_diag_bwd(
                x, None, torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, shared, 16),
                torch.zeros(1, 4, shared, 16), heads=2, initial_state=None, cu_seqlens=None,
                dy=x, dfinal=None, dla=dla, whole=True,
            )  # fmt: skip


def test_chunked_diag_bwd_dla_option() -> None:
    """An unknown dla or dbc_cross is refused by name."""
    x = torch.zeros(1, 4, 2, 16)
    for option in ({"dla": "prefix"}, {"dbc_cross": "bf16"}):
        with pytest.raises(ValueError, match=next(iter(option))):
            diag_stage().chunked_diag_bwd(
                x, None, torch.zeros(1, 4, 2, 16), torch.zeros(1, 4, 2, 16),
                torch.zeros(1, 4, 2, 16), heads=2, initial_state=None, cu_seqlens=None, dy=x,
                dfinal=None, **option,
            )  # fmt: skip


def long_inputs(kind: str, seed: int, T: int, dtype: torch.dtype) -> dict:
    """A long single sequence: "mamba1" (H = 2 channels, P = 1, one B/C group for all, a decay
    per channel and n: log a = Δ A, X̄ = x Δ) or "gla" (H = 2, P = 16, B, C and a decay per
    head, log a = logsigmoid(g + 3) / 4: long memory); N = 16; x, B, C, dY in `dtype`.
    `weight` [1, T, H] turns dlog a into a parameter's gradient, Σ_t dlog a_t weight_t (dA)."""
    g = torch.Generator().manual_seed(seed)
    N = 16
    H, P, G = (2, 1, 1) if kind == "mamba1" else (2, 16, 2)
    x = torch.randn(1, T, H, P, generator=g)
    if kind == "mamba1":
        dt = torch.nn.functional.softplus(torch.randn(1, T, H, generator=g) - 2)
        log_a = dt[..., None] * -(torch.rand(H, N, generator=g) * 4 + 0.5)
        s, weight = dt, dt
    else:
        log_a = torch.nn.functional.logsigmoid(torch.randn(1, T, H, N, generator=g) + 3) / 4
        s, weight = None, torch.ones(1, T, H)
    B, C = (torch.randn(1, T, G, N, generator=g).to(dtype) for _ in range(2))
    dy = torch.randn(1, T, H, P, generator=g).to(dtype)
    return dict(H=H, x=x.to(dtype), s=s, log_a=log_a, B=B, C=C, dy=dy, weight=weight)


def long_errors(
    kind: str, seed: int, T: int, dtype: torch.dtype, modes=("suffix", "straddle")
) -> dict[str, float]:
    """Relative error of Σ_t dlog a_t weight_t (per channel and n) against fp64 autograd: of
    autograd in fp32 ("reference") and of chunked_diag_bwd with each dla (default chunks:
    Q = 64 in four 16-row blocks)."""
    t = long_inputs(kind, seed, T, dtype)
    w = t["weight"].double()[..., None]

    def grad(cast: torch.dtype) -> torch.Tensor:
        la = t["log_a"].to(cast).requires_grad_()
        xbar = t["x"].to(cast) * (1 if t["s"] is None else t["s"].to(cast)[..., None])
        y, _ = forms_torch.recurrent(xbar, la, t["B"].to(cast), t["C"].to(cast), t["H"])
        return (torch.autograd.grad(y, la, t["dy"].to(cast))[0].double() * w).sum((0, 1))

    want = grad(torch.float64)
    errs = {"reference": ((grad(torch.float32) - want).norm() / want.norm()).item()}
    d = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
    for dla in modes:
        got = diag_stage().chunked_diag_bwd(
            d["x"], d["s"], d["log_a"], d["B"], d["C"], heads=d["H"], initial_state=None,
            cu_seqlens=None, dy=d["dy"], dfinal=None, dla=dla,
        )[2].cpu()  # fmt: skip
        assert got.shape == t["log_a"].shape and torch.isfinite(got).all()
        errs[dla] = (((got.double() * w).sum((0, 1)) - want).norm() / want.norm()).item()
    return errs


@pytest.mark.interpret
@pytest.mark.parametrize(
    ("kind", "dtype", "bound"),
    [
        ("mamba1", torch.float32, 1e-6),
        ("mamba1", torch.float16, 1e-3),
        ("gla", torch.float32, 1e-6),
    ],
    ids=["mamba1-fp32", "mamba1-fp16", "gla-fp32"],
)
def test_chunked_diag_bwd_dlog_a_straddle_long_sequence(
    kind: str, dtype: torch.dtype, bound: float
) -> None:
    """Σ_t dlog a_t Δ_t (Mamba-1's dA) and Σ_t dlog a_t (GLA) over 512 tokens against fp64:
    the straddling pairs stay at the fp32 reference's level (seed 0: 1.2e-7 against the
    reference's 1.1e-7 Mamba-1, 2.1e-7 against 2.5e-7 GLA), the suffix sum of dcs does not
    (8.8e-6 Mamba-1, 1.4e-6 GLA); fp16 inputs (states stored in fp16): 3.3e-5 against 6.2e-3
    (docs/backward.md's table, seeds 0-3)."""
    errs = long_errors(kind, 0, 512, dtype)
    assert errs["straddle"] < bound, errs
    assert errs["straddle"] < errs["suffix"] / 5, errs


@pytest.mark.interpret
@pytest.mark.parametrize(
    ("kind", "dtype", "bound"),
    [("mamba1", torch.float32, 3e-6), ("mamba1", torch.float16, 2e-3)],
    ids=["mamba1-fp32", "mamba1-fp16"],
)
def test_chunked_diag_bwd_dlog_a_chunk_long_sequence(
    kind: str, dtype: torch.dtype, bound: float
) -> None:
    """dla="chunk" over 512 tokens: in fp32 Mamba-1's dA within 1.6e-6 (straddle 1.2e-7, the
    sequence's suffix sum 1.3e-5). With fp16 inputs on a CPU (fp32 dots) level with straddle
    (3.35e-5 against 3.34e-5, seed 0), whose error there is the states' fp16 storage. On the
    H100, with the dB/dC launches' dots between row blocks in fp16, chunk's in-chunk
    differences left 1.09e-3 against straddle's 1.0e-4; those dots are tf32 now
    (dbc_cross)."""
    errs = long_errors(kind, 0, 512, dtype, ("straddle", "chunk"))
    assert errs["chunk"] < bound, errs
    if dtype == torch.float16 and DEVICE == "cpu":
        assert errs["chunk"] < 1.1 * errs["straddle"], errs


# ---------------------------------------------------------------------------------------
# The generated modules: selection and gradients through `backward`.
# ---------------------------------------------------------------------------------------

SHARED = """
ssm diag_shared

dim H = 4, G = 2, N = 8, P = 4

input x : [batch, seq, H, P]
input dt : [batch, seq, H]
input B : [batch, seq, G, N]
input C : [batch, seq, G, N]
input g : [batch, seq, G, N]
output y : [batch, seq, H, P]

let delta = softplus(dt)

mask diagonal(log_a = logsigmoid(g))
query C
key   B
value x * delta

initial_state
final_state
varlen
"""


def spec(name: str) -> ir.CheckedSpec:
    if name == "diag_shared":
        return parse(SHARED)
    dims = {"gla": {"H": 2, "N": 8, "P": 4}, "mamba1": {"H": 4, "N": 8}}[name]
    return with_dims(parse_file(ROOT / "examples" / f"{name}.ssm"), dims)


def decay_inputs(checked: ir.CheckedSpec) -> set[str]:
    """The tensors log a reads: their gradients pass through the dlog a suffix sum."""
    from ssmc.expr import refs

    return set(refs(checked.spec.mask.log_a))


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("gla", "chunked_diag_bwd"),
        ("mamba1", "chunked_diag_bwd"),
        ("diag_shared", "chunked_diag_bwd"),
        ("mamba2", "chunked_bwd"),
        ("s4d", "adjoint"),
        ("toeplitz", "adjoint"),
    ],
)
def test_backward_path(name: str, path: str) -> None:
    """Diagonal decays with a chunked form take the fused diagonal backward; the module keeps
    core_backward beside it for fp64 inputs."""
    checked = (
        spec(name)
        if name in ("gla", "mamba1", "diag_shared")
        else parse_file(ROOT / "examples" / f"{name}.ssm")
    )
    assert backward_path(checked) == path
    if path == "chunked_diag_bwd":
        text = render_module(checked, versions={"ssmc": "0", "triton": "0", "torch": "0"})
        assert "= chunked_diag_bwd(" in text and "core_backward(" in text
        assert "= chunked_bwd(" not in text


def count_core_calls(op, monkeypatch) -> dict[str, int]:
    """Calls of the module's two core backwards, counted as they happen (not the compile-only
    run a GPU makes of a first call, whose kernels do not launch: the module's precompile)."""
    calls = {"chunked_diag_bwd": 0, "core_backward": 0}
    compile_only = getattr(op.module, "_COMPILE_ONLY", None)

    def spy(name: str):
        inner = getattr(op.module, name)

        def counted(*args, **kwargs):
            if compile_only is None or not compile_only.get():
                calls[name] += 1
            return inner(*args, **kwargs)

        return counted

    for name in calls:
        monkeypatch.setattr(op.module, name, spy(name))
    return calls


def module_check(
    name: str, gen: torch.Generator, monkeypatch, *, T: int, varlen: bool
) -> tuple[dict[str, int], list[tuple[int, ...]]]:
    """backward of the generated module against autograd of the fp64 reference, every
    gradient (fp32: 1e-5, the tensors log a reads 10×); returns the core paths it called and
    the shapes of the float buffers the module allocated (NaN-poisoned)."""
    checked = spec(name)
    op = load(checked)
    calls = count_core_calls(op, monkeypatch)
    recorder = RecordingTorch()
    monkeypatch.setattr(op.module, "torch", recorder)
    cu = None
    if varlen:
        lengths = [5, 0, T, 1]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        inputs = random_inputs(checked, batch=1, seqlen=sum(lengths), generator=gen)
        init = inputs.pop("initial_state")
        inputs["initial_state"] = torch.randn(
            (len(lengths), *init.shape[1:]), generator=gen, dtype=torch.float64
        )
    else:
        inputs = random_inputs(checked, batch=2, seqlen=T, generator=gen)
    init = inputs.pop("initial_state", None)
    want = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    want_init = None if init is None else init.clone().requires_grad_()
    y64, state64 = reference(checked)(**want, initial_state=want_init, cu_seqlens=cu)
    dy = torch.randn(y64.shape, generator=gen, dtype=torch.float64)
    dstate = None if state64 is None else torch.randn(state64.shape, generator=gen).double()
    ((y64 * dy).sum() + (0.0 if dstate is None else (state64 * dstate).sum())).backward()

    leaves = {k: v.float().to(DEVICE).requires_grad_() for k, v in inputs.items()}
    leaf_init = None if init is None else init.float().to(DEVICE).requires_grad_()
    y, state = op(
        **leaves, initial_state=leaf_init, cu_seqlens=None if cu is None else cu.to(DEVICE)
    )
    loss = (y * dy.float().to(DEVICE)).sum()
    if dstate is not None:
        loss = loss + (state * dstate.float().to(DEVICE)).sum()
    loss.backward()
    got = {k: v.grad for k, v in leaves.items()}
    ref = {k: v.grad for k, v in want.items()}
    if init is not None:
        got["initial_state"], ref["initial_state"] = leaf_init.grad, want_init.grad
    through_decay = decay_inputs(checked)
    for k, g in got.items():
        assert g is not None and g.dtype == torch.float32 and not g.isnan().any(), k
        bound = 1e-5 * (10 if k in through_decay else 1)
        assert rel_err(g, ref[k]) <= bound, (k, rel_err(g, ref[k]))
    return calls, recorder.shapes


def has_run(shape: tuple[int, ...], run: tuple[int, ...]) -> bool:
    """Whether `run` appears in `shape` as consecutive axes ((2, 40, 32, 1) has (2, 40, 32))."""
    return any(shape[i : i + len(run)] == run for i in range(len(shape) - len(run) + 1))


def test_has_run() -> None:
    assert has_run((2, 40, 32, 1), (2, 40, 32)) and has_run((1, 2, 40, 4, 8), (2, 40, 4, 8))
    assert not has_run((2, 40, 2, 8), (2, 40, 4, 8)) and not has_run((40, 32), (2, 40, 32))


MODULES = [
    pytest.param("gla", 70, False, id="gla"),
    pytest.param("gla", 23, True, id="gla-varlen"),
    pytest.param("mamba1", 70, False, id="mamba1"),
    pytest.param("diag_shared", 40, False, id="diag_shared"),
    pytest.param("diag_shared", 23, True, id="diag_shared-varlen"),
]


@pytest.mark.interpret
@pytest.mark.parametrize(("name", "T", "varlen"), MODULES)
def test_module_gradients(name: str, T: int, varlen: bool, gen, monkeypatch) -> None:
    """Every input's gradient (and the initial state's, under a final-state gradient) through
    the generated module, which runs chunked_diag_bwd and not core_backward. With shared B, C
    and decay (diag_shared: G = 2 of H = 4) no buffer of the module is per head and state dim
    ([b, T, H, N] or [b, T, H·N]: core_backward's per-head gradients and copies)."""
    calls, shapes = module_check(name, gen, monkeypatch, T=T, varlen=varlen)
    assert calls == {"chunked_diag_bwd": 1, "core_backward": 0}
    if name == "diag_shared":
        b, T = (1, T + 6) if varlen else (2, T)
        per_head = [(b, T, 4, 8), (b, T, 32)]
        assert not [s for s in shapes for w in per_head if has_run(s, w)], shapes


@pytest.mark.interpret
def test_module_fp64_takes_core_backward(gen, monkeypatch) -> None:
    """fp64 inputs are not the fused stage's: the module falls back to the three-SMA
    core_backward (fp64 arithmetic; the fp32 initial state bounds the error)."""
    checked = spec("gla")
    op = load(checked)
    calls = count_core_calls(op, monkeypatch)
    inputs = random_inputs(checked, batch=2, seqlen=20, generator=gen)
    init = inputs.pop("initial_state").float()
    dy = torch.randn(2, 20, 2, 4, dtype=torch.float64, generator=gen)
    grads, d_init = op.module.backward(
        **{k: v.to(DEVICE) for k, v in inputs.items()}, initial_state=init.to(DEVICE),
        grad_y=dy.to(DEVICE),
    )
    grads, d_init = [g.cpu() for g in grads], d_init.cpu()
    assert calls == {"chunked_diag_bwd": 0, "core_backward": 1}
    want = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    want_init = init.double().requires_grad_()
    y, _ = reference(checked)(**want, initial_state=want_init)
    (y * dy).sum().backward()
    for (k, w), g in zip(want.items(), grads, strict=True):
        assert g.dtype == torch.float64 and rel_err(g, w.grad) <= 1e-6, k
    assert rel_err(d_init, want_init.grad) <= 1e-6
