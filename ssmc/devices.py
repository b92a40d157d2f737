"""Device rates the planner's cost model weighs FLOPs and bytes against (DESIGN §4)."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from ssmc.errors import SsmcError


class DeviceError(SsmcError, ValueError):
    """An unknown device name was asked for."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Device:
    """Peak-ish rates of one accelerator; `note` says when the rates are borrowed."""

    name: str
    matmul_flops: float
    """bf16 dense tensor-core FLOP/s (fp32 accumulation)."""
    fp32_flops: float
    """fp32 FLOP/s on the CUDA cores (scans, exp, masks, FFTs)."""
    mem_bandwidth: float
    """HBM bytes per second (a measured copy, not the datasheet)."""
    launch_overhead_s: float
    """Seconds one kernel launch costs from Python."""
    step_latency_s: float
    """Seconds one dependent step of a sequential loop takes (prefetched loads, FMA, reduce)."""
    sm_count: int
    """Streaming multiprocessors: below this many programs a kernel leaves the GPU idle."""
    note: str = ""


DEVICES: dict[str, Device] = {
    d.name: d
    for d in (
        Device(
            name="H100",
            matmul_flops=798e12,
            fp32_flops=67e12,
            mem_bandwidth=3.0e12,
            launch_overhead_s=4e-6,
            step_latency_s=5e-8,
            sm_count=132,
        ),
        Device(
            name="H200",
            matmul_flops=790e12,
            fp32_flops=67e12,
            mem_bandwidth=4.3e12,
            launch_overhead_s=4e-6,
            step_latency_s=5e-8,
            sm_count=132,
        ),
        Device(
            name="A100",
            matmul_flops=312e12,
            fp32_flops=19.5e12,
            mem_bandwidth=1.9e12,
            launch_overhead_s=5e-6,
            step_latency_s=6e-8,
            sm_count=108,
        ),
        Device(
            name="cpu-interpreter",
            matmul_flops=2e9,
            fp32_flops=2e8,
            mem_bandwidth=2e9,
            launch_overhead_s=1e-3,
            step_latency_s=2e-4,
            sm_count=1,
            note="TRITON_INTERPRET=1 on the CPU: rates are nominal, only the ranking means much",
        ),
    )
}


def device(name: str) -> Device:
    """The table entry called `name` (case-insensitive); DeviceError lists the known names."""
    for key, entry in DEVICES.items():
        if key.lower() == name.strip().lower():
            return entry
    known = ", ".join(DEVICES)
    raise DeviceError(f"unknown device {name!r}; known devices: {known}")


def detect() -> Device:
    """The entry for the GPU torch sees; cpu-interpreter without one (or under TRITON_INTERPRET)."""
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return DEVICES["cpu-interpreter"]
    gpu = torch.cuda.get_device_name()
    return from_gpu_name(gpu)


def from_gpu_name(gpu: str) -> Device:
    """Map a CUDA device name ("NVIDIA H100 80GB HBM3") to a table entry, else H100 rates."""
    for key, entry in DEVICES.items():
        if key != "cpu-interpreter" and key.lower() in gpu.lower():
            return entry
    return replace(DEVICES["H100"], name=gpu, note=f"unknown GPU {gpu!r}: H100 rates assumed")
