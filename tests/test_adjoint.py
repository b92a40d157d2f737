"""The `adjoint` stage: the core backward from forward SMAs, against autograd of the reference.

`core_backward` / `toeplitz_backward` are driven by the fp64 PyTorch forms (bound 1e-10)
and by the generated Triton forward kernels under TRITON_INTERPRET=1 (fp32, bound 1e-5 as
in DESIGN §5; the cases land near 1e-6). The reference is torch.autograd.grad through
`forms_torch.recurrent` (or the Toeplitz quadratic form) in fp64. Every gradient is
checked, and every forward output buffer the Triton drivers allocate is NaN-poisoned.
"""

import os

import torch

# triton.jit reads the variable when a kernel is decorated: set before any stage is loaded.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import functools
import math
import re
import zlib
from dataclasses import dataclass

import pytest
from recording_torch import RecordingTorch

from ssmc import forms_torch
from ssmc.load import load_source
from ssmc.render import render_stage

HEADER = "import math\nimport torch\nimport triton\nimport triton.language as tl\n\n"
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
NAMES = ("dx", "dlog_a", "dB", "dC", "dh0")


@functools.cache
def stage(name: str, **context: str):
    return load_source(
        HEADER + render_stage(name, **context), f"{name}_{'_'.join(context.values())}"
    )


