"""Probe the fused chunked backward (chunked_bwd) for illegal memory accesses on the GPU.

Each case runs in its own process (an illegal access poisons the CUDA context) and calls the
generated module's `chunked_bwd` directly at MQAR-like shapes with one knob changed; every
launch is followed by a synchronisation so the failing kernel is named. Prints one line per
case: ok (with the largest |gradient|) or the kernel that failed. With a decay it also gives
dA_rel, the relative error of Σ_t dlog a_t s_t per head (what dA is made of) against autograd
of the fp64 recurrent form on the same values (the "straddle" cases: chunked_bwd(dla="straddle")).

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
    "fp16": {"dtype": "float16"},
    "T128": {"T": 128},
    "T256": {"T": 256},
    "N64": {"N": 64},
    "N64_T128": {"N": 64, "T": 128},
    "P64": {"P": 64},
    "batch64": {"batch": 64},
    "Q128": {"chunk_size": 128},
    "N64_Q128": {"N": 64, "chunk_size": 128},
    "bm32": {"block_m": 32},
    "real_T2048": {"batch": 4, "T": 2048, "H": 16, "P": 64},
    "no_decay": {"decay": False},
    "dot_fp32": {"dot_fp32": True},
    "fp32": {"dtype": "float32"},
    "straddle": {"dla": "straddle"},
    "straddle_real_T2048": {"batch": 4, "T": 2048, "H": 16, "P": 64, "dla": "straddle"},
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
    for kname in ("chunked_bwd_walk_kernel", "chunked_bwd_dbc_kernel", "chunked_bwd_dx_kernel",
                  "chunked_bwd_dla_kernel"):
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
    extra = {k: knobs[k] for k in ("head_splits", "num_warps", "chunk_size", "block_m", "dla")
             if k in knobs}
    try:
        grads = mod.chunked_bwd(x, s, log_a, B, C, heads=H, initial_state=None, cu_seqlens=None,
                                dy=dy, dfinal=None, **extra)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 — report whatever the launch raised
        return {"case": name, "ok": False, "kernel": current["kernel"],
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    finite = all(bool(torch.isfinite(t).all()) for t in grads if t is not None)
    # the same call in fp32 (IEEE dots) on the same values: the 16-bit run's relative error
    mod._CHUNKED_BWD_DOT = {}
    wide = [None if t is None else t.float() for t in (x, s, log_a, B, C, dy)]
    want = mod.chunked_bwd(*wide[:5], heads=H, initial_state=None, cu_seqlens=None,
                           dy=wide[5], dfinal=None, **extra)
    errs = {n: float((g.float() - w).norm() / w.norm().clamp_min(1e-30))
            for n, g, w in zip(("dx", "ds", "dla", "dB", "dC"), grads, want, strict=False)
            if g is not None}
    result = {"case": name, "ok": finite and max(errs.values()) < 0.05,
              "rel": {k: f"{v:.1e}" for k, v in errs.items()}}
    if log_a is not None:
        result["dA_rel"] = _da_errors({"run": grads[2], "fp32": want[2]}, *wide, H)
    return result


def _da_errors(dlas: dict, x, s, log_a, B, C, dy, H: int) -> dict:
    """Relative error of Σ_t dlog a_t s_t (per batch row and head: what dA is made of) of each
    of `dlas` against autograd of the fp64 recurrent form on the same values."""
    from ssmc import forms_torch

    la = log_a.double().requires_grad_()
    xbar = x.double() * (s.double()[..., None] if s is not None else 1.0)
    y, _ = forms_torch.recurrent(xbar, la, B.double(), C.double(), H)
    want = torch.autograd.grad(y, la, dy.double())[0]
    w = s.double() if s is not None else torch.ones_like(want)
    want_da = (want * w).sum(1)
    return {k: f"{float(((d.double() * w).sum(1) - want_da).norm() / want_da.norm()):.1e}"
            for k, d in dlas.items()}


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
    # the cases in parallel processes (separate CUDA contexts: one crash harms no other)
    procs = {name: subprocess.Popen([sys.executable, __file__, "--case", name],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name in CASES}
    results = []
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=400)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        res = json.loads(lines[-1]) if lines else {"case": name, "ok": False,
                                                   "error": err.strip()[-300:]}
        results.append(res)
        print(json.dumps(res), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
