"""Numeric agreement: M lambdified at random inputs against every form of the fp64 reference.

The symbolic proof (ssmc.symbolic) shows the forms equal M; this shows the PyTorch
reference computes that same M, role expressions, skip, gate and initial state included.
Only SymPy objects this package built are lambdified, never text.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import sympy

from ssmc.ir import CheckedSpec, ConstDecay, Discretization, Form, LearnedKernel, Toeplitz
from ssmc.symbolic import (
    ProofError,
    Sizes,
    _initial_term,
    _kernel_heads,
    _lti_dense,
    _mixing,
    _name,
    _sma_heads,
    _state,
    _sym,
    _toeplitz_matrix,
    _value,
    problem_sizes,
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Agreement:
    """The fp64 reference in one form against the lambdified M: relative error ‖Δ‖/‖M·x‖."""

    form: Form
    chunk_size: int | None
    quantity: str
    error: float


def numeric_check(
    checked: CheckedSpec,
    *,
    T: int = 6,
    chunk_sizes: tuple[int, ...] = (2, 3),
    seed: int = 0,
    tol: float = 1e-10,
) -> tuple[Agreement, ...]:
    """Lambdify M at random inputs and compare every form of `ssmc.reference` with it (fp64).

    Runs at 4 heads (2 groups where the spec groups a role), N = P = 2, with skip, gate and
    the initial state; ProofError past `tol`; ImportError when the reference is absent.
    """
    if checked.pieces or checked.spec.composition is not None:  # mask algebra
        from ssmc.algebra_symbolic import numeric_check_algebra

        return numeric_check_algebra(  # type: ignore[return-value]
            checked, T=T, chunk_sizes=chunk_sizes, seed=seed, tol=tol)
    import torch

    from ssmc.bind import bind

    # A peer module, needed only here (the package re-exports its function `reference`).
    ref = importlib.import_module("ssmc.reference")
    s = problem_sizes(checked, T, heads=4)
    small = _shrunk(checked, s)
    generator = torch.Generator().manual_seed(seed)
    tensors = ref.random_inputs(small, batch=1, seqlen=T, generator=generator)
    h0 = tensors.pop("initial_state", None)
    roles = ref.canonical_roles(small, tensors, bind(small, tensors, initial_state=h0))
    y, state = _lambdified(small, s, roles, tensors, None if h0 is None else h0[0].numpy())
    if roles.skip is not None:
        y = y + roles.skip.numpy()
    if roles.gate is not None:
        y = y * roles.gate.numpy()
    runs: list[tuple[Form, int | None]] = [(f, None) for f in small.forms if f is not Form.CHUNKED]
    runs += [(Form.CHUNKED, Q) for Q in chunk_sizes if Form.CHUNKED in small.forms]
    out = []
    for form, Q in runs:
        run = ref.reference(small, form, chunk_size=Q or 64)
        for quantity, got, want in zip(
            ("y", "final_state"), run(initial_state=h0, **tensors), (y, state), strict=True
        ):
            if got is not None and want is not None:
                error = np.linalg.norm(got.double().numpy() - want) / np.linalg.norm(want)
                out.append(
                    Agreement(form=form, chunk_size=Q, quantity=quantity, error=float(error))
                )
    bad = [
        f"{_name(a.form, a.chunk_size)} {a.quantity} off by {a.error:.1e}"
        for a in out
        if not a.error <= tol
    ]
    if bad:
        raise ProofError(f"{checked.spec.name}: the reference differs from M: " + "; ".join(bad))
    return tuple(out)


def _shrunk(checked: CheckedSpec, s: Sizes) -> CheckedSpec:
    """The spec with its dims bound to the proof's sizes (any other dim: at most T)."""
    c, spec = checked.heads, checked.spec
    roles = (
        (c.output, s.H),
        (c.query, s.query),
        (c.key, s.key),
        (c.value, s.value),
        (c.decay, s.decay),
        (checked.state_size, s.N),
        (checked.head_dim, s.P),
    )
    want = {name: n for name, n in roles if isinstance(name, str)}
    dims = tuple(replace(d, value=want.get(d.name, min(d.value or s.T, s.T))) for d in spec.dims)
    return replace(checked, spec=replace(spec, dims=dims))


def _fill(values: dict[sympy.Symbol, float], role: str, array: Any, axes: str) -> None:
    """values[role_{axes}{index}] = array[index] for every index (as `_sym` names them)."""
    for index in np.ndindex(array.shape):
        name = dict(zip(axes[: array.ndim], index, strict=True))
        values[_sym(role, **name)] = float(array[index])


