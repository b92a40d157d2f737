"""Every form of the canonical core agrees with the others and with a naive per-head loop."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from ssmc import forms_torch as F

F64 = torch.float64
TOL = 1e-10

# (Gq, Gk, Gv, Gd) for H = 4, except the non-chain case (H = 6, groups 2 and 3).
PATTERNS = {
    "MHA": (4, (4, 4, 4, 4)),
    "MQA": (4, (4, 1, 1, 4)),
    "MKA": (4, (1, 4, 1, 4)),
    "MVA": (4, (1, 1, 4, 4)),
    "grouped": (4, (2, 2, 2, 2)),
    "mixed": (4, (2, 4, 1, 2)),
    "non_chain": (6, (2, 3, 6, 3)),
}
STRUCTURES = ("causal", "const", "scalar", "diagonal")
CHUNKS = {1: (1, 4), 5: (4,), 7: (3, 4), 64: (16,), 65: (16,)}
"""Chunk sizes per length T: mostly not dividing T, 64 with chunk 16 as the kernels run it."""
LENGTHS = tuple(CHUNKS)


def rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def rand(gen: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, dtype=F64, generator=gen)


def decay(gen: torch.Generator, structure: str, b: int, T: int, Gd: int, N: int) -> Tensor | None:
    """log a in [-1, -0.01]: None (causal), per head, per (b, t, head) or per (b, t, head, n)."""

    def u(*shape: int) -> Tensor:
        return -0.01 - 0.99 * torch.rand(*shape, dtype=F64, generator=gen)

    match structure:
        case "const":
            return u(Gd).expand(b, T, Gd)
        case "scalar":
            return u(b, T, Gd)
        case "diagonal":
            return u(b, T, Gd, N)
    return None


def core(gen: torch.Generator, structure: str, pattern: str, T: int, *, b: int = 2):
    """(x, log_a, B, C, H, initial_state) with N = 3, P = 2."""
    H, (Gq, Gk, Gv, Gd) = PATTERNS[pattern]
    N, P = 3, 2
    x, B, C = rand(gen, b, T, Gv, P), rand(gen, b, T, Gk, N), rand(gen, b, T, Gq, N)
    return x, decay(gen, structure, b, T, Gd, N), B, C, H, rand(gen, b, H, N, P)


def naive(x, log_a, B, C, H, h0):
    """h_t = a_t ⊙ h_{t-1} + B_t ⊗ x_t, y_t = C_tᵀ h_t with explicit loops over b, h, t."""
    b, T, P = x.shape[0], x.shape[1], x.shape[-1]
    N = B.shape[-1]
    y = torch.zeros(b, T, H, P, dtype=F64)
    final = torch.zeros(b, H, N, P, dtype=F64)

    def group(t: Tensor, h: int) -> int:
        return h // (H // t.shape[2])

    for i in range(b):
        for h in range(H):
            state = h0[i, h].clone()
            for t in range(T):
                if log_a is None:
                    a = torch.ones(N, 1, dtype=F64)
                elif log_a.dim() == 3:
                    a = torch.exp(log_a[i, t, group(log_a, h)]).expand(N, 1)
                else:
                    a = torch.exp(log_a[i, t, group(log_a, h)])[:, None]
                k, v, q = B[i, t, group(B, h)], x[i, t, group(x, h)], C[i, t, group(C, h)]
                state = a * state + torch.outer(k, v)
                y[i, t, h] = q @ state
            final[i, h] = state
    return y, final


CASES = [
    pytest.param(s, p, T, id=f"{s}-{p}-T{T}") for s in STRUCTURES for p in PATTERNS for T in LENGTHS
]


@pytest.mark.parametrize(("structure", "pattern", "T"), CASES)
def test_forms_agree(gen, structure: str, pattern: str, T: int) -> None:
    """recurrent = chunked (every chunk size of CHUNKS[T]) = quadratic, with and without h0."""
    x, log_a, B, C, H, h0 = core(gen, structure, pattern, T)
    for init in (h0, None):
        y, state = F.recurrent(x, log_a, B, C, H, init)
        assert y.shape == (x.shape[0], T, H, x.shape[-1]) and state.shape == (2, H, 3, 2)
        for Q in CHUNKS[T]:
            y_c, state_c = F.chunked(x, log_a, B, C, H, init, chunk_size=Q)
            assert rel(y_c, y) < TOL and rel(state_c, state) < TOL, f"chunk {Q}"
        if structure != "diagonal":
            y_q, state_q = F.quadratic(x, log_a, B, C, H, init)
            assert rel(y_q, y) < TOL and rel(state_q, state) < TOL


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("pattern", ["MVA", "mixed", "non_chain"])
def test_recurrent_matches_naive_loop(gen, structure: str, pattern: str) -> None:
    x, log_a, B, C, H, h0 = core(gen, structure, pattern, 6)
    y, state = F.recurrent(x, log_a, B, C, H, h0)
    y_n, state_n = naive(x, log_a, B, C, H, h0)
    assert rel(y, y_n) < TOL and rel(state, state_n) < TOL


def test_quadratic_refuses_diagonal(gen) -> None:
    x, log_a, B, C, H, _ = core(gen, "diagonal", "MHA", 4)
    with pytest.raises(ValueError, match="scalar decay"):
        F.quadratic(x, log_a, B, C, H)


def test_head_count_must_divide(gen) -> None:
    x, log_a, B, C, _, _ = core(gen, "scalar", "MHA", 4)
    with pytest.raises(ValueError, match="does not divide"):
        F.recurrent(x, log_a, B, C, 6)


VARLEN = {"uneven": [0, 5, 22, 30], "with_empty": [0, 9, 9, 30], "one": [0, 30]}


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("offsets", list(VARLEN.values()), ids=list(VARLEN))
@pytest.mark.parametrize("init", [True, False], ids=["init", "zero"])
def test_varlen_equals_separate_runs(gen, structure: str, offsets: list[int], init: bool) -> None:
    x, log_a, B, C, H, _ = core(gen, structure, "mixed", offsets[-1], b=1)
    S = len(offsets) - 1
    h0 = rand(gen, S, H, 3, 2) if init else None
    cu = torch.tensor(offsets, dtype=torch.int32)
    forms = {"recurrent": F.recurrent, "chunked": lambda *a: F.chunked(*a, chunk_size=4)}
    if structure != "diagonal":
        forms["quadratic"] = F.quadratic
    for name, form in forms.items():
        y, state = form(x, log_a, B, C, H, h0, cu)
        for s in range(S):
            lo, hi = offsets[s], offsets[s + 1]
            init_s = None if h0 is None else h0[s : s + 1]
            la = None if log_a is None else log_a[:, lo:hi]
            if hi == lo:
                expected = torch.zeros(1, H, 3, 2, dtype=F64) if h0 is None else init_s
                assert torch.equal(state[s : s + 1], expected), name
                continue
            y_s, state_s = naive(
                x[:, lo:hi],
                la,
                B[:, lo:hi],
                C[:, lo:hi],
                H,
                torch.zeros(1, H, 3, 2, dtype=F64) if h0 is None else init_s,
            )
            assert rel(y[:, lo:hi], y_s) < TOL, f"{name} y of sequence {s}"
            assert rel(state[s : s + 1], state_s) < TOL, f"{name} state of sequence {s}"


def test_varlen_needs_batch_one(gen) -> None:
    x, log_a, B, C, H, _ = core(gen, "scalar", "MHA", 6)
    cu = torch.tensor([0, 2, 6])
    for form in (F.recurrent, F.quadratic, F.chunked):
        with pytest.raises(ValueError, match="batch 1"):
            form(x, log_a, B, C, H, None, cu)


def test_long_decay_stays_finite(gen) -> None:
    """log a = -5 over 512 steps: cs reaches -2560, yet the chunked form never overflows."""
    x, _, B, C, H, h0 = core(gen, "scalar", "MHA", 512, b=1)
    log_a = torch.full((1, 512, 4), -5.0, dtype=F64)
    y, state = F.recurrent(x, log_a, B, C, H, h0)
    y_c, state_c = F.chunked(x, log_a, B, C, H, h0, chunk_size=64)
    y_q, _ = F.quadratic(x, log_a, B, C, H, h0)
    assert torch.isfinite(y_c).all() and torch.isfinite(y_q).all()
    assert rel(y_c, y) < TOL and rel(y_q, y) < TOL and rel(state_c, state) < TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_dtypes(gen, dtype: torch.dtype) -> None:
    """y comes back in x's dtype, the state in fp32, close to the fp64 result."""
    x, log_a, B, C, H, h0 = core(gen, "scalar", "MVA", 33)
    y64, s64 = F.chunked(x, log_a, B, C, H, h0, chunk_size=16)
    cast = [t.to(dtype) for t in (x, B, C)]
    y, s = F.chunked(cast[0], log_a.float(), cast[1], cast[2], H, h0.float(), chunk_size=16)
    assert y.dtype == dtype and s.dtype == torch.float32
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(y.double(), y64) < bound and rel(s.double(), s64) < bound