def adjoint():
    return stage("adjoint")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖; ‖out‖ where the true gradient is exactly 0 (e.g. dlog a at T = 1
    without an initial state, where the terms cancel only up to rounding)."""
    diff = (out.double().cpu() - ref).norm().item()
    scale = ref.norm().item()
    return diff / scale if scale > 0 else diff


# ---------------------------------------------------------------------------------------
# Forward drivers with the canonical signature core_backward takes.
# ---------------------------------------------------------------------------------------


def torch_form(form: str):
    """A forms_torch form as a canonical forward (X̄ = x * s)."""

    def forward(
        x, s, log_a, B, C, *, heads, initial_state, want_final_state, cu_seqlens, chunk_size
    ):
        xbar = x if s is None else x * s[..., None]
        options = {"chunk_size": chunk_size or 16} if form == "chunked" else {}
        y, final = getattr(forms_torch, form)(
            xbar,
            log_a,
            B,
            C,
            heads,
            initial_state=initial_state,
            cu_seqlens=cu_seqlens,
            **options,
        )
        return y, (final if want_final_state else None)

    return forward


def triton_form(form: str):
    """The generated launchers as a canonical forward: `recurrent_fwd`, or the chunked
    stage of the decay (`chunked_fwd`, `chunked_diag_fwd`); outputs NaN-poisoned."""

    def forward(
        x, s, log_a, B, C, *, heads, initial_state, want_final_state, cu_seqlens, chunk_size
    ):
        decay = "none" if log_a is None else ("scalar" if log_a.dim() == 3 else "diagonal")
        batch, T, _, P = x.shape
        states = batch if cu_seqlens is None else cu_seqlens.numel() - 1
        out = torch.full((batch, T, heads, P), float("nan"), device=x.device)
        final = None
        if want_final_state:
            final = torch.full((states, heads, B.shape[-1], P), float("nan"), device=x.device)
        args = dict(
            heads=heads,
            out=out,
            initial_state=initial_state,
            final_state=final,
            cu_seqlens=cu_seqlens,
        )
        if form == "recurrent":
            stage("recurrent", decay=decay).recurrent_fwd(x, s, log_a, B, C, **args)
        elif decay == "diagonal":
            stage("chunked_diag", decay=decay).chunked_diag_fwd(
                x, s, log_a, B, C, chunk_size=chunk_size, **args
            )
        else:
            stage("chunked", decay=decay).chunked_fwd(
                x, s, log_a, B, C, chunk_size=chunk_size, block_n=16, block_p=16, **args
            )
        return out, final

    return forward


# ---------------------------------------------------------------------------------------
# The core: cases, inputs, the autograd reference.
# ---------------------------------------------------------------------------------------

# (Gv, Gk, Gq, Gd) of DESIGN §2's patterns, G = 2 of H = 4 where a role is shared.
PATTERNS = {
    "mha": (4, 4, 4, 4),
    "mqa": (2, 2, 4, 2),
    "mka": (2, 4, 2, 1),
    "mva": (4, 2, 2, 4),
}
STATES = {"h0-ht": (True, True), "h0": (True, False), "ht": (False, True), "bare": (False, False)}


@dataclass(frozen=True)
class Case:
    id: str
    decay: str
    groups: tuple[int, int, int, int]
    T: int = 7
    h0: bool = True
    ht: bool = True
    seqlens: tuple[int, ...] = ()
    N: int = 3
    P: int = 5
    H: int = 4


def inputs(case: Case, dtype: torch.dtype):
    """Fresh random inputs (seeded by the case id), leaves of the reference graph."""
    g = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    Gv, Gk, Gq, Gd = case.groups
    batch, H, N, P, T = 2, case.H, case.N, case.P, case.T
    cu_seqlens = None
    if case.seqlens:
        batch, T = 1, sum(case.seqlens)
        cu_seqlens = torch.tensor([0, *torch.tensor(case.seqlens).cumsum(0).tolist()])
    states = len(case.seqlens) or batch

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype)

    decay_shape = {"none": None, "scalar": (batch, T, Gd), "diagonal": (batch, T, Gd, N)}
    shape = decay_shape[case.decay]
    log_a = None if shape is None else -(0.01 + torch.rand(*shape, generator=g, dtype=dtype))
    return dict(
        x=rand(batch, T, Gv, P),
        log_a=log_a,
        B=rand(batch, T, Gk, N),
        C=rand(batch, T, Gq, N),
        h0=rand(states, H, N, P) if case.h0 else None,
        dy=rand(batch, T, H, P),
        dfinal=rand(states, H, N, P) if case.ht else None,
        cu_seqlens=cu_seqlens,
        heads=H,
    )


def reference(t: dict):
    """Autograd of the fp64 recurrent form: the gradients in NAMES order (None kept)."""
    leaves = [
        None if t[k] is None else t[k].double().requires_grad_()
        for k in ("x", "log_a", "B", "C", "h0")
    ]
    x, log_a, B, C, h0 = leaves
    y, final = forms_torch.recurrent(
        x, log_a, B, C, t["heads"], initial_state=h0, cu_seqlens=t["cu_seqlens"]
    )
    outputs, grads = [y], [t["dy"].double()]
    if t["dfinal"] is not None:
        outputs.append(final)
        grads.append(t["dfinal"].double())
    wanted = [leaf for leaf in leaves if leaf is not None]
    found = iter(torch.autograd.grad(outputs, wanted, grads, allow_unused=True))
    return [None if leaf is None else next(found) for leaf in leaves]


def check(case: Case, forward, dtype: torch.dtype, bound: float, chunk_size=None) -> None:
    t = inputs(case, dtype)
    ref = reference(t)

    def dev(v):
        return None if v is None else v.to(DEVICE)

    got = adjoint().core_backward(
        forward,
        dev(t["x"]),
        dev(t["log_a"]),
        dev(t["B"]),
        dev(t["C"]),
        heads=t["heads"],
        initial_state=dev(t["h0"]),
        cu_seqlens=dev(t["cu_seqlens"]),
        dy=dev(t["dy"]),
        dfinal=dev(t["dfinal"]),
        chunk_size=chunk_size,
    )
    for name, g, r in zip(NAMES, got, ref, strict=True):
        assert (g is None) == (r is None), name
        if r is not None:
            assert g.shape == r.shape, name
            assert g.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), name
            assert rel_err(g, r) <= bound, (name, rel_err(g, r))


CORE = [
    Case(f"{decay}-{pattern}-T{T}-{states}", decay, groups, T=T, h0=h0, ht=ht)
    for decay in ("none", "scalar", "diagonal")
    for pattern, groups in PATTERNS.items()
    for T in (1, 7, 33)
    for states, (h0, ht) in STATES.items()
]
VARLEN = [
    Case(f"{decay}-{pattern}-varlen-{states}", decay, groups, h0=h0, ht=ht, seqlens=(5, 17, 11))
    for decay in ("none", "scalar", "diagonal")
    for pattern, groups in PATTERNS.items()
    for states, (h0, ht) in STATES.items()
] + [
    Case(f"{decay}-varlen-empty-{seqlens}", decay, PATTERNS["mva"], seqlens=seqlens)
    for decay in ("none", "scalar", "diagonal")
    for seqlens in ((0, 6, 4), (6, 0, 4), (6, 4, 0))
]


@pytest.mark.parametrize("case", CORE + VARLEN, ids=lambda c: c.id)
def test_core_backward_recurrent_form(case: Case) -> None:
    check(case, torch_form("recurrent"), torch.float64, 1e-10)


DRIVERS = [
    ("chunked", Case("scalar-mva-chunked", "scalar", PATTERNS["mva"], T=33)),
    ("chunked", Case("diagonal-mka-chunked", "diagonal", PATTERNS["mka"], T=33)),
    ("chunked", Case("none-varlen-chunked", "none", PATTERNS["mqa"], seqlens=(5, 17, 11))),
    ("quadratic", Case("scalar-mqa-quadratic", "scalar", PATTERNS["mqa"], T=33)),
    ("quadratic", Case("none-varlen-quadratic", "none", PATTERNS["mva"], seqlens=(5, 17, 11))),
]


@pytest.mark.parametrize("form, case", DRIVERS, ids=lambda v: v if isinstance(v, str) else v.id)
def test_core_backward_other_forms(form: str, case: Case) -> None:
    """Any canonical forward drives it: the chunked (Q = 16) and quadratic forms too."""
    check(case, torch_form(form), torch.float64, 1e-10, chunk_size=16)


TRITON = [
    ("recurrent", Case("tr-none-mva", "none", PATTERNS["mva"], T=9, N=16, P=16)),
    ("recurrent", Case("tr-scalar-mka", "scalar", PATTERNS["mka"], T=9, N=16, P=16)),
    ("recurrent", Case("tr-diagonal-mqa", "diagonal", PATTERNS["mqa"], T=9, N=4, P=16)),
    (
        "recurrent",
        Case("tr-diagonal-varlen", "diagonal", PATTERNS["mva"], seqlens=(3, 6, 2), N=4, P=16),
    ),
    ("chunked", Case("tc-scalar-mva", "scalar", PATTERNS["mva"], T=20, N=16, P=16)),
    (
        "chunked",
        Case("tc-none-mqa-bare", "none", PATTERNS["mqa"], T=20, h0=False, ht=False, N=16, P=16),
    ),
    (
        "chunked",
        Case("tc-scalar-varlen", "scalar", PATTERNS["mha"], seqlens=(5, 13, 4), N=16, P=16),
    ),
    ("chunked", Case("tc-diagonal-mha", "diagonal", PATTERNS["mha"], T=20, N=4, P=16)),
]


@pytest.mark.interpret
@pytest.mark.parametrize("form, case", TRITON, ids=lambda v: v if isinstance(v, str) else v.id)
def test_core_backward_triton_forwards(form: str, case: Case) -> None:
    check(case, triton_form(form), torch.float32, 1e-5, chunk_size=16)


def test_adjoint_stage_has_no_imports() -> None:
    """The stage is plain Python over the module's own `torch`: no import of its own."""
    assert not re.search(r"^\s*(import|from)\s", render_stage("adjoint"), re.M)


