"""HiPPO matrices, discretisation and LTI kernels against closed forms and a recurrence."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from ssmc import forms_torch
from ssmc.ir import Discretization, Hippo
from ssmc.lti import discretize, hippo, lti_kernel

F64 = torch.float64
TOL = 1e-10


def rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def closed_form(measure: Hippo, N: int) -> tuple[Tensor, Tensor]:
    """docs/semantics.md's formulas, entry by entry."""
    A = torch.zeros(N, N, dtype=F64)
    B = torch.zeros(N, dtype=F64)
    for n in range(N):
        B[n] = 1.0 if measure is Hippo.LAGT else math.sqrt(2 * n + 1)
        for k in range(N):
            r = math.sqrt((2 * n + 1) * (2 * k + 1))
            if measure is Hippo.LEGS:
                A[n, k] = -r if n > k else -(n + 1) if n == k else 0.0
            elif measure is Hippo.LEGT:
                A[n, k] = -r * (1 if n >= k else (-1) ** (n - k))
            else:
                A[n, k] = -1.0 if n > k else -0.5 if n == k else 0.0
    return A, B


@pytest.mark.parametrize("measure", list(Hippo), ids=[m.value for m in Hippo])
@pytest.mark.parametrize("N", [1, 4, 9])
def test_hippo_closed_forms(measure: Hippo, N: int) -> None:
    A, B = hippo(measure, N)
    A_ref, B_ref = closed_form(measure, N)
    torch.testing.assert_close(A, A_ref, rtol=1e-15, atol=0)
    torch.testing.assert_close(B, B_ref, rtol=1e-15, atol=0)


def test_hippo_legs_by_hand() -> None:
    A, B = hippo(Hippo.LEGS, 3)
    s3, s5, s15 = math.sqrt(3), math.sqrt(5), math.sqrt(15)
    expected = torch.tensor([[-1, 0, 0], [-s3, -2, 0], [-s5, -s15, -3]], dtype=F64)
    torch.testing.assert_close(A, expected, rtol=1e-15, atol=0)
    torch.testing.assert_close(B, torch.tensor([1, s3, s5], dtype=F64), rtol=1e-15, atol=0)


def diagonal_system(gen, H: int = 3, N: int = 4):
    A = -0.5 - 3.5 * torch.rand(H, N, dtype=F64, generator=gen)
    B, C = torch.randn(H, N, dtype=F64, generator=gen), torch.randn(H, N, dtype=F64, generator=gen)
    dt = 0.001 + 0.099 * torch.rand(H, dtype=F64, generator=gen)
    return A, B, C, dt


@pytest.mark.parametrize("method", list(Discretization), ids=[m.value for m in Discretization])
def test_diagonal_equals_dense_diagonal(gen, method: Discretization) -> None:
    """A diagonal A discretises like the dense matrix diag(A)."""
    A, B, _, dt = diagonal_system(gen)
    Abar, Bbar = discretize(A, B, dt, method)
    Abar_d, Bbar_d = discretize(torch.diag_embed(A), B, dt, method)
    assert rel(torch.diag_embed(Abar), Abar_d) < TOL and rel(Bbar, Bbar_d) < TOL


def test_zoh_and_bilinear_formulas(gen) -> None:
    """ZOH: Ā = exp(dt A), B̄ = (Ā − 1)/A B; bilinear: (1 + dt A/2)/(1 − dt A/2), dt B/(1 − dt A/2)."""
    A, B, _, dt = diagonal_system(gen)
    Abar, Bbar = discretize(A, B, dt, Discretization.ZOH)
    dA = dt[:, None] * A
    assert rel(Abar, torch.exp(dA)) < TOL and rel(Bbar, torch.expm1(dA) / A * B) < TOL
    Abar, Bbar = discretize(A, B, dt, Discretization.BILINEAR)
    assert rel(Abar, (1 + dA / 2) / (1 - dA / 2)) < TOL
    assert rel(Bbar, dt[:, None] * B / (1 - dA / 2)) < TOL


def simulate(Abar: Tensor, Bbar: Tensor, C: Tensor, x: Tensor) -> Tensor:
    """h_t = Ā h_{t-1} + B̄ x_t, y_t = C h_t per head; Ā [H, N, N], x [T, H] → y [T, H]."""
    h = torch.zeros(Bbar.shape, dtype=F64)
    ys = []
    for t in range(x.shape[0]):
        h = (Abar @ h[..., None])[..., 0] + Bbar * x[t, :, None]
        ys.append((C * h).sum(-1))
    return torch.stack(ys)


SYSTEMS = ["diagonal", "legs", "legt", "lagt"]


@pytest.mark.parametrize("system", SYSTEMS)
@pytest.mark.parametrize("method", list(Discretization), ids=[m.value for m in Discretization])
@pytest.mark.parametrize("T", [1, 7, 40])
def test_kernel_equals_recurrence(gen, system: str, method: Discretization, T: int) -> None:
    """Convolving with K_k = C Ā^k B̄ equals running the discrete system step by step."""
    A, B, C, dt = diagonal_system(gen)
    if system == "diagonal":
        K = lti_kernel(A, B, C, dt, None, method, T)
        Abar, Bbar = discretize(A, B, dt, method)
        Abar = torch.diag_embed(Abar)
    else:
        measure = Hippo(system)
        K = lti_kernel(None, None, C, dt, measure, method, T)
        A_h, B_h = hippo(measure, C.shape[1])
        Abar, Bbar = discretize(A_h.expand(3, -1, -1), B_h.expand(3, -1), dt, method)
    assert K.shape == (3, T)
    x = torch.randn(T, 3, dtype=F64, generator=gen)
    y = simulate(Abar, Bbar, C, x)
    y_conv = forms_torch.toeplitz_convolution(x[None, :, :, None], K, 3)[0, :, :, 0]
    assert rel(y_conv, y) < TOL


def test_hippo_excludes_A_and_B(gen) -> None:
    A, B, C, dt = diagonal_system(gen)
    with pytest.raises(ValueError, match="HiPPO"):
        lti_kernel(A, B, C, dt, Hippo.LEGS, Discretization.ZOH, 4)


@pytest.mark.parametrize(
    ("hippo_measure", "method"),
    [
        (None, Discretization.ZOH),
        (Hippo.LEGT, Discretization.BILINEAR),
        (Hippo.LEGS, Discretization.ZOH),
    ],
    ids=["diagonal-zoh", "legt-bilinear", "legs-zoh"],
)
def test_kernel_gradcheck(gen, hippo_measure: Hippo | None, method: Discretization) -> None:
    A, B, C, dt = (t.requires_grad_() for t in diagonal_system(gen, H=2, N=3))
    if hippo_measure is None:

        def f(A, B, C, dt):
            return lti_kernel(A, B, C, dt, None, method, 6)

        assert torch.autograd.gradcheck(f, (A, B, C, dt))
    else:

        def g(C, dt):
            return lti_kernel(None, None, C, dt, hippo_measure, method, 6)

        assert torch.autograd.gradcheck(g, (C, dt))
