"""The symbolic reference: SymPy proves that every form of a checked spec computes one M.

At a small T every input element is a symbol: the decay factors a_t (a_{t,n}, γ_h or 1),
B_{t,g,n}, C_{t,g,n}, x_{t,g,p}, the initial state; for Toeplitz masks the taps k_j or the
LTI Ā, B̄, C. Each form of DESIGN §1 is expanded with exp(cs_i − cs_j) kept exactly as the
product of the a's in between, so every output is a polynomial, and a form is proved when
`sympy.expand` of its difference from M·x is exactly 0 (no `simplify`, no numerics).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import sympy

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

Matrix = sympy.Matrix
Factors = tuple[sympy.Expr, ...]
"""One decay factor per state dim n (all equal unless the mask is diagonal)."""


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
    """One identity over all heads: `quantity` of `form` (chunk size Q) equals its reference."""

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
        lines = [f"{self.spec}: T={self.sizes.T} N={self.sizes.N} P={self.sizes.P} "
                 f"H={self.sizes.H}, {self.seconds:.2f}s"]
        for c in self.checks:
            q = "" if c.chunk_size is None else f" Q={c.chunk_size}"
            verdict = "proved" if c.equal else "DIFFERS"
            lines.append(f"  {c.form.value + q:<14} {c.quantity:<16} {verdict}")
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
    """One output head of a Toeplitz mask: taps k_0..k_{T-1}, x, and the LTI system if any."""

    taps: Factors
    x: Matrix
    lti: tuple[Matrix, Matrix, Matrix] | None


def _sym(role: str, **index: int) -> sympy.Symbol:
    return symbol("_".join([role, *(f"{k}{v}" for k, v in index.items())]))


def _value(spec: Spec, size: Size | None) -> int | None:
    if isinstance(size, int) or size is None:
        return size
    try:
        return spec.dim(size).value
    except KeyError:
        return None


def problem_sizes(checked: CheckedSpec, T: int = 6, *, heads: int = 2) -> Sizes:
    """H = `heads` (1 if the spec has one), a role with fewer heads gets 1 or H/2 groups."""
    spec, counts = checked.spec, checked.heads
    out = _value(spec, counts.output)

    def small(size: Size | None, full: int) -> int:
        return 1 if _value(spec, size) == 1 else full

    H = small(counts.output, heads)

    def groups(count: Size | None) -> int:
        if count is None or _value(spec, count) == 1:
            return 1
        same = count == counts.output or (out is not None and _value(spec, count) == out)
        return H if same else max(H // 2, 1)

    return Sizes(T=T, N=small(checked.state_size, 2), P=small(checked.head_dim, 2), H=H,
                 query=groups(counts.query), key=groups(counts.key),
                 value=groups(counts.value), decay=groups(counts.decay))


def _seg(a: tuple[Factors, ...], i: int, j: int) -> Factors:
    """exp(cs_i − cs_j) per n, as the exact product ∏_{k=j+1..i} a_k."""
    return tuple(sympy.Mul(*(a[k][n] for k in range(j + 1, i + 1))) for n in range(len(a[0])))


def _decay(f: Factors, h: Matrix) -> Matrix:
    """f ⊙ h: row n of h (N×P) times f_n, i.e. diag(f)·h without a symbolic matmul."""
    return Matrix(h.rows, h.cols, lambda n, p: f[n] * h[n, p])


def _outer(b: Matrix, x: Matrix) -> Matrix:
    """B_t ⊗ x_t: the N×P outer product of a B row and an x row."""
    return Matrix(b.cols, x.cols, lambda n, p: b[0, n] * x[0, p])


def _chunk_decay(a: tuple[Factors, ...], start: int, end: int) -> Factors:
    """exp(cs_end) of the chunk [start, end): the decay of the state passed across it."""
    return _seg(a, end - 1, start - 1)


def _sma_heads(checked: CheckedSpec, s: Sizes) -> list[_Head]:
    def table(role: str, count: int, cols: int, axis: str) -> list[Matrix]:
        return [Matrix(s.T, cols, lambda t, c: _sym(role, t=t, g=g, **{axis: c}))
                for g in range(count)]

    B, C, x = table("B", s.key, s.N, "n"), table("C", s.query, s.N, "n"), table("x", s.value, s.P, "p")
    mask, heads = checked.spec.mask, []
    for h in range(s.H):
        d, gamma = s.group(s.decay, h), None
        match mask:
            case Causal():
                a = ((sympy.Integer(1),) * s.N,) * s.T
            case ConstDecay():
                gamma = _sym("gamma", h=d)
                a = ((gamma,) * s.N,) * s.T
            case ScalarSemiseparable():
                a = tuple((_sym("a", t=t, d=d),) * s.N for t in range(s.T))
            case DiagonalSemiseparable():
                a = tuple(tuple(_sym("a", t=t, d=d, n=n) for n in range(s.N)) for t in range(s.T))
            case _:
                raise ProofError(f"no symbolic inputs for mask {type(mask).__name__}")
        heads.append(_Head(
            a=a, gamma=gamma, diagonal=isinstance(mask, DiagonalSemiseparable),
            B=B[s.group(s.key, h)], C=C[s.group(s.query, h)], x=x[s.group(s.value, h)],
            h0=Matrix(s.N, s.P, lambda n, p: _sym("h0", h=h, n=n, p=p))))
    return heads


def _mixing(hd: _Head) -> Matrix:
    """M_ij = Σ_n C_in L_ij,n B_jn (i ≥ j), with the mask's own L (γ^(i−j) for const decay)."""
    T, N = hd.C.shape

    def entry(i: int, j: int) -> sympy.Expr:
        if i < j:
            return sympy.Integer(0)
        L = (hd.gamma ** (i - j),) * N if hd.gamma is not None else _seg(hd.a, i, j)
        return sum((hd.C[i, n] * L[n] * hd.B[j, n] for n in range(N)), sympy.Integer(0))

    return Matrix(T, T, entry)


