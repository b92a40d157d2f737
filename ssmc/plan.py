"""plan: (checked spec, call shape, device) → the form, chunk and tiles to render, and why.

The form is the allowed one the cost model (`ssmc.cost`) estimates fastest on the
device; chunk size and tiles are heuristics until the autotuner's cached entry
(`tuned`) overrides them (DESIGN §4).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from ssmc import devices, ir
from ssmc.cost import Cost, PlanError, Shape, cost
from ssmc.devices import Device

DEFAULT_CHUNK = 64
CHUNK_RANGE = (16, 256)
TUNABLE = ("chunk_size", "block_t", "block_n", "block_p", "num_warps", "num_stages")
"""Keys an autotuner entry may set; anything else in `tuned` is an error."""
PREFERENCE = (ir.Form.RECURRENT, ir.Form.QUADRATIC, ir.Form.CHUNKED, ir.Form.CONVOLUTION)
"""Tie-break between equal estimates: the simpler form first."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Timing:
    """A cost against a device: compute, memory and the serial chain overlap; launches add."""

    compute_s: float
    memory_s: float
    chain_s: float
    launch_s: float

    @property
    def total_s(self) -> float:
        """max(compute, memory, chain) + launches: the estimated wall time of the call."""
        return max(self.compute_s, self.memory_s, self.chain_s) + self.launch_s

    @property
    def bound(self) -> str:
        """What dominates: "compute", "memory", "latency" (a serial chain) or "launch"."""
        sides = {
            "compute": self.compute_s,
            "memory": self.memory_s,
            "latency": self.chain_s,
            "launch": self.launch_s,
        }
        return max(sides, key=lambda k: sides[k])


def timing(cost: Cost, device: Device) -> Timing:
    """Estimate one call; compute slows down when fewer programs than SMs are launched."""
    occupancy = min(1.0, cost.programs / device.sm_count)
    compute = cost.matmul_flops / device.matmul_flops + cost.scalar_flops / device.fp32_flops
    return Timing(
        compute_s=compute / occupancy,
        memory_s=cost.bytes / device.mem_bandwidth,
        chain_s=cost.serial_steps * device.step_latency_s,
        launch_s=cost.kernels * device.launch_overhead_s,
    )


class Estimate(NamedTuple):
    """One allowed form's cost and estimated seconds for the planned call."""

    form: ir.Form
    cost: Cost
    time_s: float


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
    """Pick the form (forced, decode → recurrent, else cheapest allowed) and its tiles.

    `chunk_size` (forced) beats `tuned["chunk_size"]` (the autotuner's cache) beats 64;
    `tuned` also overrides the tile heuristics.
    """
    dev = devices.device(device) if isinstance(device, str) else device
    tuned = _check_tuned(tuned or {})
    chunk = _check_chunk(chunk_size if chunk_size is not None else tuned.get("chunk_size"))
    forced = _check_form(checked, form)
    estimates = tuple(
        Estimate(f, c, timing(c, dev).total_s)
        for f in checked.forms
        for c in (cost(checked, f, shape, chunk_size=chunk),)
    )
    best = min(estimates, key=lambda e: (e.time_s, PREFERENCE.index(e.form)))
    decode = _tokens_per_seq(shape) == 1 and ir.Form.RECURRENT in checked.forms
    if forced is not None:
        chosen = next(e for e in estimates if e.form is forced)
        reason = _forced_reason(chosen, best, dev)
    elif decode:
        chosen = next(e for e in estimates if e.form is ir.Form.RECURRENT)
        reason = (
            "decode (one token per sequence): one recurrent step reads and writes the state "
            f"once, est. {_fmt_time(chosen.time_s)} on {dev.name}."
        )
    else:
        chosen = best
        reason = _cheapest_reason(chosen, estimates, shape, dev)
    tiles = _tiles(checked, chosen.form, chunk, shape, dev) | {
        k: v for k, v in tuned.items() if k != "chunk_size"
    }
    _check_block_t(chosen.form, tiles["block_t"], chunk)
    return Plan(
        form=chosen.form,
        chunk_size=chunk,
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
        f"({seqs}), {shape.dtype_bytes}-byte inputs, chunk {p.chunk_size}",
    ]
    if dev.note:
        lines.append(f"note: {dev.note}")
    header = ("form", "matmul FLOP", "scalar FLOP", "bytes", "state", "launches", "time", "bound")
    rows = [header]
    for e in p.estimates:
        t = timing(e.cost, dev)
        rows.append(
            (
                ("→ " if e.form is p.form else "  ") + e.form.value,
                _si(e.cost.matmul_flops),
                _si(e.cost.scalar_flops),
                _si(e.cost.bytes, "B"),
                _si(e.cost.state_bytes, "B"),
                str(e.cost.kernels),
                _fmt_time(e.time_s),
                t.bound,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    lines.append(
        f"chose {p.form.value} (chunk {p.chunk_size}, tiles t{p.block_t} n{p.block_n} "
        f"p{p.block_p}, warps {p.num_warps}, stages {p.num_stages}): {p.reason}"
    )
    return "\n".join(lines)


def _tiles(
    checked: ir.CheckedSpec, form: ir.Form, chunk: int, shape: Shape, dev: Device
) -> dict[str, int]:
    """Heuristic tiles: powers of two, ≥ 16 wherever a tile feeds a tensor-core dot."""
    N, P = _known(checked.state_size, checked, shape), _known(checked.head_dim, checked, shape)
    top = 32 if dev.sm_count == 1 else 64
    stages = 1 if dev.sm_count == 1 else (3 if dev.name in ("H100", "H200") else 2)
    T = _tokens_per_seq(shape)
    if form is ir.Form.RECURRENT:
        return dict(
            block_t=1,
            block_n=_pow2(N),
            block_p=min(_pow2(P), 16),
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
    if isinstance(checked.spec.mask, ir.Toeplitz):
        block_t, block_n, block_p = _clamp(T, 16, chunk), 16, _clamp(shape.batch * P, 16, top)
    elif form is ir.Form.QUADRATIC:
        block_t, block_n, block_p = _clamp(T, 16, chunk), _clamp(N, 16, 2 * top), _clamp(P, 16, top)
    else:
        block_t, block_n, block_p = min(chunk, top), _clamp(N, 16, top), _clamp(P, 16, top)
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


def _check_chunk(chunk: int | None) -> int:
    """A chunk length Q: a power of two in 16..256 (64 when not given)."""
    if chunk is None:
        return DEFAULT_CHUNK
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
    """A chunked kernel tiles each chunk exactly: block_t must divide Q."""
    if form is ir.Form.CHUNKED and block_t > chunk:
        raise PlanError(f"block_t = {block_t} must divide chunk_size = {chunk}")


def _cheapest_reason(
    chosen: Estimate, estimates: tuple[Estimate, ...], shape: Shape, dev: Device
) -> str:
    others = [e for e in estimates if e.form is not chosen.form]
    bound = timing(chosen.cost, dev).bound
    text = (
        f"{chosen.form.value} is the fastest allowed form at T = {_tokens_per_seq(shape)} on "
        f"{dev.name}: est. {_fmt_time(chosen.time_s)} ({bound}-bound)"
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
