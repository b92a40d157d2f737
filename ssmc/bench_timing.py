"""Timing for `ssmc bench`: medians of plain calls and CUDA-graph replays, peak memory, roofline.

On a GPU, plain time is `triton.testing.do_bench` (warm-up, then the median over `rep_ms`
of calls, each issued from Python: host overhead included) and graph time is
`do_bench_cudagraph` (the same calls replayed from a CUDA graph: GPU time only). Peak
extra memory is the most allocated during one call above what was allocated before it
(its outputs included). The roofline is measured, not looked up: copy bandwidth from a
512 MiB device-to-device copy (bytes read + written) and the bf16 matmul rate from an
8192³ product. On a CPU only plain wall time is measured (median of a few calls).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

COPY_BYTES = 512 * 2**20
MATMUL_SIZE = 8192


@dataclass(frozen=True, slots=True, kw_only=True)
class Timing:
    """One callable's figures: medians in ms, peak extra memory in MiB (None: not measured)."""

    plain_ms: float
    graph_ms: float | None = None
    peak_mib: float | None = None
    graph_error: str | None = None
    """Why no CUDA-graph time (capture failed), else None."""

    def as_dict(self) -> dict[str, object]:
        """The JSON form (every field, None as null)."""
        return asdict(self)


def measure(fn: Callable[[], object], device: torch.device, *, warmup_ms: int = 25,
            rep_ms: int = 100, cpu_reps: int = 3) -> Timing:
    """Time `fn` on `device` (after one call that compiles and warms it)."""
    if device.type != "cuda":
        fn()
        samples = []
        for _ in range(cpu_reps):
            started = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - started) * 1e3)
        return Timing(plain_ms=statistics.median(samples))
    import triton.testing

    fn()
    torch.cuda.synchronize()
    peak = peak_extra_mib(fn)
    plain = float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    graph: float | None = None
    error: str | None = None
    try:
        graph = float(triton.testing.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
    except Exception as err:  # a callable that cannot be captured still has its plain time
        error = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        torch.cuda.synchronize()
    return Timing(plain_ms=plain, graph_ms=graph, peak_mib=peak, graph_error=error)


def peak_extra_mib(fn: Callable[[], object]) -> float:
    """MiB allocated at the peak of one call of `fn` above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def roofline(device: torch.device) -> dict[str, float] | None:
    """Measured copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s); None on CPU."""
    if device.type != "cuda":
        return None
    copy_ms = _median_ms(_copy(device))
    mm_ms = _median_ms(_matmul(device))
    torch.cuda.empty_cache()
    n = MATMUL_SIZE
    return {
        "copy_GBps": 2 * COPY_BYTES / (copy_ms * 1e-3) / 1e9,
        "bf16_matmul_TFLOPs": 2 * n**3 / (mm_ms * 1e-3) / 1e12,
    }


def _copy(device: torch.device) -> Callable[[], object]:
    src = torch.empty(COPY_BYTES // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def _matmul(device: torch.device) -> Callable[[], object]:
    a, b = (torch.randn(MATMUL_SIZE, MATMUL_SIZE, dtype=torch.bfloat16, device=device)
            for _ in range(2))
    return lambda: a @ b


def _median_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, rep=200, return_mode="median"))


def environment(device: torch.device) -> dict[str, str]:
    """Device name, date and the versions that matter for the figures."""
    import datetime

    import triton

    from ssmc import __version__

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    versions = {"ssmc": __version__, "torch": torch.__version__, "triton": triton.__version__}
    return {
        "device": name,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        **versions,
    }
