"""The recurrent form's whole forward per `block_t` (tokens per unrolled block of its scan)
and `num_warps` (0 for either: the launcher's default).

Per shape: the generated module's forward in the recurrent form with each pair, its output
against the first one's, and its median time (triton.testing.do_bench, ms).

    python scripts/gpu_recurrent_sweep.py --block-t 8 16 32 64 --warps 0 1   # on the GPU
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from gpu_split_sweep import bench_tensors  # noqa: E402

from ssmc.load import load  # noqa: E402
from ssmc.pipeline import parse_file, with_dims  # noqa: E402

SHAPES = (
    ("mamba1", {"H": 1536}, 2, 2048),
    ("mamba1", {"H": 64}, 2, 4096),
    ("mamba1", {"H": 64}, 2, 512),
    ("mamba2", {"H": 80, "P": 64, "N": 128}, 1, 2048),
)


def _forward(module: Any, t: dict[str, torch.Tensor], launch: dict[str, int]) -> torch.Tensor:
    return module.forward(**t, form="recurrent", launch=launch)[0]


def main() -> int:
    import triton.testing

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-t", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--warps", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    configs = [(bt, w) for w in args.warps for bt in args.block_t]
    for name, dims, b, T in SHAPES:
        spec = with_dims(parse_file(ROOT / "examples" / f"{name}.ssm"), dims)
        module = load(spec).module
        t = bench_tensors(spec, b, T)
        want = None
        for block_t, warps in configs:
            launch = {**({"block_t": block_t} if block_t else {}),
                      **({"num_warps": warps} if warps else {})}

            run = functools.partial(_forward, module, t, launch)

            y = run()
            if want is None:
                want = y.double()
            err = float((y.double() - want).norm() / want.norm())
            ms = triton.testing.do_bench(run, warmup=25, rep=100)
            print(f"{name} {dims} {b}x{T} block_t {block_t or 'default'} warps {warps or 'default'}: "
                  f"{ms:.3f} ms  (vs first {err:.1e})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