# ---------------------------------------------------------------------------------------
# Toeplitz masks.
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToeplitzCase:
    id: str
    T: int = 7
    L: int = 5
    groups: tuple[int, int] = (4, 4)  # (Gv, Gd)
    seqlens: tuple[int, ...] = ()
    P: int = 5


def toeplitz_inputs(case: ToeplitzCase, dtype: torch.dtype):
    g = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    Gv, Gd = case.groups
    batch, H, T = 2, 4, case.T
    cu_seqlens = None
    if case.seqlens:
        batch, T = 1, sum(case.seqlens)
        cu_seqlens = torch.tensor([0, *torch.tensor(case.seqlens).cumsum(0).tolist()])
    return dict(
        x=torch.randn(batch, T, Gv, case.P, generator=g, dtype=dtype),
        kernel=torch.randn(Gd, case.L, generator=g, dtype=dtype),
        dy=torch.randn(batch, T, H, case.P, generator=g, dtype=dtype),
        cu_seqlens=cu_seqlens,
        heads=H,
    )


def toeplitz_check(case: ToeplitzCase, forward, dtype: torch.dtype, bound: float) -> None:
    t = toeplitz_inputs(case, dtype)
    x, kernel = t["x"].double().requires_grad_(), t["kernel"].double().requires_grad_()
    y = forms_torch.toeplitz_quadratic(x, kernel, t["heads"], cu_seqlens=t["cu_seqlens"])
    ref = torch.autograd.grad(y, (x, kernel), t["dy"].double())

    def dev(v):
        return None if v is None else v.to(DEVICE)

    got = adjoint().toeplitz_backward(
        forward,
        dev(t["x"]),
        dev(t["kernel"]),
        heads=t["heads"],
        cu_seqlens=dev(t["cu_seqlens"]),
        dy=dev(t["dy"]),
    )
    for name, g, r in zip(("dx", "dkernel"), got, ref, strict=True):
        assert g.shape == r.shape, name
        assert rel_err(g, r) <= bound, (name, rel_err(g, r))