def _recurrent(hd: _Head) -> tuple[Matrix, Matrix]:
    """h_t = a_t ⊙ h_{t−1} + B_t ⊗ x_t, y_t = C_tᵀ h_t; returns (y, final state)."""
    h, rows = hd.h0, []
    for t in range(hd.x.rows):
        h = _decay(hd.a[t], h) + _outer(hd.B[t, :], hd.x[t, :])
        rows.append(hd.C[t, :] * h)
    return Matrix.vstack(*rows), h


def _masked(hd: _Head, lo: int, hi: int) -> Matrix:
    """(L ∘ C Bᵀ) X on rows/cols [lo, hi): one mask, or one per n when the decay is diagonal."""
    C, B, X = hd.C[lo:hi, :], hd.B[lo:hi, :], hd.x[lo:hi, :]
    y = sympy.zeros(hi - lo, X.cols)
    for n in range(C.cols) if hd.diagonal else (None,):
        def mask(i: int, j: int, n: int = n or 0) -> sympy.Expr:
            return _seg(hd.a, lo + i, lo + j)[n] if i >= j else sympy.Integer(0)

        CB = C[:, n] * B[:, n].T if n is not None else C * B.T
        y += Matrix(hi - lo, hi - lo, mask).multiply_elementwise(CB) * X
    return y


def _chunked(hd: _Head, Q: int) -> tuple[Matrix, Matrix]:
    """The five SSD steps of DESIGN §1 with chunk length Q; returns (y, final state)."""
    T, H, rows = hd.x.rows, hd.h0, []
    for start in range(0, T, Q):
        end = min(start + Q, T)
        y_diag = _masked(hd, start, end)
        for i, l in enumerate(range(start, end)):
            y_off = hd.C[l, :] * _decay(_seg(hd.a, l, start - 1), H)
            rows.append(y_diag[i, :] + y_off)
        S = sum((_decay(_seg(hd.a, end - 1, l), _outer(hd.B[l, :], hd.x[l, :]))
                 for l in range(start, end)), sympy.zeros(*H.shape))
        H = _decay(_chunk_decay(hd.a, start, end), H) + S
    return Matrix.vstack(*rows), H


def _state(hd: _Head) -> Matrix:
    """Closed form of the final state: Σ_j seg(T−1, j) ⊙ B_j ⊗ x_j + seg(T−1, −1) ⊙ h0."""
    T = hd.x.rows
    h = _decay(_seg(hd.a, T - 1, -1), hd.h0)
    for j in range(T):
        h += _decay(_seg(hd.a, T - 1, j), _outer(hd.B[j, :], hd.x[j, :]))
    return h


def _first_difference(lhs: Matrix, rhs: Matrix) -> tuple[tuple[int, int], sympy.Expr] | None:
    """The first entry where lhs − rhs does not expand to 0, with that difference.

    Entries are rebuilt in the sparse polynomial ring ℚ[symbols], which is what
    `sympy.expand` computes, only much faster on the nested products the forms build.
    """
    gens = sorted(lhs.free_symbols | rhs.free_symbols, key=str) or [sympy.Dummy()]
    R, *_ = sympy.ring(gens, sympy.QQ)
    for i in range(lhs.rows):
        for j in range(lhs.cols):
            diff = _polynomial(R, lhs[i, j] - rhs[i, j])
            if diff != 0:
                return (i, j), diff
    return None


