"""The symbolic reference: SymPy proves that every form of a checked spec computes one M.

At a small T every input element is a symbol: the decay factors a_t (a_{t,n}, γ_h or 1),
B_{t,g,n}, C_{t,g,n}, x_{t,g,p}, the initial state; for Toeplitz masks the taps k_j or the
LTI Ā, B̄, C. Each form of DESIGN §1 is expanded with exp(cs_i − cs_j) kept exactly as the
product of the a's in between, so every output is a polynomial, and a form is proved when
its difference from M·x expands to exactly 0 (no `simplify`, no floating point).
`ssmc.symbolic_numeric` then lambdifies M at random inputs against the fp64 PyTorch reference.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import sympy
from sympy import Matrix

from ssmc.errors import SsmcError
from ssmc.expr import refs
from ssmc.expr_sympy import symbol
from ssmc.ir import (
    Causal,
    CheckedSpec,
    ConstDecay,
    DiagonalSemiseparable,
    Form,
    LearnedKernel,
    ScalarSemiseparable,
    Size,
    Spec,
    Toeplitz,
)

Factors = tuple[sympy.Expr, ...]
"""One decay factor per state dim n (all equal unless the mask is diagonal)."""

FORMS: dict[type, frozenset[Form]] = {
    Causal: frozenset((Form.RECURRENT, Form.QUADRATIC, Form.CHUNKED)),
    ConstDecay: frozenset((Form.RECURRENT, Form.QUADRATIC, Form.CHUNKED)),
    ScalarSemiseparable: frozenset((Form.RECURRENT, Form.QUADRATIC, Form.CHUNKED)),
    DiagonalSemiseparable: frozenset((Form.RECURRENT, Form.QUADRATIC, Form.CHUNKED)),
    Toeplitz: frozenset((Form.QUADRATIC, Form.CONVOLUTION)),
}
"""The forms this module can expand, per mask."""


class ProofError(SsmcError):
    """An expansion of some form differs from M·x: the math of that form is wrong."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Sizes:
    """The tiny sizes a proof runs at; each role's group count follows the spec's pattern."""

    T: int
    N: int
    P: int
    H: int
    query: int
    key: int
    value: int
    decay: int

    def group(self, count: int, h: int) -> int:
        """The group of a role with `count` heads that serves output head h."""
        return h // (self.H // count)


@dataclass(frozen=True, slots=True, kw_only=True)
class Check:
    """One identity over all heads: `quantity` of `form` (chunk size Q) equals its reference.

    `seconds` is the time spent comparing; building the expansions counts in `Proof.seconds`.
    """

    form: Form
    chunk_size: int | None
    quantity: str
    equal: bool
    seconds: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Proof:
    """Every identity proved for a spec, with the sizes used and the time taken."""

    spec: str
    sizes: Sizes
    checks: tuple[Check, ...]
    seconds: float

    def render(self) -> str:
        """One line per check, for a terminal."""
        s = self.sizes
        lines = [f"{self.spec}: T={s.T} N={s.N} P={s.P} H={s.H}, {self.seconds:.2f}s"]
        for c in self.checks:
            name = c.form.value + ("" if c.chunk_size is None else f" Q={c.chunk_size}")
            lines.append(f"  {name:<14} {c.quantity:<16} {'proved' if c.equal else 'DIFFERS'}")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Head:
    """One output head's symbols: a[t][n], the mask's own γ (const decay), B, C, x, h0."""

    a: tuple[Factors, ...]
    gamma: sympy.Expr | None
    diagonal: bool
    B: Matrix
    C: Matrix
    x: Matrix
    h0: Matrix


@dataclass(frozen=True, slots=True, kw_only=True)
class _Kernel:
    """One output head of a Toeplitz mask: taps k_0..k_{T−1}, x, and (Ā, B̄, C) if LTI."""

    taps: Factors
    x: Matrix
    lti: tuple[Matrix, Matrix, Matrix] | None


@dataclass(slots=True)
class _Ledger:
    """Collects comparisons per (form, Q, quantity) over heads, and the first difference."""

    checks: dict[tuple[Form, int | None, str], Check] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def compare(
        self, form: Form, Q: int | None, quantity: str, h: int, lhs: Matrix, rhs: Matrix
    ) -> None:
        """Record whether lhs − rhs expands to 0 for head h."""
        t0 = time.perf_counter()
        found = _first_difference(lhs, rhs)
        key = (form, Q, quantity)
        old = self.checks.get(
            key, Check(form=form, chunk_size=Q, quantity=quantity, equal=True, seconds=0.0)
        )
        if found is not None and old.equal:
            (i, j), diff = found
            self.failures.append(
                f"{_name(form, Q)} {quantity} differs at head {h}, [{i}, {j}] by {str(diff)[:200]}"
            )
        self.checks[key] = replace(
            old, equal=old.equal and found is None, seconds=old.seconds + time.perf_counter() - t0
        )


