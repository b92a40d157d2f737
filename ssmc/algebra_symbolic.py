"""SymPy proofs of the mask algebra: the mask that runs equals the mask as written.

At a small T, each basic mask becomes its T×T matrix L in the values of its expressions
(a per-token tensor t ↦ one symbol per step, a param ↦ one symbol, lag-indexed taps ↦
one symbol per lag; one head, index 0 of every other axis):
causal 1, const_decay exp(g)^(i−j), semiseparable exp(Σ_{k=j+1..i} e_k), toeplitz
K_{i−j}·exp(g)^(i−j); quasiseparable adds exp(Σ_{k=i..j−1} b_k) above the diagonal;
a scale is the all-c matrix, a product the elementwise product, a sum the sum. The
matrix as written must equal what runs: the rewritten mask times (rewritten value /
value) for a rewrite, Σ of the pieces for a sum, the forward piece plus the flipped
backward piece minus the diagonal for a quasiseparable mask, the taps K[d]·exp(d·g) for
a decayed window. Every piece is then proved in each of its forms by `ssmc.symbolic`.
"""

from __future__ import annotations

import dataclasses
import itertools
import time

import sympy
from sympy import Matrix

from ssmc import expr as E
from ssmc import ir
from ssmc.algebra_fuse import fused_checked
from ssmc.expr_sympy import symbol, to_sympy
from ssmc.ir import CheckedSpec, Form

PROOF_T = 4
"""Sequence length of the composition identity (the pieces are proved at the given T)."""


class _Symbols:
    """Expression values at one token (or lag) as SymPy: per-token tensors indexed by t."""

    def __init__(self, spec: ir.Spec) -> None:
        self.spec = spec
        self.tokens = {t.name for t in spec.tensors if t.kind is ir.TensorKind.INPUT}
        self.dims = {d.name: d.value for d in spec.dims}

    def at(self, expr: E.Expr, t: int, *, lag: str | None = None) -> sympy.Expr:
        table: dict[str, sympy.Expr] = {}
        for name in E.refs(expr):
            if name in self.dims:
                value = self.dims[name]
                table[name] = sympy.Integer(value) if value is not None else symbol(name)
            elif name in self.tokens:
                table[name] = symbol(f"{name}_t{t}")
            elif lag is not None and lag in self.spec.tensor(name).shape:
                table[name] = symbol(f"{name}_d{t}")
            else:
                table[name] = symbol(name)
        return to_sympy(expr, table)


def _segment(s: _Symbols, e: E.Expr, lo: int, hi: int) -> sympy.Expr:
    """exp(Σ_{k=lo..hi} e_k) (1 when empty)."""
    return sympy.exp(sympy.Add(*(s.at(e, k) for k in range(lo, hi + 1))))


def matrix(s: _Symbols, mask: ir.MaskExpr, T: int) -> Matrix:
    """The T×T matrix of a mask expression (see the module docstring)."""
    match mask:
        case ir.MaskSum(terms=parts):
            out = sympy.zeros(T, T)
            for p in parts:
                out += matrix(s, p, T)
            return out
        case ir.MaskProduct(factors=parts):
            out = sympy.ones(T, T)
            for p in parts:
                out = out.multiply_elementwise(matrix(s, p, T))
            return out
        case ir.MaskScale(value=e):
            c = s.at(e, 0)
            return Matrix(T, T, lambda i, j: c)
        case ir.Quasiseparable(forward=f, backward=b):
            lower = matrix(s, f, T)
            eb = _log(b)
            return Matrix(T, T, lambda i, j: lower[i, j] if i >= j else _segment(s, eb, i, j - 1)
                          if eb is not None else sympy.Integer(1))
        case ir.Toeplitz(kernel=ir.LearnedKernel(kernel=k, log_decay=g)):
            lag = _lag(s.spec, k)
            taps = [s.at(k, d, lag=lag) for d in range(T)]
            decay = sympy.exp(s.at(g, 0)) if g is not None else sympy.Integer(1)
            window = _window(s.spec, lag, T)
            return Matrix(T, T, lambda i, j: taps[i - j] * decay ** (i - j)
                          if 0 <= i - j < window else 0)
    e = _log(mask)  # type: ignore[arg-type]
    if isinstance(mask, ir.Causal):
        return Matrix(T, T, lambda i, j: 1 if i >= j else 0)
    if isinstance(mask, ir.ConstDecay):
        gamma = sympy.exp(s.at(mask.log_gamma, 0))
        return Matrix(T, T, lambda i, j: gamma ** (i - j) if i >= j else 0)
    if e is not None:
        return Matrix(T, T, lambda i, j: _segment(s, e, j + 1, i) if i >= j else 0)
    raise ValueError(f"no symbolic matrix for {type(mask).__name__}")


