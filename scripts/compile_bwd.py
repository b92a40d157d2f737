"""Compile the fused chunked backward's kernels for a GPU on a machine without one.

triton.compile with GPUTarget("cuda", ARCH, 32) runs the whole pipeline (TTIR, TTGIR, LLVM,
PTX, ptxas from the Triton wheel), so compile errors show up without a GPU, and
`cuobjdump --dump-resource-usage` on the cubin gives each kernel's registers and stack
(spills). Arguments are specialised as at run time (i32 scalars, 16-divisible pointers
and strides). Usage: python scripts/compile_bwd.py [--arch 90] [--decay scalar|none]
[--dla suffix|straddle] (straddle: chunked_bwd(dla="straddle"), its walk and dB/dC variants
and chunked_bwd_dla_kernel) [--dbc per_head|shared] (shared: chunked_bwd(dbc="shared"), the
dB/dC launches with the state terms only plus chunked_bwd_w_kernel and chunked_bwd_wbc_kernel;
needs --dla straddle with --decay scalar)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real JIT functions

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ssmc.load import load_source  # noqa: E402
from ssmc.render import render_stage  # noqa: E402

HEADER = "import math\nimport torch\nimport triton\nimport triton.language as tl\n\n"


def resources(
    kernel: Any, pointers: dict[str, str], consts: dict[str, Any], warps: int, arch: int
) -> str:
    """`REG:… STACK:…` of one compiled kernel."""
    names = kernel.arg_names
    signature = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(names)
        if n in pointers or (n.startswith("stride") and not n.endswith(("_n", "_p")))
    }
    constexprs = {(names.index(k),): v for k, v in consts.items()}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps}
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    out = subprocess.run(
        [str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
    ).stdout
    os.unlink(f.name)
    return " ".join(line.split("CONSTANT")[0].strip() for line in out.splitlines() if "REG" in line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--decay", default="scalar", choices=("scalar", "none"))
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--stored-cc", action="store_true", help="chunked_bwd(stored_cc=True)")
    parser.add_argument("--dla", default="suffix", choices=("suffix", "straddle"))
    parser.add_argument("--dbc", default="per_head", choices=("per_head", "shared"))
    args = parser.parse_args()
    shared = args.dbc == "shared"
    if shared and args.decay == "scalar" and args.dla != "straddle":
        parser.error("--dbc shared needs --dla straddle (as chunked_bwd)")
    straddle = args.dla == "straddle" and args.decay == "scalar"
    source = "\n\n".join(
        render_stage(name, **ctx)
        for name, ctx in (
            ("seq_tiles", {}),
            ("adjoint", {}),
            ("chunked_bwd", {"decay": args.decay}),
        )
    )
    module = load_source(HEADER + source, f"compile_bwd_{args.decay}")
    bf, f32 = "*bf16", "*fp32"
    base = {
        "HAS_DECAY": args.decay == "scalar",
        "DOT_DTYPE": tl.bfloat16,
        "DOT_PRECISION": "ieee",
        "CHUNK": args.chunk,
    }
    walk = {
        "key": bf,
        "value": bf,
        "s": f32,
        "log_a": f32,
        "states": bf,
        "tiles": "*i64",
        "first": "*i64",
        "initial": f32,
        "final": f32,
        "fwd_states": bf,
        "boundary": f32,
    }
    for reverse in (False, True):
        consts = {
            **base,
            "REVERSE": reverse,
            "HAS_S": not reverse,
            "HAS_INITIAL": True,
            "HAS_FINAL": True,
            "BLOCK_T": 64,
            "BLOCK_N": 64,
            "BLOCK_P": 64,
            "HAS_BOUNDARY": reverse,
            "BOUNDARY_NEXT": 0 if straddle else 1,
            "EXACT_TAIL": straddle,
        }
        usage = resources(module.chunked_bwd_walk_kernel, walk, consts, 4, args.arch)
        print(f"chunked_bwd_walk reverse={reverse} warps=4: {usage}")
    dbc = {
        "x": bf,
        "s": f32,
        "log_a": f32,
        "B": bf,
        "C": bf,
        "dy": bf,
        "states": bf,
        "tiles": "*i64",
        "grad": f32,
        "dcs": f32,
        "diag": f32,
    }
    for want_db in (False, True):
        consts = {
            **base,
            "WANT_DB": want_db,
            "HAS_S": True,
            "BLOCK_M": 64,
            "BLOCK_N": 64,
            "BLOCK_P": 64,
            "CC_STORED": args.stored_cc,
            "DCS_INTER": straddle,
            "INTRA": not shared,
        }
        usage = resources(module.chunked_bwd_dbc_kernel, dbc, consts, 8, args.arch)
        print(f"chunked_bwd_dbc {'dB' if want_db else 'dC'} warps=8: {usage}")
    if shared:
        w = {"x": bf, "s": f32, "log_a": f32, "dy": bf, "tiles": "*i64", "w": bf}
        consts = {**base, "HAS_S": True, "BLOCK_M": 64, "BLOCK_P": 64, "CC_STORED": args.stored_cc}
        for warps in (4, 8):
            usage = resources(module.chunked_bwd_w_kernel, w, consts, warps, args.arch)
            print(f"chunked_bwd_w warps={warps}: {usage}")
        wbc = {"w": bf, "other": bf, "tiles": "*i64", "grad": f32}
        for transpose in (False, True):
            consts = {k: base[k] for k in ("DOT_DTYPE", "DOT_PRECISION", "CHUNK")}
            consts |= {"TRANSPOSE": transpose, "BLOCK_M": 64, "BLOCK_N": 64}
            for warps in (4, 8):
                usage = resources(module.chunked_bwd_wbc_kernel, wbc, consts, warps, args.arch)
                print(f"chunked_bwd_wbc {'dB' if transpose else 'dC'} warps={warps}: {usage}")
    dx = {
        "x": bf,
        "s": f32,
        "log_a": f32,
        "B": bf,
        "C": bf,
        "dy": bf,
        "adj_states": bf,
        "tiles": "*i64",
        "dx": bf,
        "ds": f32,
    }
    consts = {**base, "HAS_S": True, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_P": 64,
              "CC_STORED": args.stored_cc}
    print(
        f"chunked_bwd_dx warps=8: {resources(module.chunked_bwd_dx_kernel, dx, consts, 8, args.arch)}"
    )
    if straddle:
        dla = {
            "x": bf,
            "s": f32,
            "log_a": f32,
            "B": bf,
            "C": bf,
            "dy": bf,
            "tiles": "*i64",
            "uv": f32,
            "bnd": f32,
            "part": f32,
        }
        consts = {k: base[k] for k in ("DOT_DTYPE", "DOT_PRECISION", "CHUNK")}
        consts |= {"HAS_S": True, "BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_P": 32}
        usage = resources(module.chunked_bwd_dla_kernel, dla, consts, 8, args.arch)
        print(f"chunked_bwd_dla warps=8: {usage}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