def _polynomial(R: sympy.polys.rings.PolyRing, e: sympy.Expr) -> sympy.Expr:
    try:
        return R.from_expr(e).as_expr()
    except ValueError:
        return sympy.expand(e)


def _compare(form: Form, Q: int | None, quantity: str,
             pairs: Iterable[tuple[Matrix, Matrix]], failures: list[str]) -> Check:
    """Check lhs == rhs for every head's (lhs, rhs), built lazily so the time includes it."""
    t0 = time.perf_counter()
    equal = True
    for h, (lhs, rhs) in enumerate(pairs):
        found = _first_difference(lhs, rhs)
        if found is not None:
            (i, j), diff = found
            q = "" if Q is None else f" (Q={Q})"
            failures.append(f"{form.value}{q} {quantity} differs at head {h}, [{i}, {j}]: "
                            f"{str(diff)[:200]}")
            equal = False
            break
    return Check(form=form, chunk_size=Q, quantity=quantity, equal=equal,
                 seconds=time.perf_counter() - t0)


def _prove_sma(checked: CheckedSpec, s: Sizes, chunk_sizes: tuple[int, ...],
               failures: list[str]) -> list[Check]:
    heads = _sma_heads(checked, s)
    no_h0 = [{e: sympy.Integer(0) for e in hd.h0} for hd in heads]
    Mx = [_mixing(hd) * hd.x for hd in heads]
    rec = [_recurrent(hd) for hd in heads]
    checks = [
        _compare(Form.RECURRENT, None, "y", ((r[0].xreplace(z), m)
                 for r, z, m in zip(rec, no_h0, Mx)), failures),
        _compare(Form.RECURRENT, None, "final_state", ((r[1], _state(hd))
                 for r, hd in zip(rec, heads)), failures),
    ]
    if Form.QUADRATIC in checked.forms:
        checks.append(_compare(Form.QUADRATIC, None, "y", ((_masked(hd, 0, s.T), m)
                               for hd, m in zip(heads, Mx)), failures))
    if Form.CHUNKED in checked.forms:
        for Q in chunk_sizes:
            ch = [_chunked(hd, Q) for hd in heads]
            checks += [
                _compare(Form.CHUNKED, Q, "y", ((c[0].xreplace(z), m)
                         for c, z, m in zip(ch, no_h0, Mx)), failures),
                _compare(Form.CHUNKED, Q, "y_initial_state", ((c[0], r[0])
                         for c, r in zip(ch, rec)), failures),
                _compare(Form.CHUNKED, Q, "final_state", ((c[1], r[1])
                         for c, r in zip(ch, rec)), failures),
            ]
    return checks


def _window(spec: Spec, kernel: LearnedKernel, T: int) -> int:
    """Taps of a learned kernel within T: its window L when bound and shorter, else T."""
    for name in sorted(refs(kernel.kernel)):
        try:
            shape = spec.tensor(name).shape
        except KeyError:
            continue
        length = _value(spec, shape[-1]) if len(shape) >= 2 else None
        if length is not None:
            return min(length, T)
    return T


def _lti_dense(spec: Spec, mask: Toeplitz) -> bool:
    lti = mask.kernel
    if isinstance(lti, LearnedKernel) or lti.hippo is not None or lti.A is None:
        return True
    return any(t.name in refs(lti.A) and len(t.shape) == 3 for t in spec.tensors)


def _kernel_heads(checked: CheckedSpec, s: Sizes) -> list[_Kernel]:
    spec, mask = checked.spec, checked.spec.mask
    assert isinstance(mask, Toeplitz)
    xs = [Matrix(s.T, s.P, lambda t, p: _sym("x", t=t, g=g, p=p)) for g in range(s.value)]
    out = []
    for h in range(s.H):
        d, x = s.group(s.decay, h), xs[s.group(s.value, h)]
        if isinstance(mask.kernel, LearnedKernel):
            W = _window(spec, mask.kernel, s.T)
            taps = tuple(_sym("k", h=d, j=j) if j < W else sympy.Integer(0) for j in range(s.T))
            out.append(_Kernel(taps=taps, x=x, lti=None))
            continue
        if _lti_dense(spec, mask):
            A = Matrix(s.N, s.N, lambda n, m: _sym("Abar", h=d, n=n, m=m))
        else:
            A = sympy.diag(*(_sym("Abar", h=d, n=n) for n in range(s.N)))
        B = Matrix(s.N, 1, lambda n, _: _sym("Bbar", h=d, n=n))
        C = Matrix(s.N, 1, lambda n, _: _sym("Cbar", h=d, n=n))
        power, taps_list = B, []
        for _ in range(s.T):
            taps_list.append(sympy.expand((C.T * power)[0, 0]))
            power = (A * power).expand()
        out.append(_Kernel(taps=tuple(taps_list), x=x, lti=(A, B, C)))
    return out


