"""Forward cost of one call in one form: tensor-core and scalar FLOPs, bytes, launches.

The planner weighs these against a device's rates (DESIGN §4). Counts are per call,
summed over sequences and heads; a factor shared by a group of heads (C Bᵀ under
MVA, a chunk state under MQA) is counted once per group, as the kernels compute it.
Tensor-core work is counted as issued: every matmul dim padded to a multiple of 16.
Bytes are the fewest a fused kernel can move: inputs read and output written once,
plus what the form cannot avoid (chunk states, re-reads of key/value blocks).
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
"""States and cumulative sums are fp32."""
MMA = 16
"""Smallest tensor-core tile edge: matmul dims are padded to a multiple of it."""
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
class Cost:
    """What one form costs for one call shape; `programs` is the narrowest launch's width."""

    matmul_flops: int
    """Tensor-core FLOPs, tiles padded as issued."""
    scalar_flops: int
    """CUDA-core FLOPs: scans, exp of decays, masks, FFTs, pointwise roles."""
    bytes: int
    """HBM bytes read and written."""
    state_bytes: int
    """fp32 state memory the form holds: the running state, or every chunk's state."""
    kernels: int
    programs: int
    """Programs of the narrowest launch: below the SM count, compute slows down."""
    serial_steps: int
    """The longest chain of dependent loop steps inside one program (T for a scan)."""

    @property
    def flops(self) -> int:
        """All forward FLOPs, tensor-core and scalar."""
        return self.matmul_flops + self.scalar_flops


@dataclass(frozen=True, slots=True, kw_only=True)
class _Sizes:
    """One spec at one call shape, its sizes resolved; T is tokens per (mean) sequence."""

    spec: ir.Spec
    shape: Shape
    size: SizeOf
    T: int
    seqs: int
    tokens: int
    H: int
    N: int
    P: int
    q: int
    k: int
    v: int
    d: int


def cost(checked: ir.CheckedSpec, form: ir.Form, shape: Shape, *, chunk_size: int = 64) -> Cost:
    """Forward cost of `checked` computed in `form` for `shape`; `chunk_size` is Q (or the tile)."""
    if form not in checked.forms:
        allowed = ", ".join(f.value for f in checked.forms)
        raise PlanError(f"form {form.value!r} is not allowed for this spec; allowed: {allowed}")
    s = _sizes(checked, shape)
    mask = checked.spec.mask
    if form is ir.Form.RECURRENT:
        return _recurrent(checked, s)
    if isinstance(mask, ir.Toeplitz):
        if form is ir.Form.QUADRATIC:
            base = _toeplitz_quadratic(s, shape.batch, chunk_size)
        else:
            base = _convolution(s)
        kernel = _lti_kernel(mask, s)
        return base if kernel is None else _then(kernel, base)
    if form is ir.Form.QUADRATIC:
        return _quadratic(checked, s, chunk_size)
    return _chunked(checked, s, chunk_size)


def _recurrent(checked: ir.CheckedSpec, s: _Sizes) -> Cost:
    """h_t = a_t ⊙ h_{t-1} + B_t ⊗ x_t, y_t = C_tᵀ h_t: one step per token, state on chip."""
    hs, ho = _distinct(s.H, s.k, s.d, s.v), _distinct(s.H, s.q, s.k, s.d, s.v)
    NP = s.N * s.P
    mask = checked.spec.mask
    update = 2 if isinstance(mask, ir.Causal) else 3
    decay_exps = s.N if isinstance(mask, ir.DiagonalSemiseparable) else 1
    scalar = s.tokens * (update * NP * hs + 2 * NP * ho + 2 * decay_exps * s.d)
    return Cost(
        matmul_flops=0,
        scalar_flops=scalar + _pointwise(s),
        bytes=_io_bytes(s),
        state_bytes=s.seqs * hs * NP * STATE_BYTES,
        kernels=1,
        programs=s.seqs * hs * _cdiv(s.P, 16),
        serial_steps=s.T,
    )


def _quadratic(checked: ir.CheckedSpec, s: _Sizes, chunk: int) -> Cost:
    """Y = (L ∘ C Bᵀ) X by query blocks; each walks key blocks back from the diagonal.

    Walking backwards accumulates cs_i − cs_j on the fly, so no cumsum pass: one launch,
    and the final state (when returned) is one more chunk-state program per head.
    """
    spec = checked.spec
    bt = _tile(s.T, chunk)
    nb = _cdiv(s.T, bt)
    pairs = _tile_pairs(nb, bt, s.T)
    qk, qkd = _distinct(s.H, s.q, s.k), _distinct(s.H, s.q, s.k, s.d)
    ho, hs = _distinct(s.H, s.q, s.k, s.d, s.v), _distinct(s.H, s.k, s.d, s.v)
    mm = pairs * (_mm(bt, bt, s.N) * qk + _mm(bt, s.P, bt) * ho)
    if spec.initial_state:
        mm += nb * _mm(bt, s.P, s.N) * ho
    if spec.final_state:
        mm += nb * _mm(s.N, s.P, bt) * hs
    has_decay = not isinstance(spec.mask, ir.Causal)
    mask_flops = pairs * bt * bt * (2 * s.d + qkd) if has_decay else 0
    rereads = _key_value_rows(s) * s.tokens * (pairs - nb) // nb
    keeps_state = spec.initial_state or spec.final_state
    return Cost(
        matmul_flops=s.seqs * mm,
        scalar_flops=s.seqs * mask_flops + _pointwise(s),
        bytes=_io_bytes(s) + rereads,
        state_bytes=s.seqs * hs * s.N * s.P * STATE_BYTES if keeps_state else 0,
        kernels=1,
        programs=s.seqs * ho * nb,
        serial_steps=nb,
    )


