"""Forward cost of one call in one form: tensor-core and scalar FLOPs, bytes, launches.

The planner weighs these against a device's rates (DESIGN §4). The counts follow the
kernels as the stage templates build them (templates/*.jinja), launch by launch: a
prologue computes the canonical core inputs (x, s, log_a, B, C of docs/semantics.md),
the form's stages run on them, an epilogue applies skip and gate. Per head pattern:
the chunked scan computes C Bᵀ once per (query, key) group and serves its heads (MVA:
once per G); the quadratic kernel recomputes it per head. Tensor-core work is counted
as issued (every matmul dim padded to 16); bytes are HBM traffic with each canonical
row read once per launch that needs it (L2 serves the heads of a group).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ssmc import ir
from ssmc.errors import SsmcError
from ssmc.expr import BinOp, Call, Expr, Neg, Ref, refs

STATE_BYTES = 4
"""States, cumulative sums, log a and s are fp32."""
MMA = 16
"""Smallest tensor-core tile edge: matmul dims are padded to a multiple of it."""
QUADRATIC_TILE = 64
"""Largest query/key tile of the quadratic kernels (a BLOCK_I × BLOCK_J fp32 score tile)."""
SizeOf = Callable[[ir.Size], int]


class PlanError(SsmcError, ValueError):
    """A call shape or planning request that does not fit the spec (unbound dim, bad form...)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Shape:
    """The sizes of one call: `batch`, total `seqlen`, dims bound at call time (P, N...).

    With varlen, `num_seqs` sequences of mean length seqlen/num_seqs are packed (batch = 1).
    """

    batch: int
    seqlen: int
    dims: Mapping[str, int] = field(default_factory=dict)
    dtype_bytes: int = 2
    num_seqs: int = 1

    def __post_init__(self) -> None:
        if self.batch < 1 or self.seqlen < 1 or self.num_seqs < 1:
            raise PlanError(f"batch, seqlen and num_seqs must be ≥ 1, got {self}")
        if self.num_seqs > 1 and self.batch != 1:
            raise PlanError("packed sequences (num_seqs > 1) need batch = 1")
        if self.num_seqs > self.seqlen:
            raise PlanError(f"{self.num_seqs} sequences cannot pack into {self.seqlen} tokens")
        if self.dtype_bytes not in (1, 2, 4, 8):
            raise PlanError(f"dtype_bytes must be 1, 2, 4 or 8, got {self.dtype_bytes}")
        object.__setattr__(self, "dims", MappingProxyType(dict(sorted(self.dims.items()))))

    def __hash__(self) -> int:
        return hash(
            (self.batch, self.seqlen, tuple(self.dims.items()), self.dtype_bytes, self.num_seqs)
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Launch:
    """One kernel launch (or torch op): its work, its traffic and how parallel it is."""

    name: str
    matmul_flops: int = 0
    """Tensor-core FLOPs, tiles padded as issued."""
    scalar_flops: int = 0
    """CUDA-core FLOPs: scans, exp of decays, masks, FFTs, pointwise roles."""
    bytes: int = 0
    """HBM bytes read and written."""
    programs: int = 1
    """Independent programs: below the SM count the launch leaves the GPU idle."""
    serial_steps: int = 0
    """The longest chain of dependent loop steps inside one program (T for a scan)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Cost:
    """What one form costs for one call: its launches in order, and the state it holds."""

    launches: tuple[Launch, ...]
    state_bytes: int
    """fp32 state memory the form holds: the running state, or every chunk's state."""

    @property
    def kernels(self) -> int:
        """Number of launches."""
        return len(self.launches)

    @property
    def matmul_flops(self) -> int:
        """Tensor-core FLOPs of all launches."""
        return sum(k.matmul_flops for k in self.launches)

    @property
    def scalar_flops(self) -> int:
        """CUDA-core FLOPs of all launches."""
        return sum(k.scalar_flops for k in self.launches)

    @property
    def flops(self) -> int:
        """All forward FLOPs, tensor-core and scalar."""
        return self.matmul_flops + self.scalar_flops

    @property
    def bytes(self) -> int:
        """HBM bytes of all launches."""
        return sum(k.bytes for k in self.launches)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Sizes:
    """One spec at one call shape, resolved; rows are bytes per token of the canonical core."""

    spec: ir.Spec
    checked: ir.CheckedSpec
    shape: Shape
    size: SizeOf
    T: int
    """Tokens per (mean) sequence."""
    seqs: int
    tokens: int
    H: int
    N: int
    P: int
    qk: int
    """Distinct (query, key) group pairs: the C Bᵀ blocks one chunk needs."""
    q_row: int
    k_row: int
    x_row: int
    a_row: int
    y_row: int
    state: int
    """Bytes of every sequence's and head's fp32 state: seqs·H·N·P·4."""


def cost(checked: ir.CheckedSpec, form: ir.Form, shape: Shape, *, chunk_size: int = 64) -> Cost:
    """Forward cost of `checked` in `form` for `shape`; `chunk_size` is Q (quadratic: the tile)."""
    if form not in checked.forms:
        allowed = ", ".join(f.value for f in checked.forms)
        raise PlanError(f"form {form.value!r} is not allowed for this spec; allowed: {allowed}")
    s = _sizes(checked, shape)
    mask = s.spec.mask
    if form is ir.Form.RECURRENT:
        core, held = _recurrent(s), s.state
    elif form is ir.Form.CONVOLUTION:
        core, held = _convolution(s), 0
    elif isinstance(mask, ir.Toeplitz):
        core, held = _toeplitz_quadratic(s, chunk_size), 0
    elif form is ir.Form.QUADRATIC:
        core = _quadratic(s, chunk_size)
        held = s.state if s.spec.initial_state or s.spec.final_state else 0
    else:
        core, held = _chunked(s, chunk_size), _cdiv(s.T, chunk_size) * s.state
    return Cost(launches=(*_prologue(s), *core, *_epilogue(s)), state_bytes=held)


def _recurrent(s: _Sizes) -> tuple[Launch, ...]:
    """h_t = a_t ⊙ h_{t-1} + B_t ⊗ X̄_t, y_t = C_tᵀ h_t: one program per (sequence, head,
    P tile) walks its tokens with the N × BLOCK_P state in registers."""
    mask = s.spec.mask
    update = 2 if isinstance(mask, ir.Causal) else 3
    exps = s.N if isinstance(mask, ir.DiagonalSemiseparable) else 1
    block_p = min(_pow2(s.P), max(1, 2048 // _pow2(s.N)))
    return (
        Launch(
            name="recurrent",
            scalar_flops=s.tokens * s.H * ((update + 2) * s.N * s.P + 2 * exps),
            bytes=_core_io(s),
            programs=s.seqs * s.H * _cdiv(s.P, block_p),
            serial_steps=s.T,
        ),
    )


def _quadratic(s: _Sizes, chunk: int) -> tuple[Launch, ...]:
    """Y = (L ∘ C Bᵀ) X̄: a program per (query tile, head, P tile) walks the key tiles back
    from the diagonal (suffix sums of log a, no cumsum pass); C Bᵀ per head and P tile.
    A returned final state is one more launch that walks each sequence's key tiles."""
    spec = s.spec
    bt = quadratic_tile(s.T, chunk)
    nb = _cdiv(s.T, bt)
    pairs = _tile_pairs(nb, bt, s.T)
    p_tiles = _cdiv(s.P, _clamp(s.P, MMA, 64))
    per_head = pairs * (_mm(bt, bt, s.N) * p_tiles + _mm(bt, s.P, bt))
    if spec.initial_state:
        per_head += nb * _mm(bt, s.P, s.N)
    decay = not isinstance(spec.mask, ir.Causal)
    key_rows = s.k_row + s.x_row + s.a_row
    main = Launch(
        name="quadratic",
        matmul_flops=s.seqs * s.H * per_head,
        scalar_flops=s.seqs * s.H * pairs * bt * bt * 3 * p_tiles if decay else 0,
        bytes=_core_io(s) - s.state * spec.final_state + key_rows * s.tokens * (pairs - nb) // nb,
        programs=s.seqs * s.H * nb * p_tiles,
        serial_steps=nb,
    )
    if not spec.final_state:
        return (main,)
    final = Launch(
        name="quadratic_state",
        matmul_flops=s.seqs * s.H * nb * _mm(s.N, s.P, bt),
        scalar_flops=s.seqs * s.H * nb * bt * s.N,
        bytes=key_rows * s.tokens + s.state * (1 + spec.initial_state),
        programs=s.seqs * s.H * _cdiv(s.N, 64) * p_tiles,
        serial_steps=nb,
    )
    return main, final


def _chunked(s: _Sizes, Q: int) -> tuple[Launch, ...]:
    """SSD as launched (DESIGN §1): cumsum of log a per chunk, chunk states S_r, state
    passing (sequential over a sequence's chunks, in place), then the scan
    Y = Y_diag + Y_off with C Bᵀ once per (query, key) group. States cross HBM 4 times."""
    spec, mask = s.spec, s.spec.mask
    nc = _cdiv(s.T, Q)
    R = s.seqs * nc
    diagonal = isinstance(mask, ir.DiagonalSemiseparable)
    decay = not isinstance(mask, ir.Causal)
    p_tiles = _cdiv(s.P, _clamp(s.P, MMA, 64))
    tiles = _cdiv(s.N, _clamp(s.N, MMA, 64)) * p_tiles
    states = R * s.H * s.N * s.P * STATE_BYTES
    cs = R * Q * s.a_row
    scores = s.H if diagonal else s.qk * p_tiles
    weights = s.H * (3 * Q * Q + 2 * Q * s.N + (4 * Q * s.N if diagonal else 0)) if decay else 0
    launches = [
        Launch(
            name="chunked_state",
            matmul_flops=R * s.H * _mm(s.N, s.P, Q),
            scalar_flops=R * s.H * Q * s.N if decay else 0,
            bytes=(s.k_row + s.x_row) * s.tokens + cs + states,
            programs=R * s.H * tiles,
        ),
        Launch(
            name="chunked_passing",
            scalar_flops=R * s.H * 2 * s.N * s.P,
            bytes=2 * states + s.state * (spec.initial_state + spec.final_state),
            programs=s.seqs * s.H * tiles,
            serial_steps=nc,
        ),
        Launch(
            name="chunked_scan",
            matmul_flops=R * (_mm(Q, Q, s.N) * scores + s.H * (_mm(Q, s.P, Q) + _mm(Q, s.P, s.N))),
            scalar_flops=R * weights,
            bytes=(s.q_row + s.k_row + s.x_row + s.y_row) * s.tokens + cs + states,
            programs=R * s.qk * p_tiles,
        ),
    ]
    if decay:
        cumsum = Launch(
            name="chunked_cumsum",
            scalar_flops=R * Q * s.a_row // STATE_BYTES,
            bytes=s.a_row * s.tokens + cs,
            programs=R,
        )
        launches.insert(0, cumsum)
    return tuple(launches)


def _toeplitz_quadratic(s: _Sizes, chunk: int) -> tuple[Launch, ...]:
    """Y_h = L_h X̄_h over the band of a window of L taps: a program per (query tile, head,
    batch row × P tile) gathers the Toeplitz block K[d, i − j] per key tile and dots it."""
    bt = quadratic_tile(s.T, chunk)
    nb = _cdiv(s.T, bt)
    pairs = _tile_pairs(nb, bt, min(_window(s) or s.T, s.T))
    p_tiles = _cdiv(s.P, _clamp(s.P, MMA, 64))
    return (
        Launch(
            name="toeplitz",
            matmul_flops=s.seqs * s.H * pairs * _mm(bt, s.P, bt),
            scalar_flops=s.seqs * s.H * pairs * bt * bt * p_tiles,
            bytes=_core_io(s) + s.x_row * s.tokens * (pairs - nb) // nb,
            programs=s.seqs * s.H * nb * p_tiles,
            serial_steps=_cdiv(pairs, nb),
        ),
    )


def _convolution(s: _Sizes) -> tuple[Launch, ...]:
    """y = irfft(rfft(X̄, n) · rfft(K, n))[:T] in torch ops, n = 2T rounded up to a power
    of two; X̄ is formed in fp32 per output head first."""
    n = _pow2(2 * s.T)
    bins = n // 2 + 1
    channels = s.seqs * s.H * s.P
    rfft = 5 * n * (n.bit_length() - 1) // 2
    real, spectrum = channels * s.T * STATE_BYTES, channels * bins * 8
    return (
        Launch(name="xbar_fp32", bytes=s.x_row * s.tokens + real, programs=channels),
        Launch(name="xbar_heads", bytes=2 * real, programs=channels),
        Launch(
            name="rfft_x", scalar_flops=channels * rfft, bytes=real + spectrum, programs=channels
        ),
        Launch(name="rfft_K", scalar_flops=s.H * rfft, bytes=s.H * (s.T * 4 + bins * 8)),
        Launch(
            name="multiply", scalar_flops=channels * bins * 6, bytes=3 * spectrum, programs=channels
        ),
        Launch(
            name="irfft",
            scalar_flops=channels * rfft,
            bytes=spectrum + real * n // s.T,
            programs=channels,
        ),
        Launch(name="copy_out", bytes=2 * real, programs=channels),
    )


def _prologue(s: _Sizes) -> tuple[Launch, ...]:
    """The roles computed into canonical core inputs (one launch per iteration space), and
    the LTI kernel K: the same launches in every form."""
    groups: dict[tuple[ir.Size, ...], list[tuple[Expr, int]]] = {}
    for expr, shape, row in _computed(s):
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
                programs=max(1, s.tokens * elements // 4096),
            )
        )
    mask = s.spec.mask
    if isinstance(mask, ir.Toeplitz) and isinstance(mask.kernel, ir.LtiKernel):
        launches += _lti_kernel(s, mask.kernel)
    return tuple(launches)


def _epilogue(s: _Sizes) -> tuple[Launch, ...]:
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
            programs=max(1, s.tokens * s.H * s.P // 4096),
        ),
    )


def _computed(s: _Sizes) -> list[tuple[Expr, tuple[ir.Size, ...], int]]:
    """Per-token core inputs the prologue computes: (expression, canonical shape, row bytes)."""
    spec, heads, out = s.spec, s.checked.heads, []
    N, P = s.checked.state_size, s.checked.head_dim
    bt: tuple[ir.Size, ...] = (ir.BATCH, ir.SEQ)

    def need(expr: Expr | None, shape: tuple[ir.Size, ...], row: int) -> None:
        bare = isinstance(expr, Ref) and spec.tensor(expr.name).shape == shape
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


def _lti_kernel(s: _Sizes, lti: ir.LtiKernel) -> tuple[Launch, ...]:
    """K_k = C Ā^k B̄ for k < T in torch ops (fp64), once per call per decay group.

    Diagonal A: a Vandermonde product. Dense A: Ā^k B̄ by doubling, log2 T rounds.
    """
    d = s.size(s.checked.heads.decay or 1)
    if not _dense_A(s.spec, lti):
        table = d * s.T * s.N * 16
        return (
            Launch(
                name="lti_vandermonde", scalar_flops=d * s.T * s.N * 8, bytes=3 * table, programs=d
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
        )
        for r in range(doublings)
    )


def _core_io(s: _Sizes) -> int:
    """The canonical inputs read once, y written once, states read and written if declared."""
    rows = s.q_row + s.k_row + s.x_row + s.a_row + s.y_row
    return s.tokens * rows + s.state * (s.spec.initial_state + s.spec.final_state)


def _sizes(checked: ir.CheckedSpec, shape: Shape) -> _Sizes:
    spec, heads = checked.spec, checked.heads
    if shape.num_seqs > 1 and not spec.varlen:
        raise PlanError(f"spec {spec.name!r} is not varlen: num_seqs must be 1")
    size = _resolver(spec, shape)
    q, k, v, d = (
        size(g) if g is not None else 1 for g in (heads.query, heads.key, heads.value, heads.decay)
    )
    H, P = size(heads.output), size(checked.head_dim)
    N = size(checked.state_size) if checked.state_size is not None else 0
    mask, dtype = spec.mask, shape.dtype_bytes
    toeplitz = isinstance(mask, ir.Toeplitz)
    decay_n = {ir.ScalarSemiseparable: 1, ir.DiagonalSemiseparable: N}.get(type(mask), 0)
    factors = checked.value_factors
    scaled = factors is not None and factors.scale is not None
    epilogue = spec.skip is not None or spec.gate is not None
    seqs = shape.batch * shape.num_seqs
    return _Sizes(
        spec=spec,
        checked=checked,
        shape=shape,
        size=size,
        T=_cdiv(shape.seqlen, shape.num_seqs),
        seqs=seqs,
        tokens=shape.batch * shape.seqlen,
        H=H,
        N=N,
        P=P,
        qk=_distinct(H, q, k),
        q_row=0 if toeplitz else q * N * dtype,
        k_row=0 if toeplitz else k * N * dtype,
        x_row=v * P * dtype + (v * STATE_BYTES if scaled else 0),
        a_row=d * decay_n * STATE_BYTES,
        y_row=H * P * (STATE_BYTES if epilogue else dtype),
        state=0 if toeplitz else seqs * H * N * P * STATE_BYTES,
    )


def _resolver(spec: ir.Spec, shape: Shape) -> SizeOf:
    """A function from a Size to its int: literal, spec-bound dim, or call-time dim."""

    def size(s: ir.Size) -> int:
        if isinstance(s, int):
            return s
        if s in (ir.BATCH, ir.SEQ):
            return shape.batch if s == ir.BATCH else shape.seqlen
        bound = next((d.value for d in spec.dims if d.name == s), None)
        given = shape.dims.get(s)
        if bound is not None and given is not None and given != bound:
            raise PlanError(f"dim {s} = {bound} in the spec, but the call shape says {given}")
        value = bound if bound is not None else given
        if value is None:
            raise PlanError(f"dim {s} is bound at call time: pass it in Shape.dims")
        return value

    return size


def _raw_row(s: _Sizes, names: set[str]) -> int:
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


def _window(s: _Sizes) -> int | None:
    """L, the taps of a learned Toeplitz kernel (the last axis of its parameter)."""
    mask = s.spec.mask
    if not isinstance(mask, ir.Toeplitz) or not isinstance(mask.kernel, ir.LearnedKernel):
        return None
    read = refs(mask.kernel.kernel)
    taps = [
        s.size(t.shape[-1])
        for t in s.spec.tensors
        if t.name in read and t.kind is ir.TensorKind.PARAM and t.shape
    ]
    return max(taps, default=None)


def _dense_A(spec: ir.Spec, lti: ir.LtiKernel) -> bool:
    """A HiPPO matrix or an A read from an [H, N, N] parameter: powers cost N² per step."""
    if lti.hippo is not None:
        return True
    if lti.A is None:
        return False
    return any(len(spec.tensor(n).shape) == 3 for n in refs(lti.A))


def _distinct(H: int, *groups: int) -> int:
    """How many heads differ in the given roles: head h uses group h // (H // G) of each."""
    return len({tuple(h // (H // g) for g in groups) for h in range(H)})


def quadratic_tile(T: int, chunk: int) -> int:
    """The quadratic form's query/key tile: the chunk up to 64, less when T is short (≥ 16)."""
    return min(chunk, QUADRATIC_TILE, max(MMA, _pow2(T)))


def _tile_pairs(nb: int, bt: int, window: int) -> int:
    """(query block, key block) tiles a causal mask reaching `window` − 1 back visits."""
    reach = _cdiv(window - 1, bt)
    if nb - 1 <= reach:
        return nb * (nb + 1) // 2
    return nb + reach * (reach + 1) // 2 + (nb - 1 - reach) * reach


def _mm(m: int, n: int, k: int) -> int:
    """FLOPs of an m×k by k×n tensor-core product, each dim padded to the MMA tile."""
    return 2 * _pad(m) * _pad(n) * _pad(k)


def _clamp(n: int, lo: int, hi: int) -> int:
    """The power of two ≥ n, clamped to [lo, hi]: the launchers' default tile."""
    return max(lo, min(hi, _pow2(n)))


def _pad(n: int) -> int:
    return _cdiv(n, MMA) * MMA


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