def _toeplitz_matrix(k: _Kernel) -> Matrix:
    """M_ij = k_{i−j} for i ≥ j."""
    T = len(k.taps)
    return Matrix(T, T, lambda i, j: k.taps[i - j] if i >= j else sympy.Integer(0))


def _toeplitz_quadratic(k: _Kernel) -> Matrix:
    """y_i = Σ_{j ≤ i} k_{i−j} x_j."""
    T, P = k.x.shape
    return Matrix(T, P, lambda i, p: sum((k.taps[i - j] * k.x[j, p] for j in range(i + 1)),
                                         sympy.Integer(0)))


def _convolution(k: _Kernel) -> Matrix:
    """y_i = [z^i] K(z)·X(z): the polynomial product an FFT computes, truncated to T."""
    z = sympy.Dummy("z")
    T, P = k.x.shape
    K = sympy.Poly(sum((tap * z**i for i, tap in enumerate(k.taps)), sympy.Integer(0)), z)
    cols = []
    for p in range(P):
        X = sympy.Poly(sum((k.x[j, p] * z**j for j in range(T)), sympy.Integer(0)), z)
        product = K * X
        cols.append([product.nth(i) for i in range(T)])
    return Matrix(T, P, lambda i, p: cols[p][i])


def _lti_recurrent(k: _Kernel) -> Matrix:
    """h_t = Ā h_{t−1} + B̄ ⊗ x_t, y_t = Cᵀ h_t, from h_{−1} = 0."""
    assert k.lti is not None
    A, B, C = k.lti
    h, rows = sympy.zeros(A.rows, k.x.cols), []
    for t in range(k.x.rows):
        h = A * h + B * k.x[t, :]
        rows.append(C.T * h)
    return Matrix.vstack(*rows)


def _prove_toeplitz(checked: CheckedSpec, s: Sizes, failures: list[str]) -> list[Check]:
    kernels = _kernel_heads(checked, s)
    Mx = [_toeplitz_matrix(k) * k.x for k in kernels]
    checks = []
    if kernels[0].lti is not None:
        checks.append(_compare(Form.RECURRENT, None, "y", ((_lti_recurrent(k), m)
                               for k, m in zip(kernels, Mx)), failures))
    expansions = {Form.QUADRATIC: _toeplitz_quadratic, Form.CONVOLUTION: _convolution}
    for form in checked.forms:
        checks.append(_compare(form, None, "y", ((expansions[form](k), m)
                               for k, m in zip(kernels, Mx)), failures))
    return checks


_FORMS = {
    Causal: {Form.RECURRENT, Form.QUADRATIC, Form.CHUNKED},
    ConstDecay: {Form.RECURRENT, Form.QUADRATIC, Form.CHUNKED},
    ScalarSemiseparable: {Form.RECURRENT, Form.QUADRATIC, Form.CHUNKED},
    DiagonalSemiseparable: {Form.RECURRENT, Form.QUADRATIC, Form.CHUNKED},
    Toeplitz: {Form.QUADRATIC, Form.CONVOLUTION},
}


def prove(checked: CheckedSpec, *, T: int = 6, chunk_sizes: tuple[int, ...] = (2, 3),
          heads: int = 2) -> Proof:
    """Prove every form the spec allows equal to M·x (and chunked states to recurrent ones)."""
    if T < 1 or any(Q < 1 for Q in chunk_sizes):
        raise ValueError(f"T and chunk sizes must be positive, got T={T}, {chunk_sizes}")
    t0 = time.perf_counter()
    mask = checked.spec.mask
    unknown = set(checked.forms) - _FORMS[type(mask)]
    if unknown:
        names = ", ".join(sorted(f.value for f in unknown))
        raise ProofError(f"{checked.spec.name}: no expansion of form {names} "
                         f"for a {type(mask).__name__} mask")
    s, failures = problem_sizes(checked, T, heads=heads), []
    if isinstance(mask, Toeplitz):
        checks = _prove_toeplitz(checked, s, failures)
    else:
        checks = _prove_sma(checked, s, chunk_sizes, failures)
    if failures:
        raise ProofError(f"{checked.spec.name}: " + "; ".join(failures))
    return Proof(spec=checked.spec.name, sizes=s, checks=tuple(checks),
                 seconds=time.perf_counter() - t0)


def mixing_matrix(checked: CheckedSpec, T: int = 6) -> Matrix:
    """M (T×T) of output head 0, entries in the input symbols, for display."""
    s = problem_sizes(checked, T)
    if isinstance(checked.spec.mask, Toeplitz):
        return _toeplitz_matrix(_kernel_heads(checked, s)[0])
    return _mixing(_sma_heads(checked, s)[0])