def _log(mask: ir.Mask) -> E.Expr | None:
    match mask:
        case ir.ConstDecay(log_gamma=e) | ir.ScalarSemiseparable(log_a=e):
            return e
        case ir.DiagonalSemiseparable(log_a=e):
            return e
    return None


def _lag(spec: ir.Spec, kernel: E.Expr) -> str | None:
    from ssmc.axes import expr_axes, head_dims

    rest = [a for a in expr_axes(kernel, spec) if a not in head_dims(spec)]
    return rest[0] if rest else None


def _window(spec: ir.Spec, lag: str | None, T: int) -> int:
    if lag is None:
        return 1
    value = {d.name: d.value for d in spec.dims}.get(lag)
    return T if value is None else min(value, T)


def _ratio(s: _Symbols, value: E.Expr, base: E.Expr, T: int) -> list[sympy.Expr]:
    """value_j / base_j per token j (the scale a rewrite folded into the value)."""
    return [sympy.cancel(s.at(value, j) / s.at(base, j)) for j in range(T)]


def running_matrix(checked: CheckedSpec, T: int) -> Matrix:
    """The mask the op runs, as the composite op assembles it from its pieces."""
    spec = checked.spec
    s = _Symbols(spec)
    if not checked.pieces:
        ratio = _ratio(s, spec.value, _written_value(checked), T)
        L = matrix(s, spec.mask, T)
        return Matrix(T, T, lambda i, j: L[i, j] * ratio[j])
    if isinstance(spec.mask, ir.Toeplitz):
        k = spec.mask.kernel
        assert isinstance(k, ir.LearnedKernel) and k.log_decay is not None
        lag = _lag(spec, k.kernel)
        window = _window(spec, lag, T)
        taps = [s.at(k.kernel, d, lag=lag) * sympy.exp(d * s.at(k.log_decay, 0))
                for d in range(T)]
        return Matrix(T, T, lambda i, j: taps[i - j] if 0 <= i - j < window else 0)
    parts = []
    for piece in checked.pieces:
        ratio = _ratio(s, piece.spec.value, spec.value, T)
        L = matrix(s, piece.spec.mask, T)
        parts.append(Matrix(T, T, lambda i, j, L=L, r=ratio: L[i, j] * r[j]))
    if isinstance(spec.mask, ir.MaskSum):
        out = sympy.zeros(T, T)
        for p in parts:
            out += p
        return out
    fwd, bwd = parts
    # The backward piece runs on the reversed sequence: its token t is token T−1−t.
    flip = {symbol(f"{n}_t{t}"): symbol(f"{n}_t{T - 1 - t}") for n in s.tokens for t in range(T)}
    rev = bwd.xreplace(flip)
    return Matrix(T, T, lambda i, j: fwd[i, j] + rev[T - 1 - i, T - 1 - j]
                  - (fwd[i, j] if i == j else 0))


def _written_value(checked: CheckedSpec) -> E.Expr:
    """The value as written: a rewrite multiplied it by the scale (value · c)."""
    return checked.spec.value if not _scaled(checked) else checked.spec.value.lhs  # type: ignore[union-attr]


def _scaled(checked: CheckedSpec) -> bool:
    return any("value scaled" in line for line in checked.derivation)


