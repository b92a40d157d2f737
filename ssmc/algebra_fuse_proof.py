"""SymPy proof that the one op with K·H heads (`ssmc.algebra_fuse`) computes the sum.

At T = 4 and a few heads (H = 2 output heads; a role grouped in the spec gets 1 group),
for every output head h the mask as written, Σ_p L^p_h ∘ (C_h B_hᵀ) with X̄_h, must equal
what the fused op computes: Σ over the fused heads j that `algebra_fuse.output_sum` adds
into h of the semiseparable mask of la_j, each role read from the group the kernels give
fused head j (j // (K·H / groups)). la_j is the log decay `algebra_fuse.log_decay` of the
term and head that `algebra_fuse.interleave` puts in column j. The column and output maps
are read off the torch glue itself (run on labelled tensors), so a wrong layout fails.
Every value is one symbol per (tensor, token, group index); N = P = 1 (M is linear in
C Bᵀ and X̄, so the head mapping is all that is at stake; a diagonal decay is then one
log decay per head too: its N axis is that of the op's own proof).
"""

from __future__ import annotations

import time

import sympy
import torch

from ssmc import algebra_fuse, ir
from ssmc import expr as E
from ssmc.axes import head_dims
from ssmc.expr_sympy import symbol, to_sympy

PROOF_T = 4
PROOF_HEADS = 2


def _head_sizes(checked: ir.CheckedSpec, H: int) -> dict[str, int]:
    """Proof size of each head dim: H for the output's, 1 for a dim of 1, else H // 2."""
    spec = checked.spec
    values = {d.name: d.value for d in spec.dims}
    out = checked.heads.output
    sizes = {}
    for dim in head_dims(spec):
        if dim == out or (values.get(dim) is not None and values.get(dim) == values.get(out)):
            sizes[dim] = H
        elif values.get(dim) == 1:
            sizes[dim] = 1
        else:
            sizes[dim] = max(H // 2, 1)
    return sizes


class _At:
    """An expression's value at (token t, head h of `total` heads) as SymPy."""

    def __init__(self, spec: ir.Spec, sizes: dict[str, int]) -> None:
        self.spec, self.sizes = spec, sizes
        self.dims = {d.name: d.value for d in spec.dims}

    def __call__(self, expr: E.Expr, t: int, head: int, total: int) -> sympy.Expr:
        table: dict[str, sympy.Expr] = {}
        for name in E.refs(expr):
            if name in self.dims:
                value = self.dims[name]
                table[name] = sympy.Integer(value) if value is not None else symbol(name)
                continue
            tensor = self.spec.tensor(name)
            axis = next((a for a in tensor.shape if a in self.sizes), None)
            index = 0 if axis is None else head // (total // self.sizes[axis])  # type: ignore[index]
            tag = f"_t{t}" if tensor.kind is ir.TensorKind.INPUT else ""
            table[name] = symbol(f"{name}{tag}_h{index}")
        return to_sympy(expr, table)


def _maps(H: int, K: int) -> tuple[list[tuple[int, int]], list[int]]:
    """(term p, head h) in each decay column, and the output head each fused head adds into."""
    cols = [torch.full((1, 1, H), float(p * H), dtype=torch.float64)
            + torch.arange(H, dtype=torch.float64) for p in range(K)]
    la = algebra_fuse.interleave(cols)[0, 0]
    columns = [(int(v) // H, int(v) % H) for v in la.tolist()]
    eye = torch.eye(K * H, dtype=torch.float64).reshape(1, 1, K * H, K * H)
    added = algebra_fuse.output_sum(eye, K)[0, 0]           # [H, K·H]
    into = []
    for j in range(K * H):
        (hs,) = torch.nonzero(added[:, j]).flatten().tolist() or [-1]
        into.append(int(hs))
    return columns, into


def _written(at: _At, spec: ir.Spec, term: ir.Mask, h: int, H: int, i: int, j: int) -> sympy.Expr:
    """L^term_ij at head h, by the kind's own formula."""
    match term:
        case ir.Causal():
            return sympy.Integer(1)
        case ir.ConstDecay(log_gamma=e):
            return sympy.exp(at(e, 0, h, H)) ** (i - j)
        case ir.ScalarSemiseparable(log_a=e) | ir.DiagonalSemiseparable(log_a=e):
            return sympy.exp(sympy.Add(*(at(e, k, h, H) for k in range(j + 1, i + 1))))
    raise TypeError(f"not a fused term: {term!r}")


def prove_fused(checked: ir.CheckedSpec, fused: ir.CheckedSpec) -> object:
    """The identity `written sum = fused op` at PROOF_T, as a `symbolic.Check`."""
    from ssmc import symbolic
    from ssmc.algebra_symbolic import _zero

    t0 = time.perf_counter()
    scaled = algebra_fuse.scaled_terms(checked)
    assert scaled is not None
    terms = [m for m, _ in scaled]
    weighted = algebra_fuse.weighted(checked)
    spec, K, T = checked.spec, len(terms), PROOF_T
    H = 1 if checked.heads.output == 1 else PROOF_HEADS
    sizes = _head_sizes(checked, H)
    out, kh = checked.heads.output, fused.heads.output
    fsizes = {**sizes, str(kh): K * H} if isinstance(kh, str) else dict(sizes)
    at, fat = _At(spec, sizes), _At(fused.spec, fsizes)
    columns, into = _maps(H, K)
    assert spec.query is not None and spec.key is not None and isinstance(out, str | int)

    def core(a: _At, s: ir.Spec, head: int, total: int, i: int, j: int) -> sympy.Expr:
        return (a(s.query, i, head, total) * a(s.key, j, head, total)  # type: ignore[arg-type]
                * a(s.value, j, head, total))

    def scale(p: int, h: int) -> sympy.Expr:
        c = scaled[p][1]
        return sympy.Integer(1) if c is None else at(c, 0, h, H)

    def weight(fh: int) -> sympy.Expr:
        return scale(*columns[fh]) if weighted else sympy.Integer(1)

    def la(fh: int, k: int) -> sympy.Expr:
        p, h = columns[fh]
        e = algebra_fuse.log_decay(terms[p])
        return sympy.Integer(0) if e is None else at(e, k, h, H)

    equal = True
    for h in range(H):
        for i in range(T):
            for j in range(i + 1):
                want = sympy.Add(*(scale(p, h) * _written(at, spec, t, h, H, i, j)
                                   for p, t in enumerate(terms))) * core(at, spec, h, H, i, j)
                got = sympy.Add(*(
                    weight(fh) * sympy.exp(sympy.Add(*(la(fh, k) for k in range(j + 1, i + 1))))
                    * core(fat, fused.spec, fh, K * H, i, j)
                    for fh in range(K * H) if into[fh] == h))
                equal = equal and _zero(want - got)
    return symbolic.Check(form=ir.Form.QUADRATIC, chunk_size=None,
                          quantity=f"sum = one op with {K}·H heads", equal=equal,
                          seconds=time.perf_counter() - t0)
