"""A cost against a device's rates: seconds per launch, summed over the call (DESIGN §4).

Each launch takes the slowest of its three sides, plus the launch overhead:
- compute: tensor-core and CUDA-core FLOPs at the device's rates, slowed in proportion
  when the launch has fewer programs than SMs;
- memory: HBM bytes at the measured copy bandwidth;
- latency: waves of programs (`Launch.resident` per SM at a time), each wave as long as
  one program's dependent chain: its phases (a memory round trip each) and its serial
  loop steps (a scan's step waiting for its token's loads, or a walk step that waits for
  its tile loads and dot).
The latency side is what makes many tiny programs (Mamba-1's P = 1 heads in chunks) or
a long serial walk slower than their FLOPs and bytes say.

The launches run one after another on the GPU while the host issues them, each after
`Device.host_launch_s` of Python and launcher work: a launch starts when both the one
before it has finished and it has been issued. A call of short kernels is bound by the
host (its launch count), a call of long ones by the GPU (the host's lead is hidden).
"""

from __future__ import annotations

from dataclasses import dataclass

from ssmc.cost import Cost
from ssmc.cost_terms import Launch, cdiv
from ssmc.devices import Device

ROUND_TRIP_STEPS = 20
"""A memory round trip in units of the device's prefetched loop step (~1 µs on an H100)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Timing:
    """A cost against a device, summed over its launches (each one's sides overlap)."""

    compute_s: float
    memory_s: float
    chain_s: float
    launch_s: float
    host_s: float
    """Time the GPU waits for the host to issue the next launch."""
    total_s: float
    """Σ over launches of max(compute, memory, latency) + launch overhead, + host waits."""
    bound: str
    """What most of the time goes to: "compute", "memory", "latency", "launch" or "host"."""


def timing(cost: Cost, device: Device) -> Timing:
    """Estimate one call; a launch with fewer programs than SMs computes proportionally slower."""
    spent = dict.fromkeys(("compute", "memory", "latency", "launch", "host"), 0.0)
    sides = dict.fromkeys(("compute", "memory", "latency"), 0.0)
    round_trip = ROUND_TRIP_STEPS * device.step_latency_s
    issued = finished = 0.0
    for k in cost.launches:
        side = launch_sides(k, device, round_trip)
        slowest = max(side, key=lambda name: side[name])
        issued += device.host_launch_s if k.triton else device.host_op_s
        spent["host"] += max(0.0, issued - finished)
        finished = max(finished, issued) + side[slowest] + device.launch_overhead_s
        spent[slowest] += side[slowest]
        spent["launch"] += device.launch_overhead_s
        for name, seconds in side.items():
            sides[name] += seconds
    return Timing(
        compute_s=sides["compute"],
        memory_s=sides["memory"],
        chain_s=sides["latency"],
        launch_s=spent["launch"],
        host_s=spent["host"],
        total_s=finished,
        bound=max(spent, key=lambda name: spent[name]),
    )


def launch_sides(k: Launch, device: Device, round_trip: float) -> dict[str, float]:
    """The compute, memory and latency seconds of one launch."""
    programs, serial_steps = walk_cut(k, device)
    occupancy = min(1.0, programs / device.sm_count)
    work = k.matmul_flops / device.matmul_flops + k.scalar_flops / device.fp32_flops
    waves = cdiv(programs, device.sm_count * k.resident)
    step = (
        device.step_latency_s
        + k.step_loads * device.load_latency_s
        + k.step_round_trips * round_trip
    )
    return {
        "compute": work / occupancy,
        "memory": k.bytes / device.mem_bandwidth,
        "latency": waves * (k.phases * round_trip + serial_steps * step),
    }


def walk_cut(k: Launch, device: Device) -> tuple[int, int]:
    """(programs, serial steps) of a launch as the device runs it: a walk of few programs
    cut into segments (`Launch.segment_steps`), as the generated launcher does."""
    if not k.segment_steps or 2 * k.programs > device.sm_count:
        return k.programs, k.serial_steps
    cut = max(1, min(8, device.sm_count // k.programs, k.serial_steps // k.segment_steps))
    return k.programs * cut, cdiv(k.serial_steps, cut)