def _name(form: Form, Q: int | None) -> str:
    """A form as messages name it: `chunked (Q=2)`, `quadratic`."""
    return form.value + ("" if Q is None else f" (Q={Q})")


def _sym(role: str, **index: int) -> sympy.Symbol:
    """The symbol of one input element, e.g. B_g0_t3_n1 (a validated identifier)."""
    return symbol("_".join([role, *(f"{k}{v}" for k, v in index.items())]))


def _matrix(role: str, row: str, rows: int, col: str, cols: int, **fixed: int) -> Matrix:
    """rows×cols symbols role_{fixed}_{row}i_{col}j."""
    return Matrix(rows, cols, lambda i, j: _sym(role, **fixed, **{row: i, col: j}))


def _value(spec: Spec, size: Size | None) -> int | None:
    if isinstance(size, int) or size is None:
        return size
    try:
        return spec.dim(size).value
    except KeyError:
        return None


def problem_sizes(checked: CheckedSpec, T: int = 6, *, heads: int = 2) -> Sizes:
    """H = `heads` (1 if the spec has 1), N = P = 2 (or 1); a grouped role gets H/2 groups."""
    spec, counts = checked.spec, checked.heads
    out = _value(spec, counts.output)
    H = 1 if out == 1 else heads

    def groups(count: Size | None) -> int:
        value = _value(spec, count)
        if count is None or value == 1:
            return 1
        same = count == counts.output or (out is not None and value == out)
        return H if same else max(H // 2, 1)

    return Sizes(
        T=T,
        N=1 if _value(spec, checked.state_size) == 1 else 2,
        P=1 if _value(spec, checked.head_dim) == 1 else 2,
        H=H,
        query=groups(counts.query),
        key=groups(counts.key),
        value=groups(counts.value),
        decay=groups(counts.decay),
    )


def _seg(a: tuple[Factors, ...], i: int, j: int) -> Factors:
    """exp(cs_i − cs_j) per n, as the exact product ∏_{k=j+1..i} a_k."""
    return tuple(sympy.Mul(*(a[k][n] for k in range(j + 1, i + 1))) for n in range(len(a[0])))


def _chunk_decay(a: tuple[Factors, ...], start: int, end: int) -> Factors:
    """exp(cs_end) of the chunk [start, end): the decay of the state passed across it."""
    return _seg(a, end - 1, start - 1)


def _mul(a: Matrix, b: Matrix) -> Matrix:
    """a·b entry by entry, as sums of products (no conversion to a matrix domain)."""
    return Matrix(
        a.rows, b.cols, lambda i, j: sympy.Add(*(a[i, k] * b[k, j] for k in range(a.cols)))
    )


def _decay(f: Factors, h: Matrix) -> Matrix:
    """f ⊙ h: row n of h (N×P) times f_n, i.e. diag(f)·h without a symbolic matmul."""
    return Matrix(h.rows, h.cols, lambda n, p: f[n] * h[n, p])


def _outer(b: Matrix, x: Matrix) -> Matrix:
    """B_t ⊗ x_t: the N×P outer product of a B row and an x row."""
    return Matrix(b.cols, x.cols, lambda n, p: b[0, n] * x[0, p])


def _decays(mask: Any, s: Sizes, d: int) -> tuple[tuple[Factors, ...], sympy.Expr | None]:
    """(a[t][n], γ or None) of decay group d."""
    one = sympy.Integer(1)
    match mask:
        case Causal():
            return ((one,) * s.N,) * s.T, None
        case ConstDecay():
            gamma = _sym("gamma", h=d)
            return ((gamma,) * s.N,) * s.T, gamma
        case ScalarSemiseparable():
            return tuple((_sym("a", d=d, t=t),) * s.N for t in range(s.T)), None
        case DiagonalSemiseparable():
            a = _matrix("a", "t", s.T, "n", s.N, d=d)
            return tuple(tuple(a[t, :]) for t in range(s.T)), None
    raise ProofError(f"no symbolic inputs for mask {type(mask).__name__}")


def _sma_heads(checked: CheckedSpec, s: Sizes) -> list[_Head]:
    """The symbols each output head reads, shared across a group as the pattern says."""
    B = [_matrix("B", "t", s.T, "n", s.N, g=g) for g in range(s.key)]
    C = [_matrix("C", "t", s.T, "n", s.N, g=g) for g in range(s.query)]
    x = [_matrix("x", "t", s.T, "p", s.P, g=g) for g in range(s.value)]
    mask, heads = checked.spec.mask, []
    for h in range(s.H):
        a, gamma = _decays(mask, s, s.group(s.decay, h))
        heads.append(
            _Head(
                a=a,
                gamma=gamma,
                diagonal=isinstance(mask, DiagonalSemiseparable),
                B=B[s.group(s.key, h)],
                C=C[s.group(s.query, h)],
                x=x[s.group(s.value, h)],
                h0=_matrix("h0", "n", s.N, "p", s.P, h=h),
            )
        )
    return heads


def _mixing(hd: _Head) -> Matrix:
    """M_ij = Σ_n C_in L_ij,n B_jn (i ≥ j), with the mask's own L (γ^(i−j) for const decay)."""
    T, N = hd.C.shape

    def entry(i: int, j: int) -> sympy.Expr:
        if i < j:
            return sympy.Integer(0)
        L = (hd.gamma ** (i - j),) * N if hd.gamma is not None else _seg(hd.a, i, j)
        return sympy.Add(*(hd.C[i, n] * L[n] * hd.B[j, n] for n in range(N)))

    return Matrix(T, T, entry)


def _recurrent(hd: _Head) -> tuple[Matrix, Matrix]:
    """h_t = a_t ⊙ h_{t−1} + B_t ⊗ x_t, y_t = C_tᵀ h_t; returns (y, final state)."""
    h, rows = hd.h0, []
    for t in range(hd.x.rows):
        h = _decay(hd.a[t], h) + _outer(hd.B[t, :], hd.x[t, :])
        rows.append(_mul(hd.C[t, :], h))
    return Matrix.vstack(*rows), h


def _masked(hd: _Head, lo: int, hi: int) -> Matrix:
    """(L ∘ C Bᵀ) X on rows/cols [lo, hi): one mask, or one per n when the decay is diagonal."""
    C, B, X, Q = hd.C[lo:hi, :], hd.B[lo:hi, :], hd.x[lo:hi, :], hi - lo
    y = sympy.zeros(Q, X.cols)
    for n in range(C.cols) if hd.diagonal else (0,):
        L = Matrix(Q, Q, lambda i, j, n=n: _seg(hd.a, lo + i, lo + j)[n] if i >= j else 0)
        CB = _mul(C[:, n], B[:, n].T) if hd.diagonal else _mul(C, B.T)
        y += _mul(L.multiply_elementwise(CB), X)
    return y


def _chunked(hd: _Head, Q: int) -> tuple[Matrix, Matrix]:
    """The five SSD steps of DESIGN §1, chunk length Q, any T; returns (y, final state)."""
    T, H, rows = hd.x.rows, hd.h0, []
    for start in range(0, T, Q):
        end = min(start + Q, T)
        y_diag = _masked(hd, start, end)
        for i, t in enumerate(range(start, end)):
            y_off = _mul(hd.C[t, :], _decay(_seg(hd.a, t, start - 1), H))
            rows.append(y_diag[i, :] + y_off)
        S = sympy.zeros(*H.shape)
        for t in range(start, end):
            S += _decay(_seg(hd.a, end - 1, t), _outer(hd.B[t, :], hd.x[t, :]))
        H = _decay(_chunk_decay(hd.a, start, end), H) + S
    return Matrix.vstack(*rows), H


def _initial_term(hd: _Head) -> Matrix:
    """What the initial state adds to y: C_tᵀ (seg(t, −1) ⊙ h0) per step."""
    return Matrix.vstack(
        *(_mul(hd.C[t, :], _decay(_seg(hd.a, t, -1), hd.h0)) for t in range(hd.x.rows))
    )


def _state(hd: _Head) -> Matrix:
    """Closed form of the final state: Σ_j seg(T−1, j) ⊙ B_j ⊗ x_j + seg(T−1, −1) ⊙ h0."""
    T = hd.x.rows
    h = _decay(_seg(hd.a, T - 1, -1), hd.h0)
    for j in range(T):
        h += _decay(_seg(hd.a, T - 1, j), _outer(hd.B[j, :], hd.x[j, :]))
    return h


def _first_difference(lhs: Matrix, rhs: Matrix) -> tuple[tuple[int, int], sympy.Expr] | None:
    """The first entry where lhs − rhs does not expand to 0, with that difference.

    Entries are rebuilt in the sparse polynomial ring ℚ[symbols]: the same normal form as
    `sympy.expand`, much faster on the nested products the forms build.
    """
    gens = sorted(lhs.free_symbols | rhs.free_symbols, key=str) or [sympy.Dummy()]
    R, *_ = sympy.ring(gens, sympy.QQ)
    for i in range(lhs.rows):
        for j in range(lhs.cols):
            e = lhs[i, j] - rhs[i, j]
            try:
                diff = R.from_expr(e).as_expr()
            except ValueError:
                diff = sympy.expand(e)
            if diff != 0:
                return (i, j), diff
    return None


def _prove_sma(
    checked: CheckedSpec, s: Sizes, chunk_sizes: tuple[int, ...], ledger: _Ledger
) -> None:
    """Recurrent, quadratic and chunked (with and without h0) against M·x, head by head."""
    for h, hd in enumerate(_sma_heads(checked, s)):
        no_h0 = {e: sympy.Integer(0) for e in hd.h0}
        Mx = _mul(_mixing(hd), hd.x)
        y_rec, h_rec = _recurrent(hd)
        ledger.compare(Form.RECURRENT, None, "y", h, y_rec.xreplace(no_h0), Mx)
        ledger.compare(Form.RECURRENT, None, "final_state", h, h_rec, _state(hd))
        if Form.QUADRATIC in checked.forms:
            ledger.compare(Form.QUADRATIC, None, "y", h, _masked(hd, 0, s.T), Mx)
        for Q in chunk_sizes if Form.CHUNKED in checked.forms else ():
            y_ch, h_ch = _chunked(hd, Q)
            ledger.compare(Form.CHUNKED, Q, "y", h, y_ch.xreplace(no_h0), Mx)
            ledger.compare(Form.CHUNKED, Q, "y_initial_state", h, y_ch, y_rec)
            ledger.compare(Form.CHUNKED, Q, "final_state", h, h_ch, h_rec)


def _window(spec: Spec, kernel: LearnedKernel, T: int) -> int:
    """Taps of a learned kernel within T: its window L when bound and shorter, else T."""
    for t in spec.tensors:
        if t.name in refs(kernel.kernel) and len(t.shape) >= 2:
            length = _value(spec, t.shape[-1])
            if length is not None:
                return min(length, T)
    return T


def _lti_dense(spec: Spec, mask: Toeplitz) -> bool:
    """Whether the LTI A is a full N×N matrix (HiPPO, or A declared [H, N, N])."""
    lti = mask.kernel
    if isinstance(lti, LearnedKernel) or lti.hippo is not None or lti.A is None:
        return True
    return any(t.name in refs(lti.A) and len(t.shape) == 3 for t in spec.tensors)


def _kernel_heads(checked: CheckedSpec, s: Sizes) -> list[_Kernel]:
    """Each output head's taps (learned symbols, or C Ā^k B̄ expanded) and its x."""
    spec, mask = checked.spec, checked.spec.mask
    assert isinstance(mask, Toeplitz)
    xs = [_matrix("x", "t", s.T, "p", s.P, g=g) for g in range(s.value)]
    groups: list[tuple[Factors, tuple[Matrix, Matrix, Matrix] | None]] = []
    for d in range(s.decay):
        if isinstance(mask.kernel, LearnedKernel):
            W = _window(spec, mask.kernel, s.T)
            taps = tuple(_sym("k", h=d, j=j) if j < W else sympy.Integer(0) for j in range(s.T))
            groups.append((taps, None))
            continue
        if _lti_dense(spec, mask):
            A = _matrix("Abar", "n", s.N, "m", s.N, h=d)
        else:
            A = sympy.diag(*(_sym("Abar", h=d, n=n) for n in range(s.N)))
        B = Matrix([_sym("Bbar", h=d, n=n) for n in range(s.N)])
        C = Matrix([_sym("Cbar", h=d, n=n) for n in range(s.N)])
        power, taps_list = B, []
        for _ in range(s.T):
            taps_list.append(sympy.expand((C.T * power)[0, 0]))
            power = (A * power).expand()
        groups.append((tuple(taps_list), (A, B, C)))
    return [
        _Kernel(
            taps=groups[s.group(s.decay, h)][0],
            lti=groups[s.group(s.decay, h)][1],
            x=xs[s.group(s.value, h)],
        )
        for h in range(s.H)
    ]


def _toeplitz_matrix(k: _Kernel) -> Matrix:
    """M_ij = k_{i−j} for i ≥ j."""
    T = len(k.taps)
    return Matrix(T, T, lambda i, j: k.taps[i - j] if i >= j else 0)


def _toeplitz_quadratic(k: _Kernel) -> Matrix:
    """y_i = Σ_{j ≤ i} k_{i−j} x_j."""
    T, P = k.x.shape
    return Matrix(T, P, lambda i, p: sympy.Add(*(k.taps[i - j] * k.x[j, p] for j in range(i + 1))))


def _convolution(k: _Kernel) -> Matrix:
    """y_i = [z^i] K(z)·X(z): the polynomial product an FFT computes, truncated to T."""
    z = sympy.Dummy("z")
    T, P = k.x.shape
    K = sympy.Poly(sympy.Add(*(tap * z**i for i, tap in enumerate(k.taps))), z)
    cols = []
    for p in range(P):
        product = K * sympy.Poly(sympy.Add(*(k.x[j, p] * z**j for j in range(T))), z)
        cols.append([product.nth(i) for i in range(T)])
    return Matrix(T, P, lambda i, p: cols[p][i])


def _lti_recurrent(k: _Kernel) -> Matrix:
    """h_t = Ā h_{t−1} + B̄ ⊗ x_t, y_t = Cᵀ h_t, from h_{−1} = 0."""
    assert k.lti is not None
    A, B, C = k.lti
    h, rows = sympy.zeros(A.rows, k.x.cols), []
    for t in range(k.x.rows):
        h = _mul(A, h) + _mul(B, k.x[t, :])
        rows.append(_mul(C.T, h))
    return Matrix.vstack(*rows)


def _prove_toeplitz(checked: CheckedSpec, s: Sizes, ledger: _Ledger) -> None:
    """Quadratic and convolution (and the LTI recurrence) against M·x, head by head."""
    expansions = {Form.QUADRATIC: _toeplitz_quadratic, Form.CONVOLUTION: _convolution}
    for h, k in enumerate(_kernel_heads(checked, s)):
        Mx = _mul(_toeplitz_matrix(k), k.x)
        if k.lti is not None:
            ledger.compare(Form.RECURRENT, None, "y", h, _lti_recurrent(k), Mx)
        for form in checked.forms:
            ledger.compare(form, None, "y", h, expansions[form](k), Mx)


def prove(
    checked: CheckedSpec, *, T: int = 6, chunk_sizes: tuple[int, ...] = (2, 3), heads: int = 2
) -> Proof:
    """Prove every form of the spec equal to M·x, and chunked states equal to recurrent ones.

    H = `heads` output heads; ProofError naming every form whose expansion differs.
    """
    if T < 1 or heads < 1 or any(Q < 1 for Q in chunk_sizes):
        raise ValueError(f"T, heads, chunk sizes must be positive: {T}, {heads}, {chunk_sizes}")
    if checked.pieces or checked.spec.composition is not None:  # mask algebra
        from ssmc.algebra_symbolic import prove_algebra

        return prove_algebra(checked, T=T, chunk_sizes=chunk_sizes, heads=heads)  # type: ignore[return-value]
    t0 = time.perf_counter()
    mask, name = checked.spec.mask, checked.spec.name
    unknown = set(checked.forms) - FORMS[type(mask)]
    if unknown:
        forms = ", ".join(sorted(f.value for f in unknown))
        raise ProofError(f"{name}: no expansion of form {forms} for a {type(mask).__name__} mask")
    s, ledger = problem_sizes(checked, T, heads=heads), _Ledger()
    if isinstance(mask, Toeplitz):
        _prove_toeplitz(checked, s, ledger)
    else:
        _prove_sma(checked, s, chunk_sizes, ledger)
    if ledger.failures:
        raise ProofError(f"{name}: " + "; ".join(ledger.failures))
    return Proof(
        spec=name, sizes=s, checks=tuple(ledger.checks.values()), seconds=time.perf_counter() - t0
    )


def mixing_matrix(checked: CheckedSpec, T: int = 6) -> Matrix:
    """M (T×T) of output head 0, entries in the input symbols, for display."""
    s = problem_sizes(checked, T)
    if isinstance(checked.spec.mask, Toeplitz):
        return _toeplitz_matrix(_kernel_heads(checked, s)[0])
    return _mixing(_sma_heads(checked, s)[0])