def _lambdified(small: CheckedSpec, s: Sizes, roles: Any, tensors: Any, h0: Any) -> tuple[Any, Any]:
    """(y [1, T, H, P], final state [1, H, N, P] or None) from M lambdified at the roles."""
    mask, values = small.spec.mask, dict[sympy.Symbol, float]()

    def by_group(t: Any) -> Any:
        """[1, T, G, ...] → [G, T, ...] in fp64, the order the symbols are named in."""
        return np.moveaxis(t[0].double().numpy(), 1, 0)

    _fill(values, "x", by_group(roles.x), "gtp")
    if isinstance(mask, Toeplitz):
        if isinstance(mask.kernel, LearnedKernel):
            _fill(values, "k", roles.kernel.double().numpy(), "hj")
        else:
            for role, array in zip(
                ("Abar", "Bbar", "Cbar"), _lti_numbers(small, tensors), strict=True
            ):
                _fill(values, role, array, "hnm")
        zero = sympy.zeros(s.N, s.P)
        heads = [
            (_toeplitz_matrix(k), k.x, sympy.zeros(s.T, s.P), zero) for k in _kernel_heads(small, s)
        ]
    else:
        if isinstance(mask, ConstDecay):
            _fill(values, "gamma", np.exp(roles.log_a[0, 0].double().numpy()), "h")
        elif roles.log_a is not None:
            _fill(values, "a", np.exp(by_group(roles.log_a)), "dtn")
        _fill(values, "B", by_group(roles.B), "gtn")
        _fill(values, "C", by_group(roles.C), "gtn")
        _fill(values, "h0", np.zeros((s.H, s.N, s.P)) if h0 is None else h0, "hnp")
        heads = [(_mixing(hd), hd.x, _initial_term(hd), _state(hd)) for hd in _sma_heads(small, s)]
    numbers = sympy.lambdify(list(values), [list(e) for e in heads])(*values.values())
    y = np.stack([M @ x + y0 for M, x, y0, _ in numbers], axis=1)[None]
    state = np.stack([S for *_, S in numbers])[None]
    return y, None if isinstance(mask, Toeplitz) else state


def _lti_numbers(small: CheckedSpec, tensors: Any) -> tuple[Any, Any, Any]:
    """(Ā [Gd, N] or [Gd, N, N], B̄ [Gd, N], C [Gd, N]) per docs/semantics.md, in numpy.

    Written apart from `ssmc.lti` (HiPPO entry by entry, expm by scaling and squaring)
    so that the reference's kernel is checked, not restated.
    """
    from ssmc.expr_torch import evaluate, squeeze_literals

    spec, mask = small.spec, small.spec.mask
    assert isinstance(mask, Toeplitz) and not isinstance(mask.kernel, LearnedKernel)
    lti, dense = mask.kernel, _lti_dense(spec, mask)
    head = small.heads.decay if isinstance(small.heads.decay, str) else "1.head"
    n_axis = small.state_size if isinstance(small.state_size, str) else "1.N"
    env = {t.name: squeeze_literals(t, tensors[t.name]) for t in spec.tensors}
    dims = {d.name: float(d.value) for d in spec.dims if d.value is not None}
    G, N = _value(spec, small.heads.decay) or 1, _value(spec, small.state_size) or 1

    def part(e: Any, n_axes: int) -> Any:
        value = evaluate(e, env, dims, (head, *(n_axis,) * n_axes))
        return value.expand(G, *(N,) * n_axes).double().numpy()

    C, dt = part(lti.C, 1), part(lti.dt, 0)
    if lti.hippo is not None:
        A0, B0 = _hippo(lti.hippo.value, N)
        A, B = np.broadcast_to(A0, (G, N, N)), np.broadcast_to(B0, (G, N))
    else:
        assert lti.A is not None and lti.B is not None
        A, B = part(lti.A, 2 if dense else 1), part(lti.B, 1)
    zoh = lti.discretization is Discretization.ZOH
    if not dense:
        dA = dt[:, None] * A
        if zoh:
            return np.exp(dA), np.expm1(dA) / A * B, C
        return (1 + dA / 2) / (1 - dA / 2), dt[:, None] * B / (1 - dA / 2), C
    eye, dA = np.eye(N), dt[:, None, None] * A
    if zoh:
        Abar = np.stack([_expm(m) for m in dA])
        return Abar, np.linalg.solve(A, (Abar - eye) @ B[..., None])[..., 0], C
    left = eye - dA / 2
    Bbar = np.linalg.solve(left, dt[:, None, None] * B[..., None])[..., 0]
    return np.linalg.solve(left, eye + dA / 2), Bbar, C


def _hippo(measure: str, N: int) -> tuple[Any, Any]:
    """(A, B) of a HiPPO measure, entry by entry from docs/semantics.md."""

    def entry(n: int, k: int) -> float:
        r = float(np.sqrt((2 * n + 1) * (2 * k + 1)))
        if measure == "legs":
            return -r if n > k else -(n + 1.0) if n == k else 0.0
        if measure == "legt":
            return -r * (1.0 if n >= k else (-1.0) ** (n - k))
        return -1.0 if n > k else -0.5 if n == k else 0.0

    A = np.array([[entry(n, k) for k in range(N)] for n in range(N)])
    B = np.ones(N) if measure == "lagt" else np.sqrt(2 * np.arange(N) + 1.0)
    return A, B


def _expm(m: Any) -> Any:
    """exp(m): scaled to 1-norm ≤ 1/2, a 20-term Taylor series, squared back."""
    norm = float(np.linalg.norm(m, 1))
    squarings = max(0, int(np.ceil(np.log2(max(norm, 1e-300) * 2))))
    result, term = np.eye(len(m)), np.eye(len(m))
    for k in range(1, 21):
        term = term @ (m / 2**squarings) / k
        result = result + term
    for _ in range(squarings):
        result = result @ result
    return result
