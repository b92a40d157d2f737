"""plan: (checked spec, call shape, device) → the form, chunk and tiles to render, and why.

The form is the allowed one the cost model (`ssmc.cost`, timed by `ssmc.cost_time`)
estimates fastest on the device, and the chunk the cheapest of a few. The op asks the
autotune cache first (`ssmc.autotune_cache`: the form, chunk and launch options measured
on this GPU for the shape's bucket) and the planner only on a miss (docs/autotune.md).
The tiles here are heuristics that `ssmc explain` shows; `tuned` overrides them.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from ssmc import devices, ir
from ssmc.cost import Cost, PlanError, Shape, cost, quadratic_tile
from ssmc.cost_time import timing
from ssmc.devices import Device

_log = logging.getLogger(__name__)
CHUNK_CANDIDATES = (64, 128, 256)
"""Chunk lengths Q the planner costs for the chunked form when none is forced or tuned."""
CHUNK_RANGE = (16, 256)
TUNABLE = ("chunk_size", "block_t", "block_n", "block_p", "num_warps", "num_stages")
"""Keys an autotuner entry may set; anything else in `tuned` is an error."""
PREFERENCE = (ir.Form.RECURRENT, ir.Form.QUADRATIC, ir.Form.CHUNKED, ir.Form.CONVOLUTION)
"""Tie-break between equal estimates: the simpler form first."""


class Estimate(NamedTuple):
    """One allowed form's cost and estimated seconds, at the chunk size it was costed with."""

    form: ir.Form
    cost: Cost
    time_s: float
    chunk_size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What `render` specialises kernels for: the form, chunk Q, tiles and launch options."""

    form: ir.Form
    chunk_size: int
    block_t: int
    block_n: int
    block_p: int
    num_warps: int
    num_stages: int
    device: str
    reason: str
    estimates: tuple[Estimate, ...]

    def estimate(self, form: ir.Form) -> Estimate:
        """The estimate for `form` (KeyError if the structure does not allow it)."""
        for e in self.estimates:
            if e.form is form:
                return e
        raise KeyError(form)


def plan(
    checked: ir.CheckedSpec,
    shape: Shape,
    *,
    device: Device | str = "H100",
    form: ir.Form | str | None = None,
    chunk_size: int | None = None,
    tuned: Mapping[str, int] | None = None,
) -> Plan:
    """Pick the form (forced, decode → recurrent, else cheapest allowed), its chunk and tiles.

    The chunk is `chunk_size` (forced), else `tuned["chunk_size"]` (the autotuner's cache),
    else the cheapest of 64, 128, 256 for the chunked form (64 for the others); `tuned`
    also overrides the tile heuristics.
    """
    dev = devices.device(device) if isinstance(device, str) else device
    tuned = _check_tuned(tuned or {})
    given = chunk_size if chunk_size is not None else tuned.get("chunk_size")
    chunks = (_check_chunk(given),) if given is not None else CHUNK_CANDIDATES
    forced = _check_form(checked, form)
    estimates = tuple(_estimate(checked, f, shape, chunks, dev) for f in checked.forms)
    best = min(estimates, key=lambda e: (e.time_s, PREFERENCE.index(e.form)))
    if forced is not None:
        chosen = next(e for e in estimates if e.form is forced)
        reason = _forced_reason(chosen, best, dev)
    elif _tokens_per_seq(shape) == 1 and ir.Form.RECURRENT in checked.forms:
        chosen = next(e for e in estimates if e.form is ir.Form.RECURRENT)
        reason = (
            "decode (one token per sequence): one recurrent step reads and writes the state "
            f"once, est. {_fmt_time(chosen.time_s)} on {dev.name}."
        )
    else:
        chosen = best
        reason = _cheapest_reason(chosen, estimates, shape, dev)
    tiles = _tiles(checked, chosen.form, chosen.chunk_size, shape, dev) | {
        k: v for k, v in tuned.items() if k != "chunk_size"
    }
    _check_block_t(chosen.form, tiles["block_t"], chosen.chunk_size)
    _log.debug("plan %s, batch %d × T %d: %s, chunk %d; %s", checked.spec.name, shape.batch,
              shape.seqlen, chosen.form.value, chosen.chunk_size, reason)
    return Plan(
        form=chosen.form,
        chunk_size=chosen.chunk_size,
        device=dev.name,
        reason=reason,
        estimates=estimates,
        **tiles,
    )


def explain(
    checked: ir.CheckedSpec,
    shape: Shape,
    device: Device | str = "H100",
    *,
    form: ir.Form | str | None = None,
    chunk_size: int | None = None,
) -> str:
    """A one-screen table of every allowed form's cost and time, then the choice and why."""
    dev = devices.device(device) if isinstance(device, str) else device
    p = plan(checked, shape, device=dev, form=form, chunk_size=chunk_size)
    seqs = f"{shape.num_seqs} packed sequences" if shape.num_seqs > 1 else "1 sequence each"
    lines = [
        f"{checked.spec.name} on {dev.name}: batch {shape.batch} × seqlen {shape.seqlen} "
        f"({seqs}), {shape.dtype_bytes}-byte inputs",
    ]
    if dev.note:
        lines.append(f"note: {dev.note}")
    header = ("form", "matmul FLOP", "scalar FLOP", "bytes", "state", "launches", "time", "bound")
    rows = [header]
    for e in p.estimates:
        label = e.form.value + (f" Q={e.chunk_size}" if e.form is ir.Form.CHUNKED else "")
        rows.append(
            (
                ("→ " if e.form is p.form else "  ") + label,
                _si(e.cost.matmul_flops),
                _si(e.cost.scalar_flops),
                _si(e.cost.bytes, "B"),
                _si(e.cost.state_bytes, "B"),
                str(e.cost.kernels),
                _fmt_time(e.time_s),
                timing(e.cost, dev).bound,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    lines.append(
        f"chose {p.form.value}: chunk {p.chunk_size}, tiles t{p.block_t} n{p.block_n} "
        f"p{p.block_p}, {p.num_warps} warps, {p.num_stages} stages"
    )
    lines += textwrap.wrap(
        p.reason, width=96, initial_indent="  ", subsequent_indent="  ", break_on_hyphens=False
    )
    return "\n".join(lines)


def _estimate(
    checked: ir.CheckedSpec, form: ir.Form, shape: Shape, chunks: tuple[int, ...], dev: Device
) -> Estimate:
    """The form's estimate at its cheapest chunk (only the chunked form tries them all)."""
    tried = chunks if form is ir.Form.CHUNKED else chunks[:1]
    options = []
    for chunk in tried:
        c = cost(checked, form, shape, chunk_size=chunk)
        options.append(Estimate(form, c, timing(c, dev).total_s, chunk))
    return min(options, key=lambda e: e.time_s)


def _tiles(
    checked: ir.CheckedSpec, form: ir.Form, chunk: int, shape: Shape, dev: Device
) -> dict[str, int]:
    """Heuristic tiles: powers of two, ≥ 16 wherever a tile feeds a tensor-core dot."""
    N, P = _known(checked.state_size, checked, shape), _known(checked.head_dim, checked, shape)
    top = 32 if dev.sm_count == 1 else 64
    stages = 1 if dev.sm_count == 1 else (3 if dev.name in ("H100", "H200") else 2)
    T = _tokens_per_seq(shape)
    if form is ir.Form.RECURRENT:
        block_n = _pow2(N)
        return dict(
            block_t=1,
            block_n=block_n,
            block_p=min(_pow2(P), max(1, 2048 // block_n)),
            num_warps=4,
            num_stages=min(stages, 2),
        )
    if form is ir.Form.CONVOLUTION:
        return dict(
            block_t=_clamp(T, 16, 1024),
            block_n=16,
            block_p=_clamp(P, 16, top),
            num_warps=4,
            num_stages=1,
        )
    if form is ir.Form.QUADRATIC:
        block_t = min(quadratic_tile(T, chunk), top)
        block_n = 16 if isinstance(checked.spec.mask, ir.Toeplitz) else _clamp(N, 16, top)
    else:
        block_t, block_n = min(chunk, top), _clamp(N, 16, top)
    block_p = _clamp(P, 16, top)
    warps = 8 if block_t * max(block_n, block_p) >= 64 * 128 else 4
    return dict(
        block_t=block_t, block_n=block_n, block_p=block_p, num_warps=warps, num_stages=stages
    )


def _check_form(checked: ir.CheckedSpec, form: ir.Form | str | None) -> ir.Form | None:
    """The forced form, which the structure must allow."""
    if form is None:
        return None
    if isinstance(form, str):
        try:
            form = ir.Form(form.strip().lower())
        except ValueError:
            known = ", ".join(f.value for f in ir.Form)
            raise PlanError(f"unknown form {form!r}; forms are: {known}") from None
    if form not in checked.forms:
        allowed = ", ".join(f.value for f in checked.forms)
        mask = type(checked.spec.mask).__name__
        raise PlanError(
            f"form {form.value!r} is not allowed for spec {checked.spec.name!r} "
            f"({mask} mask); allowed: {allowed}"
        )
    return form


def _check_chunk(chunk: int) -> int:
    """A chunk length Q: a power of two in 16..256."""
    lo, hi = CHUNK_RANGE
    if not (_is_pow2(chunk) and lo <= chunk <= hi):
        raise PlanError(f"chunk_size must be a power of two in {lo}..{hi}, got {chunk}")
    return chunk


def _check_tuned(tuned: Mapping[str, int]) -> dict[str, int]:
    """An autotuner entry: known keys, powers of two for sizes, sane launch options."""
    unknown = sorted(set(tuned) - set(TUNABLE))
    if unknown:
        raise PlanError(f"unknown tuned keys {unknown}; tunable: {', '.join(TUNABLE)}")
    for key, value in tuned.items():
        if key == "num_stages":
            ok = 1 <= value <= 8
        elif key == "num_warps":
            ok = value in (1, 2, 4, 8, 16)
        else:
            ok = _is_pow2(value)
        if not ok:
            raise PlanError(f"tuned {key} = {value} is not a valid value")
    return dict(tuned)


def _check_block_t(form: ir.Form, block_t: int, chunk: int) -> None:
    """A chunked kernel tiles each chunk exactly: block_t must divide Q (powers of two: ≤)."""
    if form is ir.Form.CHUNKED and block_t > chunk:
        raise PlanError(f"block_t = {block_t} must divide chunk_size = {chunk}")


def _cheapest_reason(
    chosen: Estimate, estimates: tuple[Estimate, ...], shape: Shape, dev: Device
) -> str:
    others = [e for e in estimates if e.form is not chosen.form]
    bound = timing(chosen.cost, dev).bound
    q = f" with Q = {chosen.chunk_size}" if chosen.form is ir.Form.CHUNKED else ""
    text = (
        f"{chosen.form.value}{q} is the fastest allowed form at T = {_tokens_per_seq(shape)} "
        f"on {dev.name}: est. {_fmt_time(chosen.time_s)} ({bound}-bound)"
    )
    if others:
        text += " vs " + ", ".join(f"{e.form.value} {_fmt_time(e.time_s)}" for e in others)
    return text + "."


def _forced_reason(chosen: Estimate, best: Estimate, dev: Device) -> str:
    text = f"{chosen.form.value} was forced by the caller: est. {_fmt_time(chosen.time_s)}"
    if best.form is chosen.form:
        return text + f" on {dev.name}, also the cost model's choice."
    return text + (
        f"; the cost model would pick {best.form.value} ({_fmt_time(best.time_s)} on {dev.name})."
    )


def _tokens_per_seq(shape: Shape) -> int:
    return -(-shape.seqlen // shape.num_seqs)


def _known(size: ir.Size | None, checked: ir.CheckedSpec, shape: Shape) -> int:
    """A head size as an int (1 when absent: a learned Toeplitz kernel has no N)."""
    if size is None:
        return 1
    if isinstance(size, int):
        return size
    value = checked.spec.dim(size).value
    return value if value is not None else shape.dims[size]


def _clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _pow2(n)))


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _is_pow2(n: int) -> bool:
    return isinstance(n, int) and n > 0 and n & (n - 1) == 0


def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def _si(n: float, unit: str = "") -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= factor:
            return f"{n / factor:.1f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()
