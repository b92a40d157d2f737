"""Time the whole chunked forward of a spec per launch configuration, at the bench's inputs.

Each --config is `chunk=Q[,option=value...]` of the chunked launcher (`block_m=32`,
`num_warps=8`, `seq_splits=4`, ...). It prints, per call shape and config,
the CUDA-graph median of the module's forward and y's relative difference from the first
config's, and with --kernels each config's kernels.

    python scripts/gpu_fwd_sweep.py --shape 8x2048 --config chunk=128 --config chunk=64
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def parse_config(text: str) -> tuple[int, dict[str, int]]:
    """`chunk=64,block_m=32,num_warps=8` → (64, {"block_m": 32, "num_warps": 8})."""
    options = {k: int(v) for k, v in (word.split("=") for word in text.split(","))}
    return options.pop("chunk", 128), options


def main() -> int:
    import triton.testing
    from gpu_bwd_profile import profile_calls
    from gpu_split_sweep import bench_tensors

    from ssmc.load import load
    from ssmc.pipeline import parse_file, with_dims

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", default=[], metavar="BxT")
    parser.add_argument("--config", action="append", default=[], metavar="chunk=Q,k=v")
    parser.add_argument("--spec", default="examples/mamba2.ssm")
    parser.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE")
    parser.add_argument("--kernels", action="store_true", help="also each config's kernels")
    args = parser.parse_args()
    spec = parse_file(ROOT / args.spec)
    if args.dim:
        spec = with_dims(spec, {k: int(v) for k, v in (d.split("=") for d in args.dim)})
    module = load(spec).module
    configs = [parse_config(c) for c in args.config or ["chunk=128", "chunk=64"]]
    for shape in args.shape or ["8x2048", "1x16384"]:
        b, T = (int(v) for v in shape.split("x"))
        t = bench_tensors(spec, b, T)
        print(f"{shape}, {spec.spec.name}: whole forward", flush=True)
        want = None
        for chunk, options in configs:
            run = functools.partial(module.forward, **t, form="chunked", chunk_size=chunk,
                                    launch=options)
            try:
                y = run()[0].float()
            except Exception as e:  # a config that does not compile: say so, go on
                print(f"  chunk {chunk} {options}: failed: {type(e).__name__}: {e}", flush=True)
                continue
            want = y if want is None else want
            err = float((y - want).norm() / want.norm())
            ms = triton.testing.do_bench_cudagraph(run, rep=100, return_mode="median")
            print(f"  chunk {chunk} {options}: {ms * 1e3:8.1f} µs  y vs first {err:.1e}",
                  flush=True)
            if args.kernels:
                profile_calls(f"chunk {chunk} {options}: {{:.3f}} ms of kernels", run, top=6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
