"""Issue 5's compile targets: the first `ssmc.load` of a spec and its first call, Triton JIT
included, ≤ 30 s; a warm `ssmc.load` (caches filled) ≤ 0.2 s.

Each measurement runs in a fresh Python process, so nothing is cached in memory. Cold: empty
SSMC_CACHE_DIR and TRITON_CACHE_DIR (temporary folders); the child times `ssmc.load`, then
the first forward (every forward kernel compiled) and the first backward (every backward
kernel compiled) at the given shape. Warm: a second child with the same folders times
`ssmc.load` and the first forward. On a machine without a GPU the calls run under the Triton
interpreter at batch 1 × T 8 (no JIT: the load times are still real).

    python scripts/compile_time.py [examples/mamba2.ssm ...] [--dtype bfloat16|float32]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch
import ssmc
from ssmc.reference import random_inputs
t_import = time.perf_counter() - t0
compiles = []  # (kernel, compile s) from Triton's compilation listener, where it has one
try:
    from triton import knobs
    def listen(*, src, metadata, metadata_group, times, cache_hit):
        if not cache_hit:
            compiles.append((metadata.get("name", "?"), round(times.total / 1e6, 3)))
    knobs.compilation.listener = listen
except (ImportError, AttributeError):
    pass
spec, gpu, dtype = sys.argv[1], sys.argv[2] == "1", getattr(torch, sys.argv[3])
t0 = time.perf_counter()
op = ssmc.load(spec)
t_load = time.perf_counter() - t0
device = "cuda" if gpu else "cpu"
batch, seqlen = (2, 2048) if gpu else (1, 8)
inputs = random_inputs(op.checked, batch=batch, seqlen=seqlen,
                       generator=torch.Generator().manual_seed(0))
from ssmc.bench import fp32_tensors
wide = fp32_tensors(op.checked)  # params and what the decay reads stay fp32, as in ssmc bench
inputs = {k: v.to(device, torch.float32 if k in wide else dtype).requires_grad_()
          for k, v in inputs.items()}
def sync():
    if gpu:
        torch.cuda.synchronize()
t0 = time.perf_counter()
y, _ = op(**inputs)
sync()
t_fwd = time.perf_counter() - t0
fwd_compiles = len(compiles)
t0 = time.perf_counter()
y.backward(torch.randn_like(y))
sync()
t_bwd = time.perf_counter() - t0
print(json.dumps({"import_s": t_import, "load_s": t_load, "first_fwd_s": t_fwd,
                  "first_bwd_s": t_bwd, "form": op.last_form,
                  "fwd_compiles": compiles[:fwd_compiles], "bwd_compiles": compiles[fwd_compiles:]}))
"""


def child(spec: str, env: dict[str, str], gpu: bool, dtype: str) -> dict[str, Any]:
    """One fresh process's timings (the last line it prints)."""
    done = subprocess.run([sys.executable, "-c", CHILD, spec, "1" if gpu else "0", dtype], env=env,
                          capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", nargs="*", default=["examples/mamba2.ssm", "examples/gla.ssm"])
    parser.add_argument("--json", default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="the inputs' dtype (bfloat16 on a CPU becomes float32)")
    args = parser.parse_args(argv)
    import torch

    gpu = torch.cuda.is_available()
    rows = []
    for spec in args.specs:
        with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as triton:
            env = {**os.environ, "SSMC_CACHE_DIR": cache, "TRITON_CACHE_DIR": triton,
                   "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
            if not gpu:
                env["TRITON_INTERPRET"] = "1"
            dtype = args.dtype if gpu else "float32"
            cold, warm = child(spec, env, gpu, dtype), child(spec, env, gpu, dtype)
        rows.append({"spec": spec, "dtype": dtype, "cold": cold, "warm": warm})
    ok = True
    print(f"{'spec':<24}{'cold load s':>12}{'+fwd s':>8}{'+bwd s':>8}{'total s':>9}"
          f"{'warm load s':>13}{'warm fwd s':>11}")
    for r in rows:
        c, w = r["cold"], r["warm"]
        if "error" in c or "error" in w:
            print(f"{r['spec']:<24} error: {c.get('error') or w.get('error')}")
            ok = False
            continue
        total = c["load_s"] + c["first_fwd_s"] + c["first_bwd_s"]
        r["cold_total_s"] = total
        r["meets"] = {"cold_30s": total <= 30.0, "warm_0.2s": w["load_s"] <= 0.2}
        print(f"{r['spec']:<24}{c['load_s']:>12.2f}{c['first_fwd_s']:>8.2f}{c['first_bwd_s']:>8.2f}"
              f"{total:>9.2f}{w['load_s']:>13.3f}{w['first_fwd_s']:>11.3f}")
    for r in rows:
        for phase in ("fwd", "bwd"):
            kernels = r["cold"].get(f"{phase}_compiles") or []
            if kernels:
                total = sum(k[1] for k in kernels)
                print(f"{r['spec']} first {phase}: {len(kernels)} Triton compiles, {total:.2f} s: "
                      + ", ".join(f"{name} {sec:.2f}" for name, sec in kernels))
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": gpu, "rows": rows}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
