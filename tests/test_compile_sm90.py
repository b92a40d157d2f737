"""Kernels compiled for an H100 (sm_90) on a machine without a GPU, through Triton's front end
and ptxas from its wheel: the interpreter runs a kernel without checking what the compiler
checks (a loop-carried variable keeping its type), so tile shapes the interpreter accepts can
still fail to compile on the GPU. One subprocess, without TRITON_INTERPRET."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ssmc.load import load_source
    from ssmc.render import render_stage

    HEADER = "import math\\nimport torch\\nimport triton\\nimport triton.language as tl\\n\\n"
    failures = []
    for decay in ("scalar", "none"):
        module = load_source(HEADER + render_stage("quadratic", decay=decay), f"q_{decay}")
        kernel = module.quadratic_fwd_kernel
        names = kernel.arg_names
        pointers = {n: "*fp32" for n in names[:8]}
        pointers["tiles"] = "*i32"
        for block_i, block_j in ((32, 16), (16, 32), (32, 32)):
            consts = dict(HAS_S=True, HAS_INITIAL=True, DOT_PRECISION="ieee",
                          BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_N=16, BLOCK_P=16)
            signature = {n: "constexpr" if n in consts else pointers.get(n, "i32")
                         for n in names}
            constexprs = {(names.index(k),): v for k, v in consts.items()}
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            try:
                triton.compile(source, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": 4})
            except Exception as exc:
                failures.append(f"{decay} {block_i}x{block_j}: {str(exc).splitlines()[-1]}")
    # the forward's state walk in fp64 (the fp64 backward's chunked forward) and in fp32
    module = load_source(HEADER + render_stage("chunked_state", decay="scalar"), "state")
    kernel = module.chunked_state_fwd_kernel
    names = kernel.arg_names
    for float_type, acc in (("*fp64", tl.float64), ("*fp32", tl.float32)):
        pointers = {n: float_type for n in names[:9]}
        pointers.update(tiles="*i32", first="*i32")
        consts = dict(HAS_S=True, HAS_INITIAL=True, HAS_FINAL=True, DOT_PRECISION="ieee",
                      CHUNK=32, BLOCK_T=16, BLOCK_N=16, BLOCK_P=16, ACC_DTYPE=acc)
        signature = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in names}
        constexprs = {(names.index(k),): v for k, v in consts.items()}
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        try:
            triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        except Exception as exc:
            failures.append(f"chunked_state {float_type}: {str(exc).splitlines()[-1]}")
    # the chunked scan's two kernels on fp64 tiles (C Bᵀ and the states kept in fp32, as
    # the launchers keep them) and on fp32 ones
    module = load_source(HEADER + render_stage("chunked_scan", decay="scalar"), "scan")
    for float_type, acc in (("*fp64", tl.float64), ("*fp32", tl.float32)):
        for kernel, pointers, consts in (
            (module.chunked_scan_cb_fwd_kernel,
             dict(B=float_type, C=float_type, cb="*fp32", tiles="*i32"),
             dict(DOT_PRECISION="ieee", CHUNK=32, BLOCK_M=16, BLOCK_N=16, ACC_DTYPE=acc)),
            (module.chunked_scan_fwd_kernel,
             dict(x=float_type, s=float_type, log_a=float_type, C=float_type, cb="*fp32",
                  states="*fp32", out=float_type, tiles="*i32"),
             dict(N=32, HEADS_PER_PROGRAM=1, HAS_S=True, DOT_PRECISION="ieee", PREFETCH=False,
                  CHUNK=32, BLOCK_M=16, BLOCK_N=16, BLOCK_P=16, ACC_DTYPE=acc)),
        ):
            names = kernel.arg_names
            signature = {n: "constexpr" if n in consts else pointers.get(n, "i32")
                         for n in names}
            constexprs = {(names.index(k),): v for k, v in consts.items()}
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            try:
                triton.compile(source, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": 4})
            except Exception as exc:
                failures.append(f"{kernel.fn.__name__} {float_type}: "
                                f"{str(exc).splitlines()[-1]}")
    print("\\n".join(failures) or "ok")
    sys.exit(1 if failures else 0)
    """
)


def _has_ptxas() -> bool:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(tool)


@pytest.mark.skipif(not _has_ptxas(), reason="the Triton wheel has no ptxas here")
def test_kernels_the_interpreter_accepts_compile_for_sm90() -> None:
    """The quadratic kernel at BLOCK_I ≠ BLOCK_J: the diagonal tile [BLOCK_I, BLOCK_I] and
    the earlier key tiles [BLOCK_I, BLOCK_J] are separate variables (one name for both failed
    on the H100: 'Loop-carried variable b_L has initial type <32, 32> but is re-assigned to
    <32, 16>'). The state walk and the chunked scan on fp64 tiles (the fp64 backward's
    chunked forward): their accumulators are fp64 (an fp32 one failed on the H100: the fp64
    dot re-assigned it as fp64)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
