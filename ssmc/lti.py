"""LTI SSM kernels (S4, S4D, LSSL): HiPPO matrices, discretisation, K_k = C Ā^k B̄.

Everything follows docs/semantics.md ("LTI kernels") and is differentiable in torch.
A is diagonal [H, N] or dense [H, N, N]; B [H, N] or [N]; C [H, N]; dt [H].
"""

from __future__ import annotations

import torch
from torch import Tensor

from ssmc.ir import Discretization, Hippo


def hippo(
    measure: Hippo,
    N: int,
    *,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """The HiPPO (A [N, N], B [N]) of a measure, unscaled (LSSL's closed forms)."""
    n = torch.arange(N, dtype=dtype, device=device)
    row, col = n[:, None], n[None, :]
    r = torch.sqrt(2 * n + 1)
    match measure:
        case Hippo.LEGS:
            A = torch.where(row > col, -r[:, None] * r[None, :], torch.zeros((), dtype=dtype))
            return A - torch.diag(n + 1), r
        case Hippo.LEGT:
            sign = torch.where((row < col) & ((row - col) % 2 != 0), -1.0, 1.0).to(dtype)
            return -r[:, None] * r[None, :] * sign, r
        case Hippo.LAGT:
            A = -torch.ones(N, N, dtype=dtype, device=device).tril(-1)
            return A - 0.5 * torch.eye(N, dtype=dtype, device=device), torch.ones_like(n)
    raise ValueError(f"unknown HiPPO measure {measure!r}")


def discretize(A: Tensor, B: Tensor, dt: Tensor, method: Discretization) -> tuple[Tensor, Tensor]:
    """(Ā, B̄) by zero-order hold or bilinear; A [H, N] (diagonal) or [H, N, N], B, dt [H]."""
    if A.dim() == 2:
        dA = dt[:, None] * A
        if method is Discretization.ZOH:
            Abar = torch.exp(dA)
            return Abar, (Abar - 1) / A * B
        denom = 1 - dA / 2
        return (1 + dA / 2) / denom, dt[:, None] * B / denom
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    dA = dt[:, None, None] * A
    if method is Discretization.ZOH:
        Abar = torch.linalg.matrix_exp(dA)
        return Abar, torch.linalg.solve(A, ((Abar - eye) @ B[..., None]))[..., 0]
    left = eye - dA / 2
    Abar = torch.linalg.solve(left, eye + dA / 2)
    return Abar, torch.linalg.solve(left, dt[:, None, None] * B[..., None])[..., 0]


def lti_kernel(
    A: Tensor | None,
    B: Tensor | None,
    C: Tensor,
    dt: Tensor,
    hippo_measure: Hippo | None,
    discretization: Discretization,
    T: int,
) -> Tensor:
    """K [H, T], K_k = C Ā^k B̄; A and B come from `hippo_measure` when they are None."""
    H, N = C.shape
    if hippo_measure is not None:
        if A is not None or B is not None:
            raise ValueError("a HiPPO measure gives A and B; do not pass them too")
        A, B = hippo(hippo_measure, N, dtype=C.dtype, device=C.device)
    if A is None or B is None:
        raise ValueError("an LTI kernel needs A and B, or a HiPPO measure")
    dense = A.dim() == 3 or hippo_measure is not None
    A = A.expand(H, N, N) if dense else A.expand(H, N)
    Abar, Bbar = discretize(A, B.expand(H, N), dt.expand(H), discretization)
    if not dense:
        k = torch.arange(T, dtype=Abar.dtype, device=Abar.device)
        return torch.einsum("hn,hnk,hn->hk", C, torch.pow(Abar[..., None], k), Bbar)
    # Krylov columns Ā^k B̄ by doubling: [V, Ā^m V] with Ā^m squared each round.
    V, power = Bbar[..., None], Abar
    while V.shape[-1] < T:
        V = torch.cat([V, power @ V], dim=-1)
        power = power @ power
    return torch.einsum("hn,hnk->hk", C, V[..., :T])