def toeplitz_torch(form: str):
    def forward(x, s, kernel, *, heads, cu_seqlens):
        xbar = x if s is None else x * s[..., None]
        return getattr(forms_torch, form)(xbar, kernel, heads, cu_seqlens=cu_seqlens)

    return forward


def toeplitz_triton(x, s, kernel, *, heads, cu_seqlens):
    out = torch.full((*x.shape[:2], heads, x.shape[3]), float("nan"), device=x.device)
    stage("toeplitz").toeplitz_fwd(
        x,
        s,
        kernel,
        heads=heads,
        out=out,
        cu_seqlens=cu_seqlens,
        block_i=16,
        block_j=16,
        block_p=16,
    )
    return out


TOEPLITZ = [
    ToeplitzCase(f"T{T}-L{L}-G{Gv}x{Gd}", T=T, L=L, groups=(Gv, Gd))
    for T in (1, 7, 33)
    for L in (1, 5, 40)
    for Gv, Gd in ((4, 4), (1, 4), (4, 1), (2, 2))
] + [
    ToeplitzCase("varlen", L=6, seqlens=(5, 17, 11), groups=(2, 4)),
    ToeplitzCase("varlen-long-kernel", L=40, seqlens=(5, 17, 11), groups=(4, 2)),
]


@pytest.mark.parametrize("form", ["toeplitz_quadratic", "toeplitz_convolution"])
@pytest.mark.parametrize("case", TOEPLITZ, ids=lambda c: c.id)
def test_toeplitz_backward(case: ToeplitzCase, form: str) -> None:
    toeplitz_check(case, toeplitz_torch(form), torch.float64, 1e-10)


def test_toeplitz_backward_empty_sequence() -> None:
    """An empty packed sequence (quadratic form: forms_torch's FFT form refuses length 0)."""
    case = ToeplitzCase("varlen-empty", L=6, seqlens=(6, 0, 4))
    toeplitz_check(case, toeplitz_torch("toeplitz_quadratic"), torch.float64, 1e-10)


@pytest.mark.interpret
@pytest.mark.parametrize(
    "case",
    [
        ToeplitzCase("tt-T20-L6", T=20, L=6, groups=(2, 4), P=16),
        ToeplitzCase("tt-varlen", L=9, seqlens=(5, 13, 4), groups=(4, 2), P=16),
    ],
    ids=lambda c: c.id,
)
def test_toeplitz_backward_triton_forward(case: ToeplitzCase) -> None:
    toeplitz_check(case, toeplitz_triton, torch.float32, 1e-5)


# ---------------------------------------------------------------------------------------
# The fused chunked backward (stage chunked_bwd): group sums inside the kernels.
# ---------------------------------------------------------------------------------------


@functools.cache
def fused_stage(decay: str):
    source = "\n\n".join(
        render_stage(name, **ctx)
        for name, ctx in (("seq_tiles", {}), ("adjoint", {}), ("chunked_bwd", {"decay": decay}))
    )
    return load_source(HEADER + source, f"chunked_bwd_{decay}")


FUSED = [
    Case("f-scalar-mva", "scalar", PATTERNS["mva"], T=37, N=16, P=16),
    Case("f-scalar-mqa", "scalar", PATTERNS["mqa"], T=37, N=16, P=16),
    Case("f-scalar-mka-bare", "scalar", PATTERNS["mka"], T=37, h0=False, ht=False, N=16, P=16),
    Case("f-scalar-mha-T1", "scalar", PATTERNS["mha"], T=1, N=16, P=16),
    Case("f-none-mva-ht", "none", PATTERNS["mva"], T=37, h0=False, N=16, P=16),
    Case("f-none-mqa", "none", PATTERNS["mqa"], T=20, N=16, P=16),
    # H = 6 with groups of 3 (x, dt) and of 2 (B, C): the runs are not nested, the loop
    # group is all six heads and each role's sum is stored at its own boundaries
    Case("f-scalar-grouped", "scalar", (2, 3, 3, 2), T=37, N=16, P=16, H=6),
    Case("f-scalar-varlen", "scalar", PATTERNS["mva"], seqlens=(5, 0, 23, 1), N=16, P=16),
    Case("f-none-varlen", "none", PATTERNS["mka"], seqlens=(17, 4, 0), N=16, P=16),
]


