"""Where forward + backward spends its GPU time: per-kernel CUDA time of ssmc and mamba_ssm.

The Mamba-2 2.7B layer (H = 80, P = 64, N = 128, G = 1, bf16, batch 4, T = 4096), ten
forward + backward steps under torch.profiler after a warm-up; prints the kernels sorted by
total CUDA time, per step, for each implementation (mamba_ssm when its sdist is given).

    python scripts/gpu_bwd_profile.py --mamba-src .whl/mamba/mamba_ssm-2.3.2.post1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_backward import MAMBA_27B, ROOT, import_mamba, layer_inputs  # noqa: E402

from ssmc.load import load  # noqa: E402
from ssmc.pipeline import parse_file, with_dims  # noqa: E402

STEPS = 10


def profile_steps(name: str, run, inputs: dict[str, torch.Tensor], top: int = 25) -> None:
    """Print the kernels of STEPS forward + backward steps, by CUDA time per step."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    dy = torch.randn_like(inputs["x"])
    profile_calls(f"{name}: {{:.3f}} ms of kernels per forward + backward",
                  lambda: torch.autograd.backward(run(leaves), dy), top=top)


def profile_calls(title: str, call, top: int) -> None:
    """Three warm-up calls, then STEPS calls under torch.profiler: the `top` kernels by CUDA
    time per call, under `title` formatted with the total ms per call."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            call()
        torch.cuda.synchronize()
    rows = kernel_rows(prof)
    total = sum(e.device_time_total for e in rows) / STEPS / 1000
    print("\n== " + title.format(total), flush=True)
    print_kernels(rows[:top], STEPS, "  ")


def kernel_rows(prof) -> list:
    """The profiled kernels with device time, slowest first."""
    rows = [e for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda e: -e.device_time_total)


def print_kernels(rows: list, steps: int, indent: str) -> None:
    """One line per kernel: ms and launches per step, name."""
    for e in rows:
        print(f"{indent}{e.device_time_total / steps / 1000:8.3f} ms  x{e.count // steps:<3} "
              f"{e.key[:90]}")


SWEEP = ({}, {"head_splits": 1}, {"head_splits": 4}, {"head_splits": 8},
         {"head_splits": 16}, {"num_warps": 4}, {"block_m": 32}, {"chunk_size": 128},
         {"stored_cc": True}, {"stored_cc": True, "head_splits": 8},
         {"dla": "straddle"}, {"dla": "suffix"}, {"dbc": "shared"},
         {"dbc": "shared", "head_splits": 1}, {"dbc": "shared", "stored_cc": True},
         {"dbc": "shared", "num_warps": 4}, {"dbc": "shared", "chunk_size": 128})


def sweep_launch(op, inputs: dict[str, torch.Tensor], sweep=SWEEP) -> None:
    """Median ms and peak memory above the inputs of the fused backward alone (chunked_bwd)
    per launch option at this shape."""
    import triton.testing

    mod = op.module
    x, B, C = inputs["x"], inputs["B"], inputs["C"]
    H = x.shape[2]
    dt = torch.nn.functional.softplus(inputs["dt"] + inputs["dt_bias"])
    log_a = (dt * inputs["A"]).contiguous()
    dy = torch.randn_like(x)
    print("\n== chunked_bwd alone (ms, median) by launch option")
    for opts in sweep:
        opts = dict(opts)
        kernels = opts.pop("profile", False)  # {"profile": true, ...}: also its kernels' times

        def call(opts=opts):
            mod.chunked_bwd(x, dt, log_a, B, C, heads=H, initial_state=None, cu_seqlens=None,
                            dy=dy, dfinal=None, **opts)
        try:
            ms = triton.testing.do_bench(call, warmup=5, rep=40, return_mode="median")
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            call()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            print(f"  {ms:8.3f} ms  {peak:7.0f} MiB  {opts or 'defaults'}", flush=True)
            if kernels:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    call()
                    torch.cuda.synchronize()
                print_kernels(kernel_rows(prof)[:8], 1, "      ")
        except Exception as exc:  # noqa: BLE001 — an option that cannot launch is reported
            print(f"  failed   {opts}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)


def sweep_tiles(op, inputs: dict[str, torch.Tensor], settings: list[dict]) -> None:
    """Per-kernel times of forward + backward with the elementwise kernels' tile constants set
    ({"EPILOGUE_BWD_KERNEL": [elements, row_group, num_warps], ...}), each in turn."""
    mod = op.module
    for setting in settings:
        saved = {name: getattr(mod, f"_{name}_TILE") for name in setting}
        for name, tile in setting.items():
            setattr(mod, f"_{name}_TILE", tuple(tile))
        label = json.dumps(setting).replace("{", "(").replace("}", ")")
        profile_steps(f"ssmc with {label}", lambda t: op(**t, form="chunked")[0], inputs,
                      top=6)
        for name, tile in saved.items():
            setattr(mod, f"_{name}_TILE", tile)


def ncu_steps(name: str, run, inputs: dict[str, torch.Tensor]) -> None:
    """Two warm-up forward + backward steps, then one inside cudaProfilerStart/Stop: the range
    that `ncu --profile-from-start off` reads (scripts/gpu_check.sh ncu)."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    dy = torch.randn_like(inputs["x"])
    for _ in range(2):
        torch.autograd.backward(run(leaves), dy)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    torch.autograd.backward(run(leaves), dy)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"{name}: one step profiled", flush=True)


