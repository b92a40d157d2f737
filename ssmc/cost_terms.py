"""The terms the cost model counts in: a call shape, the spec resolved at it, one launch.

`Shape` is what the planner is asked about; `Sizes` is one spec at one shape with every
dim resolved and the canonical core rows (DESIGN §3) in bytes per token; `Launch` is one
kernel launch's work, traffic and parallelism. The tile arithmetic the launchers use
(matmul dims padded to the MMA tile, default tiles clamped to powers of two) is here so
that every form's model (ssmc.cost_forms) counts work as the kernels issue it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ssmc import ir
from ssmc.errors import SsmcError

STATE_BYTES = 4
"""States, cumulative sums, log a and s are fp32."""
MMA = 16
"""Smallest tensor-core tile edge: matmul dims are padded to a multiple of it."""
QUADRATIC_TILE = 64
"""Largest query/key tile of the quadratic kernels (a BLOCK_I × BLOCK_J fp32 score tile)."""
REGISTERS_PER_SM = 65536
WARPS_PER_SM = 64
BLOCKS_PER_SM = 32
"""The SM's register file, warp slots and block slots (sm_80 and sm_90 alike)."""
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
    step_round_trips: int = 0
    """Memory round trips each serial step waits for (0: a prefetched scalar step; 1: a
    step whose tile loads and dot the next step depends on, as in the chunked state walk)."""
    step_loads: float = 0
    """Small global loads each serial step waits for because nothing prefetches them
    (`Device.load_latency_s` each; a fraction where a block of steps issues its loads
    together, as the recurrent scan does: cost_forms.RECURRENT_STEP_LOADS)."""
    phases: int = 1
    """Dependent load → compute → store phases of one program: its latency when short."""
    triton: bool = True
    """A generated Triton launch (`Device.host_launch_s` to issue); False for an eager torch
    op (`Device.host_op_s`)."""
    resident: int = 2
    """Programs resident on one SM at a time: 2 for a tile kernel of 4 warps and ~200
    registers a thread, more for small elementwise or scan programs."""
    segment_steps: int = 0
    """A walk that the launcher cuts into segments of at least this many serial steps where
    its programs are at most half the SMs (the chunked forms' `walk_splits`: ⌊SMs / programs⌋
    segments, at most 8, walked in parallel); 0: never cut."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Sizes:
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
    groups: tuple[int, int, int, int]
    """Head counts of the query, key, value and decay roles (1 where a role is absent)."""
    qk: int
    """Distinct (query, key) group pairs: the C Bᵀ blocks one chunk needs."""
    q_row: int
    k_row: int
    x_row: int
    a_row: int
    y_row: int
    state: int
    """Bytes of every sequence's and head's fp32 state: seqs·H·N·P·4."""


def sizes(checked: ir.CheckedSpec, shape: Shape) -> Sizes:
    """Resolve `checked` at `shape` (PlanError for an unbound dim or a bad varlen shape)."""
    spec, heads = checked.spec, checked.heads
    if shape.num_seqs > 1 and not spec.varlen:
        raise PlanError(f"spec {spec.name!r} is not varlen: num_seqs must be 1")
    size = resolver(spec, shape)
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
    return Sizes(
        spec=spec,
        checked=checked,
        shape=shape,
        size=size,
        T=cdiv(shape.seqlen, shape.num_seqs),
        seqs=seqs,
        tokens=shape.batch * shape.seqlen,
        H=H,
        N=N,
        P=P,
        groups=(q, k, v, d),
        qk=_distinct(H, q, k),
        q_row=0 if toeplitz else q * N * dtype,
        k_row=0 if toeplitz else k * N * dtype,
        x_row=v * P * dtype + (v * STATE_BYTES if scaled else 0),
        a_row=d * decay_n * STATE_BYTES,
        y_row=H * P * (STATE_BYTES if epilogue else dtype),
        state=0 if toeplitz else seqs * H * N * P * STATE_BYTES,
    )


def resolver(spec: ir.Spec, shape: Shape) -> SizeOf:
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


def resident(warps: int, elements: int) -> int:
    """Programs of `warps` warps that fit one SM at a time when each holds `elements` fp32
    tile values live: bounded by the register file (a value a register, plus 32 for
    addresses and indices), the warp slots and the block slots (alike on H100, H200, A100)."""
    threads = 32 * warps
    registers = 32 + cdiv(elements, threads)
    return max(
        1, min(BLOCKS_PER_SM, WARPS_PER_SM // warps, REGISTERS_PER_SM // (threads * registers))
    )


def core_io(s: Sizes) -> int:
    """The canonical inputs read once, y written once, states read and written if declared."""
    rows = s.q_row + s.k_row + s.x_row + s.a_row + s.y_row
    return s.tokens * rows + s.state * (s.spec.initial_state + s.spec.final_state)


def _distinct(H: int, *groups: int) -> int:
    """How many heads differ in the given roles: head h uses group h // (H // G) of each.

    Head h starts a new tuple where h is a multiple of some step H // G: those h in [0, H),
    counted by inclusion–exclusion over the steps (O(2^roles), not O(H): H may be 2^24).
    """
    steps = sorted({max(H // g, 1) for g in groups})
    total = 0
    for subset in range(1, 1 << len(steps)):
        chosen = [step for i, step in enumerate(steps) if subset >> i & 1]
        total += (1 if len(chosen) % 2 else -1) * -(-H // math.lcm(*chosen))
    return total if steps else min(H, 1)


def lcm_groups(s: Sizes, *roles: int) -> int:
    """Distinct heads in the roles at `roles` (indices into s.groups: 0 q, 1 k, 2 v, 3 d)."""
    return math.lcm(*(s.groups[r] for r in roles))


def quadratic_tile(T: int, chunk: int) -> int:
    """The quadratic form's query/key tile: the chunk up to 64, less when T is short (≥ 16)."""
    return min(chunk, QUADRATIC_TILE, max(MMA, pow2(T)))


def tile_pairs(nb: int, bt: int, window: int) -> int:
    """(query block, key block) tiles a causal mask reaching `window` − 1 back visits."""
    reach = cdiv(window - 1, bt)
    if nb - 1 <= reach:
        return nb * (nb + 1) // 2
    return nb + reach * (reach + 1) // 2 + (nb - 1 - reach) * reach


def mm(m: int, n: int, k: int) -> int:
    """FLOPs of an m×k by k×n tensor-core product, each dim padded to the MMA tile."""
    return 2 * pad(m) * pad(n) * pad(k)


def clamp(n: int, lo: int, hi: int) -> int:
    """The power of two ≥ n, clamped to [lo, hi]: the launchers' default tile."""
    return max(lo, min(hi, pow2(n)))


def pad(n: int) -> int:
    """`n` rounded up to the MMA tile."""
    return cdiv(n, MMA) * MMA


def pow2(n: int) -> int:
    """The smallest power of two ≥ n (1 for n ≤ 1)."""
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ for positive b."""
    return -(-a // b)