def _chunked(checked: ir.CheckedSpec, s: _Sizes, Q: int) -> Cost:
    """SSD in two launches: chunk states with state passing (sequential over chunks), then
    Y = Y_diag + Y_off per chunk. Chunk states are written once and read once (fp32)."""
    mask = checked.spec.mask
    nc = _cdiv(s.T, Q)
    diagonal = isinstance(mask, ir.DiagonalSemiseparable)
    has_decay = not isinstance(mask, ir.Causal)
    qk = _distinct(s.H, s.q, s.k, s.d) if diagonal else _distinct(s.H, s.q, s.k)
    qkd = _distinct(s.H, s.q, s.k, s.d)
    ho, hs = _distinct(s.H, s.q, s.k, s.d, s.v), _distinct(s.H, s.k, s.d, s.v)
    mm = _mm(Q, Q, s.N) * qk + _mm(Q, s.P, Q) * ho + _mm(s.N, s.P, Q) * hs + _mm(Q, s.P, s.N) * ho
    scalar = 2 * s.N * s.P * hs
    if has_decay:
        scalar += Q * Q * (2 * s.d + qkd) + Q * s.N * (hs + ho)
    if diagonal:
        scalar += 4 * Q * s.N * qkd
    chunk_states = s.seqs * nc * hs * s.N * s.P * STATE_BYTES
    second_pass = _key_value_rows(s) * s.tokens
    return Cost(
        matmul_flops=s.seqs * nc * mm,
        scalar_flops=s.seqs * nc * scalar + _pointwise(s),
        bytes=_io_bytes(s) + second_pass + 2 * chunk_states,
        state_bytes=chunk_states,
        kernels=2,
        programs=min(s.seqs * hs * _cdiv(s.N, 64) * _cdiv(s.P, 64), s.seqs * ho * nc),
        serial_steps=nc,
    )


def _toeplitz_quadratic(s: _Sizes, batch: int, chunk: int) -> Cost:
    """Y_h = L_h X_h with L gathered from K per tile; L is shared by the batch, so X_h is
    [T, batch·P] and a window of L taps visits only the tiles of the band."""
    bt = _tile(s.T, chunk)
    nb = _cdiv(s.T, bt)
    pairs = _tile_pairs(nb, bt, min(_window(s) or s.T, s.T))
    hv = _distinct(s.H, s.d, s.v)
    width = batch * s.P
    groups = s.seqs // batch
    rereads = _row(s, s.spec.value) * s.tokens * (pairs - nb) // nb
    return Cost(
        matmul_flops=groups * pairs * _mm(bt, width, bt) * hv,
        scalar_flops=groups * pairs * bt * bt * s.d + _pointwise(s),
        bytes=_io_bytes(s) + rereads,
        state_bytes=0,
        kernels=1,
        programs=groups * hv * nb * _cdiv(width, 64),
        serial_steps=_cdiv(pairs, nb),
    )


def _convolution(s: _Sizes) -> Cost:
    """y = irfft(rfft(x, n) · rfft(K, n))[:T] per channel, n = 2T rounded up to a power of two.

    Spectra and the product are written and read once; the n-long result is written, T read.
    """
    n = _pow2(2 * s.T)
    bins = n // 2 + 1
    channels = s.seqs * _distinct(s.H, s.d, s.v) * s.P
    rfft = 5 * n * (n.bit_length() - 1) // 2
    spectrum_bytes = channels * (4 * bins * 8 + 2 * n * STATE_BYTES + s.T * STATE_BYTES)
    return Cost(
        matmul_flops=0,
        scalar_flops=channels * (2 * rfft + 6 * bins) + s.d * rfft + _pointwise(s),
        bytes=_io_bytes(s) + spectrum_bytes + 2 * s.d * bins * 8,
        state_bytes=0,
        kernels=5,
        programs=channels,
        serial_steps=0,
    )


