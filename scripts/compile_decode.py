"""Compile the fused one-token decode kernel for a GPU on a machine without one.

Renders the module of an example spec (its decode stage with the prologue and output roles
fused, ssmc.decode_fusion) and runs triton.compile with GPUTarget("cuda", ARCH, 32) on
`decode_fwd_kernel` (TTIR → cubin with the wheel's ptxas), then prints its registers and
stack from `cuobjdump --dump-resource-usage`. Arguments are specialised as at run time for
contiguous tensors: strides of a last axis are the constant 1, other strides and pointers
16-divisible i32 / pointers. Usage: python scripts/compile_decode.py [--arch 90] [SPEC ...]
(default: examples/mamba2.ssm examples/mamba1.ssm), with bf16 per-token inputs and out.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: real JIT functions

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ssmc import ir  # noqa: E402
from ssmc.decode_fusion import decode_fusion  # noqa: E402
from ssmc.load import load_source  # noqa: E402
from ssmc.pipeline import parse_file  # noqa: E402
from ssmc.render import render_module  # noqa: E402


def compile_decode(path: Path, arch: int) -> str:
    """`REG:… STACK:…` of the fused decode kernel of the spec at `path` (bf16 inputs)."""
    checked = parse_file(path)
    fusion = decode_fusion(checked)
    if fusion is None:
        return "not fused (separate launches)"
    module = load_source(render_module(checked), f"compile_decode_{checked.spec.name}")
    kernel = module.decode_fwd_kernel
    spec = checked.spec
    N = next(d.value for d in spec.dims if d.name == checked.state_size) if isinstance(
        checked.state_size, str) else checked.state_size
    P = spec.output.shape[3]
    P = next(d.value for d in spec.dims if d.name == P) if isinstance(P, str) else P
    block_n = 1 << (N - 1).bit_length()
    block_p = min(1 << (P - 1).bit_length(), max(4, 8192 // block_n))
    warps = 4 if block_n * block_p >= 1024 else 2
    signature: dict[str, str] = {}
    consts: dict[str, Any] = {"HAS_S": False, "HAS_INDICES": False, "BLOCK_N": block_n,
                              "BLOCK_P": block_p}
    for t in fusion.tensors:
        decl = spec.tensors[t.position]
        per_token = decl.kind is ir.TensorKind.INPUT and decl.name != "dt"
        signature[t.ptr] = "*bf16" if per_token else "*fp32"
        for stride, d in t.strides:
            if d == len(decl.shape) - 1:
                consts[stride] = 1
            else:
                signature[stride] = "i32"
    for p, _ in fusion.dims:
        signature[p] = "fp32"
    signature.update(state_ptr="*fp32", out_ptr="*bf16", state_batch_indices_ptr="*i64")
    consts.update(stride_state_p=1, stride_out_p=1)
    names = kernel.arg_names
    full = {n: "constexpr" if n in consts else signature.get(n, "i32") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if full[n].startswith("*") or (full[n] == "i32" and "stride" in n or n.startswith("fs_"))}
    constexprs = {(names.index(k),): v for k, v in consts.items()}
    source = ASTSource(fn=kernel, signature=full, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps})
    import subprocess
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True,
                         text=True, check=True).stdout
    os.unlink(f.name)
    usage = " ".join(line.split("CONSTANT")[0].strip() for line in out.splitlines() if "REG" in line)
    return f"BLOCK_N={block_n} BLOCK_P={block_p} warps={warps}: {usage}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("specs", nargs="*", type=Path,
                        default=[ROOT / "examples" / "mamba2.ssm", ROOT / "examples" / "mamba1.ssm"])
    args = parser.parse_args()
    print(f"triton {triton.__version__}, sm_{args.arch}")
    for path in args.specs:
        print(f"{path.stem} decode_fwd_kernel {compile_decode(path, args.arch)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
