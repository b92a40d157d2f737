"""Host (Python) cost of one eager call of an ssmc op, with the kernel launches stubbed out.

Everything of a call runs (validation, planner lookup, allocations, the module's setup and
launchers, the argument lists of every launch, the fast launcher's key, a decode call's
replay: ssmc.replay) except the device work: each Triton kernel of the generated module is
replaced by a stub behind the module's fast launcher, whose compiled kernel's runner returns
at once. Triton's own runner and driver call are therefore not counted here: this is the
part ssmc controls.

Two paths: (a) the chunked SSD form at the Mamba-2 2.7B layer (examples/mamba2.ssm,
H = 80, P = 64, N = 128, G = 1; bf16 x, B, C, z; fp32 dt and parameters; batch 8 × T 2048;
tensors on the meta device, so that allocating the 168 MB outputs costs what the CUDA
caching allocator's does, not a CPU malloc) and (b) one decode step of examples/mamba1.ssm
at batch 1 (T = 1, an fp32 initial state).

    python scripts/host_overhead.py [--calls 2000] [--profile chunked|decode]
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import inspect
import os
import pstats
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TRITON_INTERPRET", "1")  # the op takes the kernel path without a GPU

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


class StubKernel:
    """Stands in for a Triton JIT function behind the module's fast launcher (_FastKernel):
    Triton's path (`run`) and the compiled kernel's runner count the launch and run nothing."""

    def __init__(self, name: str, kernel: Any) -> None:
        self.name = name
        self.launches = 0
        signature = inspect.signature(getattr(kernel, "fn", kernel))
        self.arg_names = list(signature.parameters)
        self.params = [Param(p.name, p.default) for p in signature.parameters.values()]
        self.constexprs = [i for i, p in enumerate(signature.parameters.values())
                           if "constexpr" in str(p.annotation)]

    def run(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        self.launches += not warmup
        return self

    def __getitem__(self, grid: Any) -> Any:  # the compiled kernel's runner for a grid
        def runner(*args: Any) -> None:
            self.launches += 1

        return runner


class Param:
    def __init__(self, name: str, default: Any) -> None:
        self.name, self.default = name, default


@contextlib.contextmanager
def stubbed(module: Any) -> Iterator[dict[str, StubKernel]]:
    """Every Triton kernel of a generated module replaced by a StubKernel behind the fast
    launcher, which is switched on as on a GPU, for the duration (the module is shared by
    every op of its spec in this process: the kernels come back)."""
    from triton.runtime.jit import KernelInterface

    kernels = {
        name: value
        for name, value in vars(module).items()
        if isinstance(value, KernelInterface) and name.endswith("kernel")
    }
    stubs = {name: StubKernel(name, kernel) for name, kernel in kernels.items()}
    fast, device = module._FAST_LAUNCH[0], torch.cuda.current_device
    try:
        module._FAST_LAUNCH[0] = True
        torch.cuda.current_device = lambda: 0  # what the launcher keys on (CPU tensors here)
        for name, stub in stubs.items():
            setattr(module, name, module._FastKernel(stub))
        yield stubs
    finally:
        module._FAST_LAUNCH[0], torch.cuda.current_device = fast, device
        for name, kernel in kernels.items():
            setattr(module, name, kernel)


def chunked_case() -> tuple[Any, dict[str, Any]]:
    """The Mamba-2 2.7B op and the inputs of a batch 8 × T 2048 call (meta tensors)."""
    import ssmc

    op = ssmc.load(ROOT / "examples" / "mamba2.ssm")
    batch, T, H, P, N = 8, 2048, 80, 64, 128
    dev = "meta"
    bf16, f32 = torch.bfloat16, torch.float32
    kwargs = dict(
        x=torch.empty(batch, T, H, P, dtype=bf16, device=dev),
        dt=torch.empty(batch, T, H, dtype=f32, device=dev),
        B=torch.empty(batch, T, 1, N, dtype=bf16, device=dev),
        C=torch.empty(batch, T, 1, N, dtype=bf16, device=dev),
        z=torch.empty(batch, T, H, P, dtype=bf16, device=dev),
        A=torch.empty(H, dtype=f32, device=dev),
        dt_bias=torch.empty(H, dtype=f32, device=dev),
        D=torch.empty(H, dtype=f32, device=dev),
    )
    # The GPU's planner picks chunked, Q = 128 at this shape; the interpreter's module rule
    # does the same (asserted by main).
    return op, kwargs


def decode_case() -> tuple[Any, dict[str, Any]]:
    """The Mamba-1 op and the inputs of one decode step at batch 1 (CPU tensors)."""
    import ssmc

    op = ssmc.load(ROOT / "examples" / "mamba1.ssm")
    H, N = 64, 16
    g = torch.Generator().manual_seed(0)
    kwargs = dict(
        x=torch.randn(1, 1, H, 1, generator=g),
        dt=torch.randn(1, 1, H, generator=g),
        B=torch.randn(1, 1, 1, N, generator=g),
        C=torch.randn(1, 1, 1, N, generator=g),
        z=torch.randn(1, 1, H, 1, generator=g),
        A=-torch.rand(H, N, generator=g),
        dt_bias=torch.randn(H, generator=g),
        D=torch.randn(H, generator=g),
        initial_state=torch.randn(1, H, N, 1, generator=g),
    )
    return op, kwargs


def per_call_us(op: Any, kwargs: dict[str, Any], calls: int, repeats: int = 7) -> tuple[float, float]:
    """µs per call of `calls` calls, the least over `repeats` runs: (thread CPU time, wall
    time). The machine may be shared: CPU time leaves out the time others held the core."""
    for _ in range(min(calls, 50)):
        op(**kwargs)
    cpu, wall = [], []
    for _ in range(repeats):
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        for _ in range(calls):
            op(**kwargs)
        wall.append((time.perf_counter_ns() - t0) / calls / 1e3)
        cpu.append((time.thread_time_ns() - c0) / calls / 1e3)
    return min(cpu), min(wall)


def measure(calls: int, repeats: int = 7) -> dict[str, dict[str, Any]]:
    """µs per call (CPU and wall, per_call_us) and launches per call of both paths."""
    report = {}
    for name, case, form in (("chunked", chunked_case, "chunked"),
                             ("decode", decode_case, "decode")):
        op, kwargs = case()
        with stubbed(op.module) as stubs, torch.no_grad():
            op(**kwargs)
            assert op.last_form == form, (name, op.last_form)
            before = sum(s.launches for s in stubs.values())
            op(**kwargs)
            launches = sum(s.launches for s in stubs.values()) - before
            cpu, wall = per_call_us(op, kwargs, calls, repeats)
        report[name] = {"cpu_us": round(cpu, 1), "wall_us": round(wall, 1), "launches": launches}
    return report


def profile(name: str, calls: int) -> None:
    """cProfile of `calls` calls of one path, by own time."""
    op, kwargs = chunked_case() if name == "chunked" else decode_case()
    with stubbed(op.module), torch.no_grad():
        for _ in range(50):
            op(**kwargs)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            op(**kwargs)
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000, help="calls per timed run")
    parser.add_argument("--profile", choices=("chunked", "decode"), default=None)
    args = parser.parse_args(argv)
    if args.profile:
        profile(args.profile, args.calls)
        return 0
    for name, row in measure(args.calls).items():
        print(f"{name}: {row['cpu_us']} us CPU ({row['wall_us']} us wall) per call, "
              f"{row['launches']} launches (stubbed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