def _lti_kernel(mask: ir.Toeplitz, s: _Sizes) -> Cost | None:
    """K_k = C Ā^k B̄ for k < T, once per call per head (None for a learned kernel).

    Diagonal A: a Vandermonde product. Dense A: Ā^k B̄ by doubling, log2 T steps of N³.
    """
    lti = mask.kernel
    if not isinstance(lti, ir.LtiKernel):
        return None
    doublings = max(s.T - 1, 1).bit_length()
    dense = _dense_A(s.spec, lti)
    per_head = 2 * s.T * s.N * s.N + 2 * s.N**3 * doublings if dense else 4 * s.T * s.N
    return Cost(
        matmul_flops=0,
        scalar_flops=s.d * per_head,
        bytes=2 * s.d * s.T * STATE_BYTES,
        state_bytes=0,
        kernels=1,
        programs=s.d,
        serial_steps=doublings if dense else 0,
    )


def _then(a: Cost, b: Cost) -> Cost:
    """Two launch sequences run one after the other."""
    return Cost(
        matmul_flops=a.matmul_flops + b.matmul_flops,
        scalar_flops=a.scalar_flops + b.scalar_flops,
        bytes=a.bytes + b.bytes,
        state_bytes=a.state_bytes + b.state_bytes,
        kernels=a.kernels + b.kernels,
        programs=min(a.programs, b.programs),
        serial_steps=a.serial_steps + b.serial_steps,
    )


def _sizes(checked: ir.CheckedSpec, shape: Shape) -> _Sizes:
    spec, heads = checked.spec, checked.heads
    if shape.num_seqs > 1 and not spec.varlen:
        raise PlanError(f"spec {spec.name!r} is not varlen: num_seqs must be 1")
    size = _resolver(spec, shape)
    q, k, v, d = (
        size(g) if g is not None else 1 for g in (heads.query, heads.key, heads.value, heads.decay)
    )
    return _Sizes(
        spec=spec,
        shape=shape,
        size=size,
        T=_cdiv(shape.seqlen, shape.num_seqs),
        seqs=shape.batch * shape.num_seqs,
        tokens=shape.batch * shape.seqlen,
        H=size(heads.output),
        N=size(checked.state_size) if checked.state_size is not None else 0,
        P=size(checked.head_dim),
        q=q,
        k=k,
        v=v,
        d=d,
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


def _row(s: _Sizes, expr: Expr | None) -> int:
    """Bytes of one token of the per-token inputs an expression reads."""
    if expr is None:
        return 0
    inputs = (t for t in s.spec.tensors if t.kind is ir.TensorKind.INPUT and t.name in refs(expr))
    return sum(math.prod(s.size(a) for a in t.shape[2:]) for t in inputs) * s.shape.dtype_bytes


def _key_value_rows(s: _Sizes) -> int:
    """Bytes per token a second pass over keys, values and decay re-reads."""
    mask = s.spec.mask
    decay = (
        mask.log_a if isinstance(mask, ir.ScalarSemiseparable | ir.DiagonalSemiseparable) else None
    )
    return _row(s, s.spec.key) + _row(s, s.spec.value) + _row(s, decay)


def _io_bytes(s: _Sizes) -> int:
    """Inputs read once, parameters read once, output written once, states in and out."""
    params = sum(
        math.prod(s.size(a) for a in t.shape) * STATE_BYTES
        for t in s.spec.tensors
        if t.kind is ir.TensorKind.PARAM
    )
    inputs = sum(_row(s, Ref(name=t.name)) for t in s.spec.tensors)
    output = s.H * s.P * s.shape.dtype_bytes
    state = s.seqs * s.H * s.N * s.P * STATE_BYTES
    return (
        s.tokens * (inputs + output) + params + state * (s.spec.initial_state + s.spec.final_state)
    )


def _pointwise(s: _Sizes) -> int:
    """Evaluating the role expressions (scales, decay, skip, gate): the same in every form."""
    spec, mask = s.spec, s.spec.mask
    per_token = _ops(spec.query) * s.q * s.N + _ops(spec.key) * s.k * s.N
    per_token += _ops(spec.value) * s.v * s.P
    if isinstance(mask, ir.ScalarSemiseparable | ir.DiagonalSemiseparable):
        per_token += (
            _ops(mask.log_a) * s.d * (s.N if isinstance(mask, ir.DiagonalSemiseparable) else 1)
        )
    for epilogue in (spec.skip, spec.gate):
        if epilogue is not None:
            per_token += (_ops(epilogue) + 1) * s.H * s.P
    return s.tokens * per_token


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


def _tile(T: int, chunk: int) -> int:
    """The tile length along T: the chunk, or the power of two ≥ T (≥ 16) when T is short."""
    return min(chunk, max(MMA, _pow2(T)))


def _tile_pairs(nb: int, bt: int, window: int) -> int:
    """(query block, key block) tiles a causal mask reaching `window` − 1 back visits."""
    reach = _cdiv(window - 1, bt)
    if nb - 1 <= reach:
        return nb * (nb + 1) // 2
    return nb + reach * (reach + 1) // 2 + (nb - 1 - reach) * reach


def _mm(m: int, n: int, k: int) -> int:
    """FLOPs of an m×k by k×n tensor-core product, each dim padded to the MMA tile."""
    return 2 * _pad(m) * _pad(n) * _pad(k)


def _pad(n: int) -> int:
    return _cdiv(n, MMA) * MMA


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
