"""A cost against a device's rates: seconds per launch, summed over the call (DESIGN §4).

Each launch takes the slowest of its three sides, plus the launch overhead:
- compute: tensor-core and CUDA-core FLOPs at the device's rates, slowed in proportion
  when the launch has fewer programs than SMs;
- memory: HBM bytes at the measured copy bandwidth;
- latency: waves of programs (`Launch.resident` per SM at a time), each wave as long as
  one program's dependent chain: its phases (a memory round trip each) and its serial
  loop steps (a scan's prefetched step, or a walk step that waits for its tile loads).
The latency side is what makes many tiny programs (Mamba-1's P = 1 heads in chunks) or
a long serial walk slower than their FLOPs and bytes say.
"""

from __future__ import annotations

from dataclasses import dataclass

from ssmc.cost import Cost
from ssmc.cost_terms import cdiv
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
    total_s: float
    """Σ over launches of max(compute, memory, latency) + launch overhead."""
    bound: str
    """What most of the time goes to: "compute", "memory", "latency" or "launch"."""


def timing(cost: Cost, device: Device) -> Timing:
    """Estimate one call; a launch with fewer programs than SMs computes proportionally slower."""
    spent = dict.fromkeys(("compute", "memory", "latency", "launch"), 0.0)
    sides = dict.fromkeys(spent, 0.0)
    round_trip = ROUND_TRIP_STEPS * device.step_latency_s
    for k in cost.launches:
        occupancy = min(1.0, k.programs / device.sm_count)
        work = k.matmul_flops / device.matmul_flops + k.scalar_flops / device.fp32_flops
        waves = cdiv(k.programs, device.sm_count * k.resident)
        step = device.step_latency_s + k.step_round_trips * round_trip
        side = {
            "compute": work / occupancy,
            "memory": k.bytes / device.mem_bandwidth,
            "latency": waves * (k.phases * round_trip + k.serial_steps * step),
        }
        slowest = max(side, key=lambda name: side[name])
        spent[slowest] += side[slowest]
        spent["launch"] += device.launch_overhead_s
        for name, seconds in side.items():
            sides[name] += seconds
    return Timing(
        compute_s=sides["compute"],
        memory_s=sides["memory"],
        chain_s=sides["latency"],
        launch_s=spent["launch"],
        total_s=sum(spent.values()),
        bound=max(spent, key=lambda name: spent[name]),
    )