def toeplitz_naive(x: Tensor, K: Tensor, H: int) -> Tensor:
    """y[b, i, h] = Σ_{j ≤ i, i − j < L} K[h // (H/Gd), i − j] x[b, j, h // (H/Gv)]."""
    b, T, Gv, P = x.shape
    Gd, L = K.shape
    y = torch.zeros(b, T, H, P, dtype=F64)
    for h in range(H):
        for i in range(T):
            for j in range(max(0, i - L + 1), i + 1):
                y[:, i, h] += K[h // (H // Gd), i - j] * x[:, j, h // (H // Gv)]
    return y


@pytest.mark.parametrize("T", LENGTHS[:3] + (33,))
@pytest.mark.parametrize("L", [1, 3, 33, 80])
@pytest.mark.parametrize(
    ("Gv", "Gd"), [(4, 4), (1, 4), (4, 1), (2, 4)], ids=["MHA", "Gv1", "Gd1", "Gv2"]
)
def test_toeplitz_forms_agree(gen, T: int, L: int, Gv: int, Gd: int) -> None:
    x, K = rand(gen, 2, T, Gv, 3), rand(gen, Gd, L)
    y = toeplitz_naive(x, K, 4)
    assert rel(F.toeplitz_quadratic(x, K, 4), y) < TOL
    assert rel(F.toeplitz_convolution(x, K, 4), y) < TOL


@pytest.mark.parametrize("form", [F.toeplitz_quadratic, F.toeplitz_convolution])
def test_toeplitz_varlen(gen, form) -> None:
    offsets = [0, 4, 17, 20]
    x, K = rand(gen, 1, 20, 2, 3), rand(gen, 4, 6)
    y = form(x, K, 4, torch.tensor(offsets))
    for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
        assert rel(y[:, lo:hi], toeplitz_naive(x[:, lo:hi], K, 4)) < TOL


def small_core(gen, structure: str):
    x, log_a, B, C, H, h0 = core(gen, structure, "mixed", 5, b=1)
    return [t.requires_grad_() if t is not None else None for t in (x, log_a, B, C)], H, h0


@pytest.mark.parametrize("structure", ["scalar", "diagonal"])
def test_gradcheck_chunked_and_quadratic(gen, structure: str) -> None:
    (x, log_a, B, C), H, h0 = small_core(gen, structure)
    log_a = log_a.detach().contiguous().requires_grad_()
    h0 = h0.requires_grad_()
    forms = [lambda *a: F.chunked(*a[:4], H, a[4], chunk_size=2)]
    if structure == "scalar":
        forms.append(lambda *a: F.quadratic(*a[:4], H, a[4]))
    for form in forms:
        assert torch.autograd.gradcheck(form, (x, log_a, B, C, h0))


def test_gradcheck_toeplitz(gen) -> None:
    x, K = rand(gen, 1, 6, 2, 2).requires_grad_(), rand(gen, 4, 4).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, K: F.toeplitz_convolution(x, K, 4), (x, K))
    assert torch.autograd.gradcheck(lambda x, K: F.toeplitz_quadratic(x, K, 4), (x, K))
