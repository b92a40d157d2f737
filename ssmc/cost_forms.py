"""Cost of each form's core launches, as the stage templates build them (templates/*.jinja).

Per head pattern: the chunked form computes C Bᵀ once per (query, key) group and serves
its heads (MVA: once per G); the quadratic kernel recomputes it per head. Tensor-core
work is counted as issued (every matmul dim padded to 16, tiles as the launchers default
them); bytes are HBM traffic with each canonical row read once per launch that needs it
(L2 serves the heads of a group and the tiles of a head).
"""

from __future__ import annotations

import math
from dataclasses import replace
from functools import partial

from ssmc import cost_roles, ir
from ssmc.cost_terms import (
    MMA,
    STATE_BYTES,
    Launch,
    Sizes,
    cdiv,
    clamp,
    core_io,
    mm,
    pow2,
    quadratic_tile,
    resident,
    tile_pairs,
)
from ssmc.expr import refs

SMALL_RESIDENT = 16
"""Programs of a small-tile kernel (a recurrent scan, an elementwise pass) per SM."""
SUB_CHUNK = 16
"""Rows of the sub-chunks chunked_diag_intra cuts a chunk into (stability, see template)."""


RECURRENT_STEP_LOADS = 0.4
"""Load latencies a recurrent step waits for: the scan issues the loads of 16 tokens
together (unrolled blocks), so a token costs less than one round trip; measured on the H100
(docs/runs/2026-11-24-h100-autotune-mamba1-s14.json, Mamba-1): 0.23 µs a token at
1 × 16384, 0.27 at 2 × 4096, 0.33 at H = 1536 (1 × 8192), against 0.50 one token at a
time before (step_latency_s + 0.4 × load_latency_s = 0.23 µs)."""