def prove_algebra(checked: CheckedSpec, *, T: int, chunk_sizes: tuple[int, ...],
                  heads: int) -> object:
    """The composition identity at T = PROOF_T, then every piece's forms (`symbolic.prove`)."""
    from ssmc import symbolic

    t0 = time.perf_counter()
    spec = checked.spec
    written = spec.composition if spec.composition is not None else spec.mask
    s = _Symbols(spec)
    t1 = time.perf_counter()
    diff = matrix(s, written, PROOF_T) - running_matrix(checked, PROOF_T)
    equal = all(_zero(diff[i, j]) for i in range(PROOF_T) for j in range(PROOF_T))
    identity = symbolic.Check(form=Form.QUADRATIC, chunk_size=None,
                              quantity="M = mask as written", equal=equal,
                              seconds=time.perf_counter() - t1)
    if not equal:
        raise symbolic.ProofError(f"{spec.name}: the mask that runs differs from "
                                  f"{written and mask_text(written)}")
    pieces = checked.pieces or (dataclasses.replace(
        checked, spec=dataclasses.replace(spec, composition=None), derivation=()),)
    checks = [identity]
    sizes = None
    fused = fused_checked(checked) if checked.pieces else None
    if fused is not None:  # the sum runs as one op with K·H heads: prove that lowering too
        from ssmc.algebra_fuse_proof import prove_fused

        lowered = prove_fused(checked, fused)
        checks.append(lowered)  # type: ignore[arg-type]
        if not lowered.equal:  # type: ignore[attr-defined]
            raise symbolic.ProofError(f"{spec.name}: the one op with K·H heads differs from "
                                      f"the sum {mask_text(written)}")
        pieces = (*pieces, fused)
    for piece in pieces:
        proof = symbolic.prove(piece, T=T, chunk_sizes=chunk_sizes, heads=heads)
        sizes = sizes or proof.sizes
        checks += [c for c in proof.checks if c.form in checked.forms]
    assert sizes is not None
    return symbolic.Proof(spec=spec.name, sizes=sizes, checks=tuple(checks),
                          seconds=time.perf_counter() - t0)


def mask_text(mask: ir.MaskExpr) -> str:
    from ssmc.algebra import mask_text as text

    return text(mask)


def _zero(e: sympy.Expr) -> bool:
    """Whether e is 0: exponentials of sums split into products, then expanded."""
    if e == 0:
        return True
    expanded = sympy.expand(sympy.powsimp(sympy.expand(e, power_exp=True), combine="exp"))
    if expanded == 0:
        return True
    return sympy.simplify(e) == 0


def numeric_check_algebra(checked: CheckedSpec, *, T: int, chunk_sizes: tuple[int, ...],
                          seed: int, tol: float) -> tuple[object, ...]:
    """Each piece's reference against its lambdified M, then the composite op assembled
    from the pieces' references against the composite's dense reference, in every form."""
    import importlib

    import torch

    from ssmc import symbolic, symbolic_numeric
    from ssmc.algebra_ops import CompositeOp, ReferencePiece

    ref = importlib.import_module("ssmc.reference")
    pieces = checked.pieces or (dataclasses.replace(
        checked, spec=dataclasses.replace(checked.spec, composition=None), derivation=()),)
    out = []
    for piece in pieces:
        found = symbolic_numeric.numeric_check(piece, T=T, chunk_sizes=chunk_sizes, seed=seed,
                                               tol=tol)
        out += [a for a in found if a.form in checked.forms]
    if not checked.pieces:
        return tuple(out)
    from ssmc.pipeline import with_dims

    small = with_dims(checked, {d.name: min(d.value or 4, 4) for d in checked.spec.dims
                                if d.name not in _lag_dims(checked)})
    generator = torch.Generator().manual_seed(seed)
    tensors = ref.random_inputs(small, batch=2, seqlen=T, generator=generator)
    h0 = tensors.pop("initial_state", None)
    ops = {"composite": CompositeOp(small, pieces=[ReferencePiece(p) for p in small.pieces],
                                    fuse=False)}
    fused = fused_checked(small)
    if fused is not None:  # the one op with K·H heads, run by its own reference
        ops["one op, K·H heads"] = CompositeOp(small, pieces=[ReferencePiece(fused)])
    bad = []
    for (label, op), form in itertools.product(ops.items(), small.forms):
        want, want_state = ref.reference(small, form)(**tensors, initial_state=h0)
        got, state = op(**tensors, initial_state=h0, form=form)
        for quantity, g, w in ((f"y ({label})", got, want), (f"final_state ({label})", state,
                                                               want_state)):
            if g is None or w is None:
                continue
            error = float((g - w).norm() / w.norm())
            out.append(symbolic_numeric.Agreement(form=form, chunk_size=None, quantity=quantity,
                                                  error=error))
            if not error <= tol:
                bad.append(f"{form.value} {quantity} off by {error:.1e}")
    if bad:
        raise symbolic.ProofError(f"{checked.spec.name}: " + "; ".join(bad))
    return tuple(out)


def _lag_dims(checked: CheckedSpec) -> set[str]:
    """Dims that are window lengths of a Toeplitz kernel (kept: the window is the point)."""
    return {str(t.shape[-1]) for p in checked.pieces for t in p.spec.tensors
            if isinstance(p.spec.mask, ir.Toeplitz) and t.kind is ir.TensorKind.PARAM
            and len(t.shape) == 2}
