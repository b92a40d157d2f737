"""Compile the fused diagonal-decay backward's kernels (chunked_diag_bwd) for a GPU without one.

As scripts/compile_bwd.py (whose `resources` it uses): triton.compile for GPUTarget("cuda",
ARCH, 32), then registers and stack per kernel from cuobjdump. Usage:
python scripts/compile_diag_bwd.py [--arch 90] [--dtype bf16|fp16|fp32] [--chunk 64]
[--block-n 32] [--p 64] [--dla straddle|suffix|chunk] (straddle, the default: the walks' boundary
and exact-tail variants, the dB/dC launches' DCS_INTER and chunked_diag_bwd_dla_kernel); with
--dla chunk also chunked_diag_bwd_whole_kernel at 4 and 8 warps (N tiles of --block-n, whole P)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real JIT functions

import triton.language as tl  # noqa: E402

from ssmc.load import load_source  # noqa: E402
from ssmc.render import render_stage  # noqa: E402

_SPEC = importlib.util.spec_from_file_location("compile_bwd", Path(__file__).with_name("compile_bwd.py"))
assert _SPEC is not None and _SPEC.loader is not None
compile_bwd = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(compile_bwd)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--block-n", type=int, default=32)
    parser.add_argument("--p", type=int, default=64, help="the padded head dim (dB/dC hold all of it)")
    parser.add_argument("--dla", default="straddle", choices=("suffix", "straddle", "chunk"))
    parser.add_argument("--forward", action="store_true",
                        help="the forward's kernels (chunked_diag_fwd) as launched, instead")
    args = parser.parse_args()
    straddle = args.dla == "straddle"
    in_chunk = args.dla == "chunk"
    source = "\n\n".join(render_stage(n) for n in ("chunked_diag", "adjoint", "chunked_diag_bwd"))
    module = load_source(compile_bwd.HEADER + source, "compile_diag_bwd")
    half, f32, i64 = f"*{args.dtype}", "*fp32", "*i64"
    dot = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}[args.dtype]
    base = {"DOT_DTYPE": dot, "DOT_PRECISION": "ieee", "CHUNK": args.chunk}
    tiles = {"BLOCK_N": args.block_n}

    def show(name: str, kernel: object, pointers: dict[str, str], consts: dict, warps: int) -> None:
        usage = compile_bwd.resources(kernel, pointers, consts, warps, args.arch)
        print(f"{name} warps={warps}: {usage}")

    if args.forward:
        forward(module, show, half, f32, i64, args)
        return 0
    walk = dict(key=half, value=half, s=f32, log_a=f32, states=half, tiles=i64, first=i64,
                initial=f32, final=f32, fwd_states=half, boundary=f32)  # fmt: skip
    for reverse in (False, True):
        consts = {**base, **tiles, "REVERSE": reverse, "HAS_S": not reverse, "HAS_INITIAL": True,
                  "HAS_FINAL": True, "BLOCK_T": 64, "BLOCK_P": 64,
                  "HAS_BOUNDARY": args.dla != "suffix" and reverse,
                  "EXACT_TAIL": args.dla != "suffix"}  # fmt: skip
        show(f"chunked_diag_bwd_walk reverse={reverse}", module.chunked_diag_bwd_walk_kernel, walk,
             consts, 4)  # fmt: skip
    dbc = dict(x=half, s=f32, log_a=f32, B=half, C=half, dy=half, cs=f32, states=half, tiles=i64,
               grad=f32, dcs=f32, vsum=f32, done="*i8")  # fmt: skip
    for want_db in (False, True):
        consts = {**base, **tiles, "WANT_DB": want_db, "HAS_S": True, "BLOCK_M": 16,
                  "BLOCK_P": args.p, "DCS_INTER": straddle, "V_SUMS": in_chunk and want_db,
                  "BLOCK_SPREAD": module.BLOCK_SPREAD, "CROSS_DTYPE": dot,
                  "CROSS_PRECISION": "ieee", "SKIP_WHOLE": in_chunk}  # fmt: skip
        show(f"chunked_diag_bwd_dbc {'dB' if want_db else 'dC'}", module.chunked_diag_bwd_dbc_kernel,
             dbc, consts, 8)  # fmt: skip
    dx = dict(x=half, s=f32, B=half, C=half, cs=f32, A=f32, dy=half, adj_states=half, tiles=i64,
              dx=half, ds=f32)  # fmt: skip
    for from_a in (True, False):
        consts = {**base, **tiles, "HAS_S": True, "FROM_A": from_a, "A_PRECISION": "tf32",
                  "BLOCK_M": 16, "BLOCK_P": 64}  # fmt: skip
        show(f"chunked_diag_bwd_dx from_A={from_a}", module.chunked_diag_bwd_dx_kernel, dx, consts, 4)
    if in_chunk:
        whole = dict(x=half, s=f32, log_a=f32, B=half, C=half, dy=half, cs=f32, fwd_states=half,
                     adj_states=half, bnd=f32, tiles=i64, dB=f32, dC=f32, dla=f32, done="*i8")
        for cross in ("tf32", "tf32x3"):
            consts = {**base, **tiles, "HAS_S": True, "CROSS_DTYPE": tl.float32,
                      "CROSS_PRECISION": cross, "BLOCK_P": args.p,
                      "WHOLE_SPREAD": module.WHOLE_SPREAD}  # fmt: skip
            for warps in (4, 8):
                show(f"chunked_diag_bwd_whole {cross}", module.chunked_diag_bwd_whole_kernel,
                     whole, consts, warps)  # fmt: skip
    if straddle:
        dla = dict(x=half, s=f32, log_a=f32, B=half, C=half, dy=half, tiles=i64, uv=f32, bnd=f32,
                   dla=f32)  # fmt: skip
        # as chunked_diag_bwd launches it: N tiles of 16, P tiles of at most 32, 8 warps
        consts = {**base, "HAS_S": True, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_P": min(32, args.p)}
        show("chunked_diag_bwd_dla", module.chunked_diag_bwd_dla_kernel, dla, consts, 8)
    return 0


def forward(module, show, half: str, f32: str, i64: str, args: argparse.Namespace) -> None:
    """The forward's state walk, intra-chunk block and scan with their default tiles."""
    precision = "ieee" if args.dtype == "fp32" else "tf32"
    walk = dict(x=half, s=f32, B=half, cs=f32, states=half if args.dtype != "fp32" else f32,
                tiles=i64, first=i64, initial_state=f32, final_state=f32)  # fmt: skip
    consts = {"HAS_S": True, "HAS_INITIAL": True, "HAS_FINAL": True, "DOT_PRECISION": precision,
              "BLOCK_T": args.chunk, "BLOCK_N": 64, "BLOCK_P": 64}  # fmt: skip
    show("chunked_diag_state", module.chunked_diag_state_fwd_kernel, walk, consts, 4)
    intra = dict(B=half, C=half, cs=f32, A=f32, tiles=i64)
    consts = {"DOT_PRECISION": precision, "SPREAD_MAX": 30.0, "BLOCK_T": args.chunk,
              "BLOCK_C": 16, "BLOCK_N": 64}  # fmt: skip
    show("chunked_diag_intra", module.chunked_diag_intra_fwd_kernel, intra, consts, 4)
    scan = dict(x=half, s=f32, C=half, cs=f32, states=walk["states"], A=f32, out=half, tiles=i64)
    consts = {"HAS_S": True, "DOT_PRECISION": precision, "BLOCK_T": args.chunk,
              "BLOCK_M": min(args.chunk, 64), "BLOCK_N": 64, "BLOCK_P": 64}  # fmt: skip
    show("chunked_diag_scan", module.chunked_diag_scan_fwd_kernel, scan, consts, 4)


if __name__ == "__main__":
    sys.exit(main())
