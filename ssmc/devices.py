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
    load_latency_s: float
    """Seconds a loop step waits for its own small global loads when they are not prefetched
    (the recurrent scan's x_t, B_t, C_t, a_t: one DRAM round trip a token)."""
    host_launch_s: float
    """Host seconds to issue one launch of a plain (eager) call: Triton's launcher and ssmc's
    argument building. The GPU overlaps it with earlier launches' work (`ssmc.cost_time`),
    so it only shows where the kernels are shorter; 0 where the host is not separate."""
    host_op_s: float
    """Host seconds of one eager torch op (the convolution form's FFTs, the LTI kernel)."""
    sm_count: int
    """Streaming multiprocessors: below this many programs a kernel leaves the GPU idle."""
    note: str = ""


H100_LOAD_LATENCY_S = 4.5e-7
"""Measured (docs/runs/2026-11-23-h100-autotune.json): examples/mamba1.ssm's recurrent scan
(64 programs, one per head, N = 16, P = 1) took 8.11 ms for 16384 tokens at batch 1, i.e.
0.50 µs a token = this + `step_latency_s`; 0.52 µs at (2, 4096), 0.60 µs at H = 1536
(1, 8192). The H200 and A100 entries borrow it (same DRAM round trip class)."""
H100_HOST_LAUNCH_S = 6e-5
"""Measured in the same run (Triton 3.6, snapshot b7ed219): Mamba-1's chunked form at
(16, 256), eight launches (two prologues, five stages, epilogue) of a few µs of GPU work
each, took 485 µs (≈ 8 × 60 µs), and its recurrent form, four launches, 322 µs (the 3rd
launch issued at 180 µs plus its 256-token scan at 0.5 µs a token). The host path has
been trimmed since (docs/perf-notes.md, Host overhead): re-measure when it changes."""
HOST_TORCH_OP_S = 1e-5
"""Not measured here: the usual order of an eager PyTorch op's dispatch (Python, ATen,
the CUDA launch); only the convolution form and the LTI kernel are torch ops."""

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
            load_latency_s=H100_LOAD_LATENCY_S,
            host_launch_s=H100_HOST_LAUNCH_S,
            host_op_s=HOST_TORCH_OP_S,
            sm_count=132,
        ),
        Device(
            name="H200",
            matmul_flops=790e12,
            fp32_flops=67e12,
            mem_bandwidth=4.3e12,
            launch_overhead_s=4e-6,
            step_latency_s=5e-8,
            load_latency_s=H100_LOAD_LATENCY_S,
            host_launch_s=H100_HOST_LAUNCH_S,
            host_op_s=HOST_TORCH_OP_S,
            sm_count=132,
        ),
        Device(
            name="A100",
            matmul_flops=312e12,
            fp32_flops=19.5e12,
            mem_bandwidth=1.9e12,
            launch_overhead_s=5e-6,
            step_latency_s=6e-8,
            load_latency_s=H100_LOAD_LATENCY_S,
            host_launch_s=H100_HOST_LAUNCH_S,
            host_op_s=HOST_TORCH_OP_S,
            sm_count=108,
        ),
        Device(
            name="cpu-interpreter",
            matmul_flops=2e9,
            fp32_flops=2e8,
            mem_bandwidth=2e9,
            launch_overhead_s=1e-3,
            step_latency_s=2e-4,
            load_latency_s=0.0,
            host_launch_s=0.0,
            host_op_s=0.0,
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
