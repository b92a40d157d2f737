"""Probe the fused chunked backward (chunked_bwd) for illegal memory accesses on the GPU.

Each case runs in its own process (an illegal access poisons the CUDA context) and calls the
generated module's `chunked_bwd` directly at MQAR-like shapes with one knob changed; every
launch is followed by a synchronisation so the failing kernel is named. Prints one line per
case: ok (with the largest |gradient|) or the kernel that failed.

    python scripts/gpu_bwd_probe.py            # every case
    python scripts/gpu_bwd_probe.py --case base
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

CASES: dict[str, dict] = {
    "base": {},
    "fp32": {"dtype": "float32"},
    "fp16": {"dtype": "float16"},
    "batch64": {"batch": 64},
    "batch128": {"batch": 128},
    "batch512": {"batch": 512},
    "T128": {"T": 128},
    "T256": {"T": 256},
    "N64": {"N": 64},
    "splits1": {"head_splits": 1},
    "splits8": {"head_splits": 8},
    "warps4": {"num_warps": 4},
    "dot_fp32": {"dot_fp32": True},
    "no_decay": {"decay": False},
    "no_s": {"s": False},
    "dy_fp32": {"dy_fp32": True},
}


def run_case(name: str) -> dict:
    """One case in this process: the kernel that failed, or the largest gradient."""
    from ssmc.load import load
    from ssmc.pipeline import parse_file, with_dims

    knobs = {"dtype": "bfloat16", "batch": 256, "T": 64, "H": 8, "N": 128, "P": 32,
             "decay": True, "s": True, "dot_fp32": False, "dy_fp32": False} | CASES[name]
    dims = {"H": knobs["H"], "G": 1, "N": knobs["N"], "P": knobs["P"]}
    op = load(with_dims(parse_file("examples/mamba2.ssm"), dims))
    mod = op.module
    if knobs["dot_fp32"]:
        mod._CHUNKED_BWD_DOT = {}
    current = {"kernel": "(none)"}
    for kname in ("chunked_bwd_walk_kernel", "chunked_bwd_dbc_kernel", "chunked_bwd_dx_kernel"):
        setattr(mod, kname, _Synced(getattr(mod, kname), kname, current))
    dev = torch.device("cuda")
    dtype = getattr(torch, knobs["dtype"])
    b, T, H, N, P = (knobs[k] for k in ("batch", "T", "H", "N", "P"))
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dev, dt)

    x = rand(b, T, H, P)
    s = torch.rand(b, T, H, generator=g).to(dev) * 0.5 + 0.01 if knobs["s"] else None
    log_a = -torch.rand(b, T, H, generator=g).to(dev) * 0.5 if knobs["decay"] else None
    B, C = rand(b, T, 1, N, scale=0.3), rand(b, T, 1, N, scale=0.3)
    dy = rand(b, T, H, P, dt=torch.float32 if knobs["dy_fp32"] else dtype)
    extra = {k: knobs[k] for k in ("head_splits", "num_warps") if k in knobs}
    try:
        grads = mod.chunked_bwd(x, s, log_a, B, C, heads=H, initial_state=None, cu_seqlens=None,
                                dy=dy, dfinal=None, **extra)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 — report whatever the launch raised
        return {"case": name, "ok": False, "kernel": current["kernel"],
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    big = max(float(t.float().abs().max()) for t in grads if t is not None)
    finite = all(bool(torch.isfinite(t).all()) for t in grads if t is not None)
    return {"case": name, "ok": finite, "max_abs": big}


class _Synced:
    """A Triton kernel whose every launch is followed by a synchronisation, named on failure."""

    def __init__(self, kernel, name: str, current: dict) -> None:
        self.kernel, self.name, self.current = kernel, name, current

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.current["kernel"] = f"{self.name} grid={tuple(grid)}"
            self.kernel[grid](*args, **kwargs)
            torch.cuda.synchronize()
            self.current["kernel"] = "(after " + self.name + ")"
        return launch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="run one case in this process")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return 0
    results = []
    for name in CASES:
        proc = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True,
                              text=True, timeout=300)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        res = json.loads(lines[-1]) if lines else {"case": name, "ok": False,
                                                   "error": proc.stderr.strip()[-300:]}
        results.append(res)
        print(json.dumps(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