def fused_check(
    case: Case, dtype: torch.dtype, bound: float, monkeypatch, **options: int
) -> RecordingTorch:
    """chunked_bwd (Q = 16, 16-row blocks: several chunks and row blocks per sequence, a
    partial last chunk) against autograd of the fp64 recurrent form, X̄ = x s."""
    t = inputs(case, torch.float64)
    g = torch.Generator().manual_seed(zlib.crc32(case.id.encode()) + 1)
    s = 0.5 + torch.rand(t["x"].shape[:3], generator=g, dtype=torch.float64)
    for k in ("B", "C", "dy"):  # the kernel's inputs, exactly
        t[k] = t[k].to(dtype).double()
    x = t["x"].to(dtype)
    t["x"] = x.double() * s[..., None]
    dxbar, dla, dB, dC, dh0 = reference(t)
    want = {
        "dx": dxbar * s[..., None],
        "ds": (dxbar * x.double()).sum(-1),
        "dlog_a": dla,
        "dB": dB,
        "dC": dC,
        "dh0": dh0,
    }
    module = fused_stage(case.decay)
    recorder = RecordingTorch()
    monkeypatch.setattr(module, "torch", recorder)

    def dev(v, cast=True):
        return None if v is None else v.to(DEVICE, dtype if cast else None)

    got = module.chunked_bwd(
        dev(x),
        dev(s, cast=False).float(),
        None if t["log_a"] is None else dev(t["log_a"], cast=False).float(),
        dev(t["B"]),
        dev(t["C"]),
        heads=t["heads"],
        initial_state=None if t["h0"] is None else dev(t["h0"], cast=False).float(),
        cu_seqlens=dev(t["cu_seqlens"], cast=False),
        dy=dev(t["dy"]),
        dfinal=None if t["dfinal"] is None else dev(t["dfinal"], cast=False).float(),
        **{"chunk_size": 16, "block_m": 16, "block_n": 16, "block_p": 16, **options},
    )
    for (name, w), gr in zip(want.items(), got, strict=True):
        assert (gr is None) == (w is None), name
        if w is not None:
            # dx comes in x's dtype (its gradient's), the rest in fp32
            assert gr.shape == w.shape, name
            assert gr.dtype == (dtype if name == "dx" else torch.float32), name
            assert not gr.isnan().any(), f"{name}: every element is written"
            limit = bound * (10 if name == "dlog_a" else 1)
            assert rel_err(gr, w) <= limit, (name, rel_err(gr, w))
    return recorder


@pytest.mark.interpret
@pytest.mark.parametrize("case", FUSED, ids=lambda c: c.id)
def test_fused_chunked_backward(case: Case, monkeypatch) -> None:
    """fp32, every gradient within DESIGN §5's 1e-5 (dlog a, a suffix sum of differences,
    10×); no buffer of b·T·H·N elements or more exists but the two chunk-state buffers."""
    recorder = fused_check(case, torch.float32, 1e-5, monkeypatch)
    batch = 1 if case.seqlens else 2
    T = sum(case.seqlens) or case.T
    Gv, Gk, Gq, _ = case.groups
    S = len(case.seqlens) or batch
    grads = {(batch, T, Gv, case.P), (batch, T, Gk, case.N), (batch, T, Gq, case.N)}
    grads.add((S, case.H, case.N, case.P))  # h_T and dh0
    per_head = batch * T * case.H * min(case.N, case.P)
    # gradients come per group (a leading axis: the head splits' partial sums, here 1)
    # dbc="shared" (the default): W [R, lcm(Gq, Gk), Q, Q], b·T·Q per W group — against
    # b·T·H·N it only counts at these tiny sizes; it exists only when heads share B and C
    Gw = math.lcm(Gq, Gk)
    w = [s for s in recorder.shapes if len(s) == 4 and s[1] == Gw < case.H and s[2] == s[3]]
    # and W's parts when its heads are split (wdla): [splits ≤ 4, R, Gw, Q, Q]
    w += [s for s in recorder.shapes
          if len(s) == 5 and s[0] <= 4 and s[2] == Gw < case.H and s[3] == s[4]]
    big = [
        s
        for s in recorder.shapes
        if math.prod(s) >= per_head and s not in grads and not (s[0] == 1 and s[1:] in grads)
        and s not in w
    ]
    assert all(len(s) == 4 and s[1:] == (case.H, case.N, case.P) for s in big), big
    assert len(big) <= 2, big


