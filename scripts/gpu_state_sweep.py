"""Time the chunked forward's state walk (chunked_state_fwd) per tile at the Mamba-2 2.7B layer.

The walk runs one program per (sequence, head, N tile × P tile) along its whole sequence, so
at batch 1 it has H · tiles programs (80 at the default 128 × 64 tile, fewer than an H100's
132 SMs). This prints the median time of the walk alone for each (block_n, block_p, block_t,
num_warps) given, at one call shape, and checks each against the default tile's states.

    python scripts/gpu_state_sweep.py --batch 1 --seqlen 16384 --tiles 128,64,128,8 64,64,128,4
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    import triton.testing

    from ssmc.load import load
    from ssmc.pipeline import parse_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seqlen", type=int, default=16384)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--tiles", nargs="+", default=["128,64,128,8"],
                        help="block_n,block_p,block_t,num_warps (0: the launcher's default)")
    args = parser.parse_args()
    module = load(parse_file(ROOT / "examples" / "mamba2.ssm")).module
    b, T, H, P, N = args.batch, args.seqlen, 80, 64, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(b, T, H, P, device="cuda", generator=g).bfloat16()
    B = torch.randn(b, T, 1, N, device="cuda", generator=g).bfloat16()
    s = torch.rand(b, T, H, device="cuda", generator=g) * 0.1
    log_a = -torch.rand(b, T, H, device="cuda", generator=g) * 0.1
    tiles, first = module.seq_tiles(None, b, T, args.chunk, x.device)
    want = None
    for text in args.tiles:
        bn, bp, bt, warps = (int(v) or None for v in text.split(","))

        def walk(bn=bn, bp=bp, bt=bt, warps=warps):
            return module.chunked_state_fwd(
                x, s, log_a, B, B, tiles=tiles, first=first, heads=H, initial_state=None,
                final_state=None, chunk_size=args.chunk, dot_precision="tf32", block_t=bt,
                block_n=bn, block_p=bp, num_warps=warps)

        states = walk().float()
        if want is None:
            want = states
        err = float((states - want).norm() / want.norm())
        ms = triton.testing.do_bench(walk, warmup=10, rep=50, return_mode="median")
        print(f"  {text:>16}  {ms * 1e3:8.1f} µs  err vs first {err:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
