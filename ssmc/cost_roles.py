"""Cost of the launches around the core: the prologue, the epilogue and the LTI kernel.

The same launches run in every form: the prologue computes the canonical core inputs
(x, s, log a, B, C of docs/semantics.md) from the declared tensors, one launch per
iteration space; the epilogue applies skip and gate to the core's fp32 y; an LTI mask
builds its Toeplitz kernel K in torch ops first.
"""

from __future__ import annotations

import math

from ssmc import ir
from ssmc.cost_terms import STATE_BYTES, Launch, Sizes
from ssmc.expr import BinOp, Call, Expr, Neg, Ref, refs
from ssmc.roles import query_scale

ELEMENTS_PER_PROGRAM = 4096
"""Elements one program of an elementwise launch (prologue, epilogue) handles."""
SMALL_RESIDENT = 16
"""Programs of an elementwise launch resident on one SM (few registers each)."""


def prologue(s: Sizes, *, fused_decay: bool = False) -> tuple[Launch, ...]:
    """The roles computed into canonical core inputs (one launch per iteration space), and
    the LTI kernel K: the same launches in every form, except that the chunked form of a
    diagonal decay evaluates log a in its cumsum (`fused_decay`: log a left out here, and C
    where the query is a tensor times a constant, which the scan's store applies)."""
    groups: dict[tuple[ir.Size, ...], list[tuple[Expr, int]]] = {}
    decay = decay_expression(s) if fused_decay else None
    # with the decay fused, a query `q * c` is read as q and c scales y (roles.query_scale)
    query = s.spec.query if decay is not None else None
    for expr, shape, row in _computed(s):
        if expr is decay or (expr is query and query_scale(s.spec, shape) is not None):
            continue
        groups.setdefault(shape, []).append((expr, row))
    launches = []
    for shape, targets in groups.items():
        elements = math.prod(s.size(a) for a in shape[2:])
        read = set[str]().union(*(refs(e) for e, _ in targets))
        launches.append(
            Launch(
                name="prologue",
                scalar_flops=s.tokens * elements * sum(_ops(e) for e, _ in targets),
                bytes=s.tokens * (_raw_row(s, read) + sum(row for _, row in targets)),
                programs=max(1, s.tokens * elements // ELEMENTS_PER_PROGRAM),
                resident=SMALL_RESIDENT,
            )
        )
    mask = s.spec.mask
    if isinstance(mask, ir.Toeplitz) and isinstance(mask.kernel, ir.LtiKernel):
        launches += _lti_kernel(s, mask.kernel)
    return tuple(launches)


def epilogue(s: Sizes) -> tuple[Launch, ...]:
    """out = (y + skip) * gate from the core's fp32 y, when the spec has either role."""
    roles = [e for e in (s.spec.skip, s.spec.gate) if e is not None]
    if not roles:
        return ()
    read = set[str]().union(*(refs(e) for e in roles))
    out = s.H * s.P * s.shape.dtype_bytes
    return (
        Launch(
            name="epilogue",
            scalar_flops=s.tokens * s.H * s.P * sum(_ops(e) + 1 for e in roles),
            bytes=s.tokens * (s.y_row + _raw_row(s, read) + out),
            programs=max(1, s.tokens * s.H * s.P // ELEMENTS_PER_PROGRAM),
            resident=SMALL_RESIDENT,
        ),
    )


def _computed(s: Sizes) -> list[tuple[Expr, tuple[ir.Size, ...], int]]:
    """Per-token core inputs the prologue computes: (expression, canonical shape, row bytes)."""
    spec, heads, out = s.spec, s.checked.heads, []
    N, P = s.checked.state_size, s.checked.head_dim
    bt: tuple[ir.Size, ...] = (ir.BATCH, ir.SEQ)

    def need(expr: Expr | None, shape: tuple[ir.Size, ...], row: int) -> None:
        bare = (isinstance(expr, Ref) and any(t.name == expr.name for t in spec.tensors)
                and spec.tensor(expr.name).shape == shape)  # a dim's name is no tensor
        if expr is not None and not bare:
            out.append((expr, shape, row))

    mask = spec.mask
    if isinstance(mask, ir.ScalarSemiseparable):
        need(mask.log_a, (*bt, heads.decay or 1), s.a_row)
    elif isinstance(mask, ir.DiagonalSemiseparable) and N is not None:
        need(mask.log_a, (*bt, heads.decay or 1, N), s.a_row)
    value_shape = (*bt, heads.value, P)
    factors = s.checked.value_factors
    if factors is not None and spec.tensor(factors.base).shape == value_shape:
        need(factors.scale, value_shape[:3], STATE_BYTES * s.size(heads.value))
    else:
        need(spec.value, value_shape, s.x_row)
    if N is not None and not isinstance(mask, ir.Toeplitz):
        need(spec.key, (*bt, heads.key or 1, N), s.k_row)
        need(spec.query, (*bt, heads.query or 1, N), s.q_row)
    return out


def _lti_kernel(s: Sizes, lti: ir.LtiKernel) -> tuple[Launch, ...]:
    """K_k = C Ā^k B̄ for k < T in torch ops (fp64), once per call per decay group.

    Diagonal A: a Vandermonde product. Dense A: Ā^k B̄ by doubling, log2 T rounds.
    """
    d = s.size(s.checked.heads.decay or 1)
    if not _dense_A(s.spec, lti):
        table = d * s.T * s.N * 16
        return (
            Launch(
                name="lti_vandermonde",
                scalar_flops=d * s.T * s.N * 8,
                bytes=3 * table,
                programs=d,
                triton=False,
            ),
        )
    doublings = max(s.T - 1, 1).bit_length()
    return tuple(
        Launch(
            name="lti_doubling",
            scalar_flops=d * 2 * s.N * s.N * (2**r + s.N),
            bytes=d * 2**r * s.N * 8 * 3,
            programs=d,
            serial_steps=1,
            triton=False,
        )
        for r in range(doublings)
    )


def decay_expression(s: Sizes) -> Expr | None:
    """log a of a diagonal decay when the prologue computes it from an expression (what the
    chunked forward's cumsum evaluates in place, templates/chunked_diag_decay), else None."""
    mask, N = s.spec.mask, s.checked.state_size
    if not isinstance(mask, ir.DiagonalSemiseparable) or not isinstance(N, str):
        return None
    computed = [e for e, _, _ in _computed(s)]
    return mask.log_a if any(e is mask.log_a for e in computed) else None


def decay_read(s: Sizes, expr: Expr) -> tuple[int, int]:
    """(bytes per token read, operations per element) of evaluating `expr` per token."""
    return _raw_row(s, refs(expr)), _ops(expr)


def _raw_row(s: Sizes, names: set[str]) -> int:
    """Bytes per token of the declared per-token inputs called `names`."""
    inputs = (t for t in s.spec.tensors if t.kind is ir.TensorKind.INPUT and t.name in names)
    return sum(math.prod(s.size(a) for a in t.shape[2:]) for t in inputs) * s.shape.dtype_bytes


def _ops(expr: Expr | None) -> int:
    """Operations in an expression: one per operator and function call."""
    match expr:
        case Neg(operand=operand):
            return 1 + _ops(operand)
        case BinOp(lhs=lhs, rhs=rhs):
            return 1 + _ops(lhs) + _ops(rhs)
        case Call(args=args):
            return 1 + sum(_ops(a) for a in args)
    return 0


def _dense_A(spec: ir.Spec, lti: ir.LtiKernel) -> bool:
    """A HiPPO matrix or an A read from an [H, N, N] parameter: powers cost N² per step."""
    if lti.hippo is not None:
        return True
    if lti.A is None:
        return False
    return any(len(spec.tensor(n).shape) == 3 for n in refs(lti.A))