@pytest.mark.interpret
@pytest.mark.parametrize("case", [FUSED[0], FUSED[1], FUSED[6], FUSED[7]], ids=lambda c: c.id)
def test_fused_chunked_backward_wdla_two_blocks(case: Case, monkeypatch) -> None:
    """W and dlog a in one launch (wdla, the default where heads share B and C) with chunks
    of two 16-row blocks and partial chunks: the tile below the diagonal puts its column
    prefix and row suffix sums in their slots; the separate W and dla launches are not run;
    also with the heads split over two programs (W's parts summed after). Then wdla=False,
    which runs them."""
    module = fused_stage(case.decay)
    Gv, Gk, Gq, Gd = case.groups
    Gw = math.lcm(Gq, Gk)
    with monkeypatch.context() as patch:
        # fused where W groups hold whole decay groups (the grouped case's do not: the
        # separate launches run there)
        if Gw < case.H and (case.H // Gw) % (case.H // Gd) == 0:
            patch.setattr(module, "chunked_bwd_dla_kernel", None)
            patch.setattr(module, "chunked_bwd_w_kernel", None)
        fused_check(case, torch.float32, 1e-5, patch, chunk_size=32)
        fused_check(case, torch.float32, 1e-5, patch, chunk_size=32, wdla_splits=2)
    fused_check(case, torch.float32, 1e-5, monkeypatch, chunk_size=32, wdla=False)


@pytest.mark.interpret
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fused_chunked_backward_half(dtype: torch.dtype, monkeypatch) -> None:
    """16-bit x, B, C, dY (dots in that type with fp32 accumulation on a GPU; the CPU
    interpreter's bf16 dot is broken, so bf16 dots run in fp32 there): DESIGN §5's bound."""
    case = Case(f"f-{dtype}-mva", "scalar", PATTERNS["mva"], T=37, N=16, P=16)
    fused_check(case, dtype, 1e-2 if dtype == torch.bfloat16 else 1e-3, monkeypatch)


@pytest.mark.interpret
@pytest.mark.parametrize(
    "case, splits",
    [(FUSED[0], 2), (FUSED[1], 2), (FUSED[6], 4), (FUSED[7], 2)],
    ids=lambda v: v.id if isinstance(v, Case) else str(v),
)
def test_fused_chunked_backward_head_splits(case: Case, splits: int, monkeypatch) -> None:
    """A loop group's heads split over programs (partial sums, zero where a split has none of
    a group, summed after): the same gradients. H = 6 with 4 asked gives 3 splits of 2 heads,
    each ending inside a group of 3."""
    fused_check(case, torch.float32, 1e-5, monkeypatch, head_splits=splits)


@pytest.mark.interpret
@pytest.mark.parametrize("case", [FUSED[0], FUSED[4], FUSED[7]], ids=lambda c: c.id)
def test_fused_chunked_backward_long_chunks(case: Case, monkeypatch) -> None:
    """Chunks of 32 tokens walked in 16-token steps and cut into two 16-row blocks (the
    walk's sub-blocks, the row blocks' earlier and later blocks inside one chunk)."""
    fused_check(case, torch.float32, 1e-5, monkeypatch, chunk_size=32, block_t=16)


@pytest.mark.parametrize("case", [c for c in FUSED if "varlen" in c.id or "grouped" in c.id],
                         ids=lambda c: c.id)
def test_fused_chunked_backward_stored_cc(case: Case, monkeypatch) -> None:
    """stored_cc: the within-chunk sums of log a computed once (chunked_bwd_cc_kernel) and
    read by the dB, dC, dX̄ kernels give the same gradients."""
    fused_check(case, torch.float32, 1e-5, monkeypatch, stored_cc=True)


def test_fused_chunked_backward_dot_dtype() -> None:
    """16-bit dots only on a GPU and with several row blocks per chunk: a chunk of one row
    block runs fp32 dots (Triton 3.6 miscompiled its 16-bit kernels on the H100)."""
    module = fused_stage("scalar")
    pick, tl = module._chunked_bwd_dot_dtype, module.tl
    assert pick(torch.bfloat16, "cuda", 256, 64) == tl.bfloat16
    assert pick(torch.float16, "cuda", 128, 64) == tl.float16
    assert pick(torch.bfloat16, "cuda", 64, 64) == tl.float32
    assert pick(torch.bfloat16, "cpu", 256, 64) == tl.float32
    assert pick(torch.float32, "cuda", 256, 64) == tl.float32


def test_fused_chunked_backward_diag_term() -> None:
    """The diagonal products added back per group equal the per-head sum written out, for
    groupings that nest and that do not (H = 6, groups of 3 and of 2)."""
    module = fused_stage("scalar")
    g = torch.Generator().manual_seed(7)
    diag = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    for G_other, groups in ((1, 6), (6, 1), (2, 3), (3, 2), (6, 6)):
        other = torch.randn(2, 5, G_other, 4, generator=g, dtype=torch.float64)
        want = torch.zeros(2, 5, groups, 4, dtype=torch.float64)
        for h in range(6):
            want[:, :, h // (6 // groups)] += diag[:, :, h, None] * other[:, :, h // (6 // G_other)]
        got = module._chunked_bwd_diag_term(diag, other, groups)
        assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6), (G_other, groups)


def test_fused_chunked_backward_dlog_a_long_sequence() -> None:
    """Σ_t dlog a_t Δ_t (what dA is made of) over 2048 tokens in 256-token chunks, fp32,
    against fp64: dlog a within a chunk plus the boundary product ⟨H_{r+1}, Λ_r⟩ keeps the
    error at 6e-5; summing dcs over the whole rest of the sequence gave 2.5e-4."""
    module = fused_stage("scalar")
    g = torch.Generator().manual_seed(0)
    T, H, N, P = 2048, 4, 16, 16
    x = torch.randn(1, T, H, P, generator=g)
    B, C = torch.randn(1, T, 1, N, generator=g), torch.randn(1, T, 1, N, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(1, T, H, generator=g) - 2)
    log_a = dt * -(torch.rand(H, generator=g) * 4 + 0.5)
    dy = torch.randn(1, T, H, P, generator=g)
    xbar = (x * dt[..., None]).double()
    la = log_a.double().requires_grad_()
    y, _ = forms_torch.recurrent(xbar, la, B.double(), C.double(), H)
    want = torch.autograd.grad(y, la, dy.double())[0]
    got = module.chunked_bwd(x, dt, log_a, B, C, heads=H, initial_state=None, cu_seqlens=None,
                             dy=dy, dfinal=None, dla="suffix")[2]
    assert got.shape == want.shape and torch.isfinite(got).all()
    w = dt.double()
    err = ((got.double() - want) * w).sum((0, 1)).norm() / (want * w).sum((0, 1)).norm()
    assert err < 1e-4, f"Σ dlog a Δ: relative error {err:.2e}"


STRADDLE = [c for c in FUSED if c.decay == "scalar"]


@pytest.mark.interpret
@pytest.mark.parametrize("case", STRADDLE, ids=lambda c: c.id)
def test_fused_chunked_backward_suffix(case: Case, monkeypatch) -> None:
    """dla="suffix" (the in-chunk suffix sum of dcs plus the boundary product; the default
    is "straddle", which the other fused tests run): every gradient within the bounds, with
    varlen, grouped heads, h0 and dfinal; chunks of one 16-row block."""
    fused_check(case, torch.float32, 1e-5, monkeypatch, dla="suffix")


@pytest.mark.interpret
@pytest.mark.parametrize(
    "case, options",
    [
        (FUSED[0], {}),
        (FUSED[6], {"stored_cc": True}),
        (FUSED[7], {"head_splits": 2}),
        (FUSED[2], {}),
        (FUSED[0], {"dla_decay": "pairs", "dla_diag": "scan"}),
        (FUSED[7], {"dla_block_m": 32}),
        (FUSED[6], {"dla_block_m": 32, "dla_decay": "pairs"}),
        (FUSED[1], {"dla_diag": "scan"}),
    ],
    ids=lambda v: v.id if isinstance(v, Case) else "-".join(v) or "plain",
)
def test_fused_chunked_backward_straddle_row_blocks(case: Case, options, monkeypatch) -> None:
    """dla="straddle" with chunks of 64 tokens in four 16-row blocks: the tiles below the
    diagonal (column prefix sums, running totals, row sums) and the state terms across
    blocks; also with the stored cc, head splits, the diagonal tiles' decays over the pairs'
    own tokens (dla_decay="pairs") and their straddling sums as a scan (dla_diag="scan"),
    and the dla launch's own row block (two of 32)."""
    fused_check(case, torch.float32, 1e-5, monkeypatch, chunk_size=64, block_t=16,
                dla="straddle", **options)


def test_fused_chunked_backward_dla_option() -> None:
    """An unknown dla is refused by name."""
    module = fused_stage("scalar")
    x = torch.randn(1, 4, 1, 16)
    with pytest.raises(ValueError, match="dla"):
        module.chunked_bwd(x, None, torch.zeros(1, 4, 1), torch.randn(1, 4, 1, 16),
                           torch.randn(1, 4, 1, 16), heads=1, initial_state=None,
                           cu_seqlens=None, dy=torch.randn(1, 4, 1, 16), dfinal=None,
                           dla="prefix")
    with pytest.raises(ValueError, match="dla_decay"):
        module.chunked_bwd(x, None, torch.zeros(1, 4, 1), torch.randn(1, 4, 1, 16),
                           torch.randn(1, 4, 1, 16), heads=1, initial_state=None,
                           cu_seqlens=None, dy=torch.randn(1, 4, 1, 16), dfinal=None,
                           dla_decay="cumsum")
    with pytest.raises(ValueError, match="dla_diag"):
        module.chunked_bwd(x, None, torch.zeros(1, 4, 1), torch.randn(1, 4, 1, 16),
                           torch.randn(1, 4, 1, 16), heads=1, initial_state=None,
                           cu_seqlens=None, dy=torch.randn(1, 4, 1, 16), dfinal=None,
                           dla_diag="rows")


@pytest.mark.interpret
def test_fused_chunked_backward_dx_into() -> None:
    """dx_into: the dX̄ launch adds dx into the tensor given (another part of x's gradient)
    and returns that tensor; the other gradients are unchanged; a tensor of another shape or
    dtype is refused by name."""
    module = fused_stage("scalar")
    g = torch.Generator().manual_seed(3)
    T, H, N, P = 40, 2, 16, 16
    x, B, C, dt, dy, prior = (
        torch.randn(shape, generator=g).to(DEVICE)
        for shape in ((1, T, H, P), (1, T, 1, N), (1, T, 1, N), (1, T, H), (1, T, H, P),
                      (1, T, H, P)))
    dt = torch.nn.functional.softplus(dt)
    log_a = dt * -0.5
    kw = dict(heads=H, initial_state=None, cu_seqlens=None, dy=dy, dfinal=None, chunk_size=16)
    want = module.chunked_bwd(x, dt, log_a, B, C, **kw)
    into = prior.clone()
    got = module.chunked_bwd(x, dt, log_a, B, C, **kw, dx_into=into)
    assert got[0] is into
    assert torch.allclose(into, want[0] + prior, rtol=1e-6, atol=1e-6)
    for a, b in zip(got[1:5], want[1:5], strict=True):
        assert torch.equal(a, b)
    for bad in (torch.zeros(1, T, H, P + 1, device=DEVICE),
                torch.zeros(1, T, H, P, dtype=torch.float64, device=DEVICE)):
        with pytest.raises(ValueError, match="dx_into"):
            module.chunked_bwd(x, dt, log_a, B, C, **kw, dx_into=bad)


def test_fused_chunked_backward_dlog_a_straddle_long_sequence() -> None:
    """Σ_t dlog a_t Δ_t over 2048 tokens in 128-token chunks (two 64-row blocks), fp32, against
    fp64. dla="straddle" with dla_decay="pairs", dla_diag="scan" sums only the pairs of tokens
    around t and the decays over their own tokens: 2-9e-7 over seeds (the fp32 reference's
    own autograd: 0.5-2e-7); the defaults ("diff", "sums": differences within a 64-token
    block) ≈ 1e-6; the suffix option's in-chunk sum of dcs 6e-6 to 5e-5."""
    module = fused_stage("scalar")
    g = torch.Generator().manual_seed(0)
    T, H, N, P = 2048, 4, 16, 16
    x = torch.randn(1, T, H, P, generator=g)
    B, C = torch.randn(1, T, 1, N, generator=g), torch.randn(1, T, 1, N, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(1, T, H, generator=g) - 2)
    log_a = dt * -(torch.rand(H, generator=g) * 4 + 0.5)
    dy = torch.randn(1, T, H, P, generator=g)
    la = log_a.double().requires_grad_()
    y, _ = forms_torch.recurrent((x * dt[..., None]).double(), la, B.double(), C.double(), H)
    want = (torch.autograd.grad(y, la, dy.double())[0] * dt.double()).sum((0, 1))
    errs = {}
    for name, opts in (("suffix", {"dla": "suffix"}), ("default", {}),
                       ("precise", {"dla_decay": "pairs", "dla_diag": "scan"})):
        got = module.chunked_bwd(x, dt, log_a, B, C, heads=H, initial_state=None,
                                 cu_seqlens=None, dy=dy, dfinal=None, **opts)[2]
        assert got.shape == log_a.shape and torch.isfinite(got).all()
        got = (got.double() * dt.double()).sum((0, 1))
        errs[name] = ((got - want).norm() / want.norm()).item()
    assert errs["precise"] < 1e-6 and errs["default"] < 2e-6, errs
    assert errs["precise"] < errs["suffix"] / 20 and errs["default"] < errs["suffix"] / 20, errs