def compare_dbc(op, inputs: dict[str, torch.Tensor]) -> None:
    """Relative error of each gradient of chunked_bwd with dbc "per_head" and "shared" (bf16
    dots; shared rounds W, the heads' sum, to bf16 once) against the per-head path on fp32
    copies of the inputs (fp32 dots)."""
    mod = op.module
    x, B, C = inputs["x"], inputs["B"], inputs["C"]
    H = x.shape[2]
    dt = torch.nn.functional.softplus(inputs["dt"] + inputs["dt_bias"]).float()
    log_a = (dt * inputs["A"]).contiguous()
    dy = torch.randn_like(x)
    names = ("dx", "ds", "dlog_a", "dB", "dC")

    def grads(x, B, C, dy, **opts):
        out = mod.chunked_bwd(x, dt, log_a, B, C, heads=H, initial_state=None, cu_seqlens=None,
                              dy=dy, dfinal=None, **opts)
        return [g.float() for g in out[:5]]

    want = grads(x.float(), B.float(), C.float(), dy.float())
    print("\n== chunked_bwd bf16 against its fp32 run (relative error)")
    for dbc in ("per_head", "shared"):
        got = grads(x, B, C, dy, dbc=dbc)
        errs = [((g - w).norm() / w.norm()).item() for g, w in zip(got, want, strict=True)]
        print(f"  {dbc:9s} " + "  ".join(f"{n} {e:.2e}" for n, e in zip(names, errs, strict=True)))
        del got
    del want
    torch.cuda.empty_cache()


def mamba_step(mamba, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """mamba_ssm's mamba_chunk_scan_combined on the layer's inputs (chunk 256), its y."""
    out = mamba(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=256, D=t["D"], z=t["z"],
                dt_bias=t["dt_bias"], dt_softplus=True)
    return out[0] if isinstance(out, tuple) else out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mamba-src", default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=4096)
    parser.add_argument("--sweep", nargs="+", type=json.loads, default=None,
                        help="only time chunked_bwd with these options (JSON objects)")
    parser.add_argument("--kernels", action="store_true",
                        help="the per-kernel profiles of ssmc and mamba_ssm, then --sweep's "
                             "options only (no default sweep, no dbc comparison)")
    parser.add_argument("--ncu", action="store_true",
                        help="one profiled step of each implementation, for ncu (no timing)")
    parser.add_argument("--tiles", nargs="+", type=json.loads, default=None,
                        help="per-kernel profiles with these elementwise tile constants "
                             '(JSON objects {"EPILOGUE_BWD_KERNEL": [1024, 64, 4]}), then stop')
    args = parser.parse_args()
    inputs = layer_inputs(args.batch, args.seqlen, MAMBA_27B, "cuda", torch.bfloat16)
    op = load(with_dims(parse_file(ROOT / "examples" / "mamba2.ssm"), MAMBA_27B))
    if args.tiles:
        sweep_tiles(op, inputs, args.tiles)
        return 0
    if args.ncu:
        ncu_steps("ssmc", lambda t: op(**t, form="chunked")[0], inputs)
        mamba = import_mamba(args.mamba_src)
        if mamba is not None:
            ncu_steps("mamba_ssm", lambda t: mamba_step(mamba, t), inputs)
        return 0
    if args.sweep and not args.kernels:
        sweep_launch(op, inputs, args.sweep)
        return 0
    profile_steps("ssmc", lambda t: op(**t, form="chunked")[0], inputs)
    if args.kernels:
        if args.sweep:
            sweep_launch(op, inputs, args.sweep)
    else:
        sweep_launch(op, inputs)
        compare_dbc(op, inputs)
    mamba = import_mamba(args.mamba_src)
    if mamba is not None:
        profile_steps("mamba_ssm", lambda t: mamba_step(mamba, t), inputs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