def recurrent(s: Sizes) -> tuple[Launch, ...]:
    """h_t = a_t ⊙ h_{t-1} + B_t ⊗ X̄_t, y_t = C_tᵀ h_t: one program per (sequence, head,
    P tile) walks its tokens with the N × BLOCK_P state in registers, in unrolled blocks of
    16 tokens whose loads are issued together (RECURRENT_STEP_LOADS)."""
    mask = s.spec.mask
    update = 2 if isinstance(mask, ir.Causal) else 3
    exps = s.N if isinstance(mask, ir.DiagonalSemiseparable) else 1
    block_p = min(pow2(s.P), max(1, 1024 // pow2(s.N)))
    return (
        Launch(
            name="recurrent",
            scalar_flops=s.tokens * s.H * ((update + 2) * s.N * s.P + 2 * exps),
            bytes=core_io(s),
            programs=s.seqs * s.H * cdiv(s.P, block_p),
            serial_steps=s.T,
            step_loads=RECURRENT_STEP_LOADS,
            # a large state a program (N · BLOCK_P = 1024 in one warp) makes each step's
            # update and y sum a long chain: Mamba-2, N = 128, 0.81 µs a token measured on the
            # H100 at 1 × 2048 in the fourteenth session (1.2 with two warps); Mamba-1's
            # 16 × 1 state: 0.23
            step_round_trips=1 if pow2(s.N) * block_p >= 1024 else 0,
            resident=SMALL_RESIDENT,
        ),
    )


def quadratic(s: Sizes, chunk: int) -> tuple[Launch, ...]:
    """Y = (L ∘ C Bᵀ) X̄: a program per (query tile, head, P tile) walks the key tiles back
    from the diagonal (suffix sums of log a, no cumsum pass); C Bᵀ per head and P tile.
    A returned final state is one more launch that walks each sequence's key tiles.
    Each key-tile step waits for its tile loads and dots (a round trip)."""
    spec = s.spec
    bt = quadratic_tile(s.T, chunk)
    nb = cdiv(s.T, bt)
    pairs = tile_pairs(nb, bt, s.T)
    p_tiles = cdiv(s.P, clamp(s.P, MMA, 64))
    per_head = pairs * (mm(bt, bt, s.N) * p_tiles + mm(bt, s.P, bt))
    if spec.initial_state:
        per_head += nb * mm(bt, s.P, s.N)
    decay = not isinstance(spec.mask, ir.Causal)
    key_rows = s.k_row + s.x_row + s.a_row
    main = Launch(
        name="quadratic",
        matmul_flops=s.seqs * s.H * per_head,
        scalar_flops=s.seqs * s.H * pairs * bt * bt * 3 * p_tiles if decay else 0,
        bytes=core_io(s) - s.state * spec.final_state + key_rows * s.tokens * (pairs - nb) // nb,
        programs=s.seqs * s.H * nb * p_tiles,
        serial_steps=nb,
        step_round_trips=1,
        phases=2,
    )
    if not spec.final_state:
        return (main,)
    final = Launch(
        name="quadratic_state",
        matmul_flops=s.seqs * s.H * nb * mm(s.N, s.P, bt),
        scalar_flops=s.seqs * s.H * nb * bt * s.N,
        bytes=key_rows * s.tokens + s.state * (1 + spec.initial_state),
        programs=s.seqs * s.H * cdiv(s.N, 64) * p_tiles,
        serial_steps=nb,
        step_round_trips=1,
    )
    return main, final


def chunked(s: Sizes, Q: int) -> tuple[Launch, ...]:
    """SSD for a scalar decay or none (templates/chunked.py.jinja), three launches:
    chunked_state walks each sequence with H in registers and stores the state entering
    each chunk (16-bit when C is); chunked_scan_cb stores C Bᵀ once per (query, key)
    group; chunked_scan writes y = Y_diag + Y_off per (chunk, head, row block, P tile),
    the in-chunk cumsum recomputed, each earlier block a step waiting for its C Bᵀ and x
    tiles (≤ 3 steps: too few for the pipeliner to hide). The states cross HBM twice."""
    spec = s.spec
    decay = not isinstance(spec.mask, ir.Causal)
    R = s.seqs * cdiv(s.T, Q)
    held = _held_bytes(s)
    bn, bp = clamp(s.N, MMA, 64), clamp(s.P, MMA, 64)
    n_tiles, p_tiles = cdiv(s.N, bn), cdiv(s.P, bp)
    walkers = s.seqs * s.H * n_tiles * p_tiles
    # chunked_state_fwd: 64-token steps when there are several waves of walkers, else 128.
    bt = min(Q, 64 if walkers >= 512 else 128)
    steps = cdiv(s.T, bt)
    states = R * s.H * s.N * s.P * held
    ends = s.state * (spec.initial_state + spec.final_state)
    walk = Launch(
        name="chunked_state",
        matmul_flops=walkers * steps * mm(bn, bp, bt),
        scalar_flops=s.seqs * s.H * steps * (s.N * s.P + (3 * bt if decay else bt)),
        bytes=(s.k_row + s.x_row + s.a_row) * s.tokens + states + ends,
        programs=walkers,
        serial_steps=steps,
        step_round_trips=1,
        segment_steps=8 * cdiv(Q, bt),  # segments of ≥ 8 chunks
    )
    bm = min(Q, 64)
    nm = Q // bm
    lower = nm * (nm + 1) // 2
    cb_bytes = R * s.qk * Q * Q * held
    cb = Launch(
        name="chunked_scan_cb",
        matmul_flops=R * s.qk * lower * mm(bm, bm, s.N),
        bytes=(s.q_row + s.k_row) * s.tokens + cb_bytes,
        programs=R * s.qk * nm * nm,
    )
    rows = R * s.H * p_tiles * nm
    scan = Launch(
        name="chunked_scan",
        matmul_flops=R * s.H * p_tiles * (lower * mm(bm, bp, bm) + nm * mm(bm, bp, s.N)),
        scalar_flops=rows * (3 * bm * bm + 2 * bm * bp if decay else bm * bm),
        bytes=(s.q_row + s.x_row + s.a_row + s.y_row) * s.tokens + cb_bytes + states,
        programs=rows,
        serial_steps=nm - 1,
        step_round_trips=1,
        phases=4,
    )
    return walk, cb, scan


def chunked_diagonal(s: Sizes, Q: int) -> tuple[Launch, ...]:
    """The chunked form for a diagonal decay (templates/chunked_diag.py.jinja), five
    launches: cs per chunk (fp32); the state walk along each sequence with H in registers,
    storing the state entering each chunk (16-bit when C is), one dot per chunk; the
    masked block A = Σ_n C B exp(cs_i − cs_j) once per A-group, a program per chunk with
    one [Q, N] × [N, Q] dot through the chunk's midpoint; the sub-chunk launch, which
    finds every chunk written (it writes those whose decay is too strong for one
    reference, which the model does not foresee: inputs decide it); y = A X̄ +
    (C ⊙ exp(cs)) H_r per (chunk, head, row block, P tile).

    The A and scan programs are many and small (Mamba-1: tokens × H / 16 and / 64), so
    their time is waves × one program's chain: the n tiles of an A program and the
    column blocks of a scan row block, each step waiting for its loads and dot. How many
    fit an SM follows from the tiles the launchers default (`resident`)."""
    spec = s.spec
    R = s.seqs * cdiv(s.T, Q)
    q, k, _, d = s.groups
    ga = math.lcm(q, k, d)
    bn, bp = clamp(s.N, MMA, 64), clamp(s.P, MMA, 128)
    n_tiles, p_tiles = cdiv(s.N, bn), cdiv(s.P, bp)
    cs = R * Q * s.a_row
    states = R * s.H * s.N * s.P * _held_bytes(s)
    ends = s.state * (spec.initial_state + spec.final_state)
    ns = max(1, Q // SUB_CHUNK)
    # A in x's dtype when 16-bit (the scan's dot rounds it to that)
    blocks = R * ga * Q * Q * min(s.shape.dtype_bytes, STATE_BYTES)
    bm = min(Q, 64)
    nm = Q // bm
    chunks = cdiv(s.T, Q)
    walkers = s.seqs * s.H * n_tiles * p_tiles
    # chunked_diag_intra_fwd: the whole-chunk launch (WHOLE_BLOCKS: n tiles of 32, 2 warps),
    # then the sub-chunk launch (intra_blocks: n tiles of up to 16 with 1 warp for 16-bit A,
    # 32 with 2 for fp32 A) for the chunks whose spread is past WHOLE_SPREAD = 60
    bn_whole = clamp(s.N, MMA, 32)
    a16 = s.shape.dtype_bytes < STATE_BYTES
    bn_intra = clamp(s.N, MMA, 16 if a16 else 32)
    # the decay's expression is evaluated in the cumsum (chunked_diag_decay): its inputs
    # are read there instead of log a
    decay = cost_roles.decay_expression(s)
    a_read, a_ops = (s.a_row, 0) if decay is None else cost_roles.decay_read(s, decay)
    whole_values = Q * Q + 5 * Q * bn_whole
    intra_values = 3 * Q * bn_intra + 4 * SUB_CHUNK * bn_intra + SUB_CHUNK * Q
    # Which chunks the whole-chunk launch takes depends on the inputs. A chunk of Q = 64
    # passes a spread of 60 only where log a averages below −0.94; at Q = 128, below −0.47,
    # and the benchmarks' log a in [−1, −0.01] does (GLA at 8 × 2048 on the H100: chunk 64
    # 0.574 ms, docs/gpu-runs.md, seventeenth session). So Q ≤ 64 is costed as whole chunks
    # and longer chunks as sub-chunks.
    intra_bytes = (s.q_row + s.k_row) * s.tokens + cs + blocks
    whole = Launch(
        name="chunked_diag_intra",
        matmul_flops=R * ga * mm(Q, Q, s.N),
        scalar_flops=R * ga * Q * s.N * 6,
        bytes=intra_bytes,
        programs=R * ga,
        # tiles table → spread → the n tiles' loads and dot → store
        phases=3,
        serial_steps=cdiv(s.N, bn_whole),
        step_round_trips=1,
        resident=resident(2, whole_values),
    )
    if Q <= 64:
        intra = (
            whole,
            # the sub-chunk launch: each program reads its chunk's flag and ends
            Launch(
                name="chunked_diag_intra_rest",
                bytes=R * ga * ns * 8,
                programs=R * ga * ns,
                phases=1,
                resident=SMALL_RESIDENT,
            ),
        )
    else:
        intra = (
            # the whole-chunk launch finds every spread too large: it writes the flags only
            replace(whole, matmul_flops=0, scalar_flops=0, bytes=R * ga * 8, phases=2),
            Launch(
                name="chunked_diag_intra_rest",
                matmul_flops=R * ga * ns * (mm(SUB_CHUNK, Q, s.N) + mm(SUB_CHUNK, SUB_CHUNK, s.N)),
                scalar_flops=R * ga * ns * s.N * (Q + 2 * SUB_CHUNK) * 3,
                bytes=intra_bytes,
                programs=R * ga * ns,
                # tiles table → reference row and spread test → earlier-keys dots → own
                # sub-chunk → store: Mamba-1 at H = 1536 measured 1.47 ms for this launch on
                # the H100 (docs/gpu-runs.md, eighth session), 1.01 estimated with 2 phases
                phases=4,
                serial_steps=cdiv(s.N, bn_intra),
                step_round_trips=1,
                resident=resident(1 if a16 else 2, intra_values),
            ),
        )
    scan_values = bm * (2 * bp + bm + 2 * bn) + bn * bp
    state_values = Q * (3 * bn + bp) + bn * bp
    # Where N ≤ 32 and the decay is an expression the module runs the cumsum inside the intra
    # launch (chunked_diag_decay_intra, FUSE_DECAY_INTRA): measured only for Mamba-1 at
    # 2 × 2048, H = 1536 (1.22 ms against 1.22 + 0.17), so it is still costed as the
    # launches it replaces — slightly pessimistic for the chunked form there.
    return (
        Launch(
            name="chunked_diag_cumsum",
            scalar_flops=R * Q * d * s.N * (1 + a_ops),
            bytes=a_read * s.tokens + cs,
            programs=R * d * n_tiles,
            resident=SMALL_RESIDENT // 2,
        ),
        Launch(
            name="chunked_diag_state",
            matmul_flops=walkers * chunks * mm(bn, bp, Q),
            scalar_flops=s.seqs * s.H * p_tiles * chunks * (3 * Q * s.N + 2 * s.N * bp),
            bytes=(s.k_row + s.x_row) * s.tokens + cs + states + ends,
            programs=walkers,
            serial_steps=chunks,
            step_round_trips=1,
            resident=resident(4, state_values),
            segment_steps=8,  # segments of ≥ 8 chunks
        ),
        *intra,
        Launch(
            name="chunked_diag_scan",
            matmul_flops=R
            * s.H
            * p_tiles
            * (nm * (nm + 1) // 2 * mm(bm, bp, bm) + nm * mm(bm, bp, s.N)),
            scalar_flops=R * s.H * p_tiles * (2 * Q * s.N + Q * Q // 2),
            bytes=(s.q_row + s.x_row + s.y_row) * s.tokens + cs + blocks + states,
            programs=R * s.H * p_tiles * nm,
            phases=2,
            serial_steps=cdiv(s.N, bn) + nm // 2,
            step_round_trips=1,
            resident=resident(4, scan_values),
        ),
    )


def toeplitz_quadratic(s: Sizes, chunk: int) -> tuple[Launch, ...]:
    """Y_h = L_h X̄_h over the band of a window of L taps: a program per (query tile, head,
    batch row × P tile) gathers the Toeplitz block K[d, i − j] per key tile and dots it."""
    bt = quadratic_tile(s.T, chunk)
    nb = cdiv(s.T, bt)
    pairs = tile_pairs(nb, bt, min(_window(s) or s.T, s.T))
    p_tiles = cdiv(s.P, clamp(s.P, MMA, 64))
    return (
        Launch(
            name="toeplitz",
            matmul_flops=s.seqs * s.H * pairs * mm(bt, s.P, bt),
            scalar_flops=s.seqs * s.H * pairs * bt * bt * p_tiles,
            bytes=core_io(s) + s.x_row * s.tokens * (pairs - nb) // nb,
            programs=s.seqs * s.H * nb * p_tiles,
            serial_steps=cdiv(pairs, nb),
            phases=2,
        ),
    )


def convolution(s: Sizes) -> tuple[Launch, ...]:
    """y = irfft(rfft(X̄, n) · rfft(K, n))[:T] in torch ops, n = 2T rounded up to a power
    of two; X̄ is formed in fp32 per output head first."""
    n = pow2(2 * s.T)
    bins = n // 2 + 1
    channels = s.seqs * s.H * s.P
    rfft = 5 * n * (n.bit_length() - 1) // 2
    real, spectrum = channels * s.T * STATE_BYTES, channels * bins * 8
    torch_op = partial(Launch, resident=SMALL_RESIDENT, triton=False)
    return (
        torch_op(name="xbar_fp32", bytes=s.x_row * s.tokens + real, programs=channels),
        torch_op(name="xbar_heads", bytes=2 * real, programs=channels),
        torch_op(
            name="rfft_x", scalar_flops=channels * rfft, bytes=real + spectrum, programs=channels
        ),
        torch_op(name="rfft_K", scalar_flops=s.H * rfft, bytes=s.H * (s.T * 4 + bins * 8)),
        torch_op(
            name="multiply", scalar_flops=channels * bins * 6, bytes=3 * spectrum, programs=channels
        ),
        torch_op(
            name="irfft",
            scalar_flops=channels * rfft,
            bytes=spectrum + real * n // s.T,
            programs=channels,
        ),
        torch_op(name="copy_out", bytes=2 * real, programs=channels),
    )


def chunk_states_bytes(s: Sizes, Q: int) -> int:
    """Memory the chunked form holds for the state entering every chunk."""
    held = STATE_BYTES if isinstance(s.spec.mask, ir.DiagonalSemiseparable) else _held_bytes(s)
    return s.seqs * cdiv(s.T, Q) * s.H * s.N * s.P * held


def _held_bytes(s: Sizes) -> int:
    """Bytes of a stored chunk state or C Bᵀ element: the inputs' dtype when 16-bit."""
    return s.shape.dtype_bytes if s.shape.dtype_bytes == 2 else STATE_BYTES


def _window(s: Sizes) -> int | None:
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
