"""Kernels compiled for an H100 (sm_90) on a machine without a GPU, through Triton's front end
and ptxas from its wheel: the interpreter runs a kernel without checking what the compiler
checks (a loop-carried variable keeping its type), so tile shapes the interpreter accepts can
still fail to compile on the GPU. One subprocess, without TRITON_INTERPRET."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

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
                          BLOCK_I=block_i, BLOCK_J=block_j, BLOCK_N=16, BLOCK_P=16,
                          ACC_DTYPE=tl.float32)
            signature = {n: "constexpr" if n in consts else pointers.get(n, "i32")
                         for n in names}
            constexprs = {(names.index(k),): v for k, v in consts.items()}
            source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
            try:
                triton.compile(source, target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": 4})
            except Exception as exc:
                failures.append(f"{decay} {block_i}x{block_j}: {str(exc).splitlines()[-1]}")
    print("\\n".join(failures) or "ok")
    sys.exit(1 if failures else 0)
    """
)


def _has_ptxas() -> bool:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return os.path.exists(tool)


def _compile_env() -> dict[str, str]:
    """The compiling subprocess's environment: no interpreter; with SSMC_SM90_TRITON set to a
    folder holding another Triton (`pip install --target DIR triton==3.6.0`, the GPU machine's),
    that Triton compiles, while the launches are still recorded under the installed one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    other = os.environ.get("SSMC_SM90_TRITON")
    if other:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [other, str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.mark.skipif(not _has_ptxas(), reason="the Triton wheel has no ptxas here")
def test_quadratic_tiles_of_unequal_sizes_compile_for_sm90() -> None:
    """BLOCK_I ≠ BLOCK_J, which no example launches at its default tiles (the autotuner's
    search does): the diagonal tile [BLOCK_I, BLOCK_I] and the earlier key tiles
    [BLOCK_I, BLOCK_J] are separate variables (one name for both failed on the H100:
    'Loop-carried variable b_L has initial type <32, 32> but is re-assigned to <32, 16>')."""
    env = _compile_env()
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]


# --------------------------------------------------------------------------------------
# Every kernel an example's op launches, compiled for sm_90 as it was launched
# --------------------------------------------------------------------------------------

EXAMPLE_DIMS = {
    "mamba2": {"H": 4, "G": 2, "N": 16, "P": 16},
    "mamba2_mha": {"H": 2, "N": 16, "P": 16},
    "mqa": {"H": 4, "G": 2, "N": 16, "P": 16},
    "retnet": {"H": 2, "N": 16, "P": 16},
    "linear_attention": {"H": 2, "N": 16, "P": 16},
    "gla": {"H": 2, "N": 4, "P": 16},
    "mamba1": {"H": 2, "N": 4},
    "s4d": {"H": 4, "N": 8},
    "toeplitz": {"H": 2, "L": 8, "P": 16},
}
"""The examples whose launches are recorded (one op each; composites run these pieces)."""
MAMBA2_REAL = {"H": 2, "G": 1, "N": 128, "P": 64}
GLA_REAL = {"H": 2, "N": 128, "P": 128}
POINTER = {
    torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
    torch.float64: "*fp64", torch.int32: "*i32", torch.int64: "*i64", torch.bool: "*i1",
    torch.uint8: "*u8", torch.int8: "*i8",
}

COMPILE_RECORDED = textwrap.dedent(
    """
    import json, sys
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from ssmc.load import load_source

    SHARED_LIMIT = 232448  # bytes of shared memory a block may take on sm_90
    records = json.load(open(sys.argv[1]))
    modules, failures = {}, []
    for path, name, types, options in records:
        if path not in modules:
            modules[path] = load_source(open(path).read(), "m%d" % len(modules))
        kernel = getattr(modules[path], name)
        if not hasattr(kernel, "params"):  # the module's fast launcher around the JIT function
            kernel = kernel.fn
        signature, constexprs = {}, {}
        for i, param in enumerate(kernel.params):
            arg = types[param.name]
            value = arg["value"]
            if isinstance(value, dict):
                value = tl.dtype(value["dtype"])
            if param.is_constexpr or arg["type"] == "constexpr":
                signature[param.name] = "constexpr"
                constexprs[(i,)] = value
            else:
                signature[param.name] = arg["type"]
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        pointers = sorted({a["type"] for a in types.values() if a["type"].startswith("*f")})
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        except Exception as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            failures.append(f"{name} ({', '.join(pointers)}): "
                            f"{lines[-1] if lines else type(exc).__name__}")
            continue
        # what the launch would ask of the H100's and H200's shared memory (227 KB a block)
        if compiled.metadata.shared > SHARED_LIMIT:
            failures.append(f"{name} ({', '.join(pointers)}, {options}): "
                            f"{compiled.metadata.shared} bytes of shared memory")
    print(f"{len(records)} compiled, {len(failures)} failed")
    print("\\n".join(failures))
    sys.exit(1 if failures else 0)
    """
)


def _argument(value: object) -> dict[str, object]:
    """A launch argument's Triton type ("constexpr" where only its value can be) and value (a
    tl.dtype by its name)."""
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return {"type": POINTER[value.dtype], "value": None}
    if isinstance(value, tl.dtype):
        return {"type": "constexpr", "value": {"dtype": value.name}}
    if isinstance(value, bool):
        return {"type": "i1", "value": value}
    if isinstance(value, int):
        return {"type": "i64" if abs(value) >= 2**31 else "i32", "value": value}
    if isinstance(value, float):
        return {"type": "fp32", "value": value}
    if value is None or isinstance(value, str):
        return {"type": "constexpr", "value": value}
    return {"type": "constexpr", "value": repr(value)}


def _recording(module: Any, records: set[tuple[str, ...]], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Triton kernel of `module` wrapped: each launch's argument types are recorded
    (and it still runs)."""
    from triton.runtime.jit import KernelInterface

    path = module.__file__

    class Recorder:
        def __init__(self, name: str, kernel: Any) -> None:
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid: Any) -> Any:
            def launch(*args: Any, **kwargs: Any) -> Any:
                bound = {**dict(zip(self.kernel.arg_names, args, strict=False)), **kwargs}
                options = {k: bound.pop(k) for k in ("num_warps", "num_stages") if k in bound}
                types = {k: _argument(v) for k, v in bound.items()}
                records.add((path, self.name, json.dumps(types, sort_keys=True),
                             json.dumps(options, sort_keys=True)))
                return self.kernel[grid](*args, **kwargs)

            return launch

    for name in dir(module):
        value = getattr(module, name)
        # the launched kernels (the jit helpers they call are not launched)
        if isinstance(value, KernelInterface) and name.endswith("_kernel"):
            monkeypatch.setattr(module, name, Recorder(name, value))


def _exercise(name: str, dtype: torch.dtype, records: set[tuple[str, ...]],
              monkeypatch: pytest.MonkeyPatch, *, dims: dict[str, int] | None = None,
              seqlen: int = 40, forms: tuple[str, ...] | None = None,
              chunk_size: int | None = None, seq_splits: int | None = None) -> None:
    """Every form (or `forms`) of an example's op forward, and its backward, on random
    inputs: tiny ones, or `dims` and `seqlen`; `seq_splits`: the chunked forward's state walk
    cut so (the split a GPU picks for few long sequences; 1 under the interpreter)."""
    import ssmc
    from ssmc.pipeline import parse_file, with_dims
    from ssmc.reference import random_inputs

    checked = with_dims(parse_file(ROOT / "examples" / f"{name}.ssm"), dims or EXAMPLE_DIMS[name])
    op = ssmc.load(checked)
    _recording(op.module, records, monkeypatch)
    if seq_splits is not None:
        monkeypatch.setattr(op.module, "walk_splits", lambda *a, **k: seq_splits)
    drawn = random_inputs(checked, batch=2, seqlen=seqlen,
                          generator=torch.Generator().manual_seed(0))
    params = {t.name for t in checked.spec.tensors if t.kind.name == "PARAM"}
    inputs = {k: v.to(dtype if k not in params and k != "initial_state" else torch.float32)
              for k, v in drawn.items()}
    init = inputs.pop("initial_state", None)
    for form in forms or op.forms:
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
        y, _ = op(**leaves, initial_state=init, form=form, chunk_size=chunk_size)
        y.float().sum().backward()
    walk = getattr(op.module, "final_state_from_zero", None)  # context parallelism's state pass
    if walk is not None and (forms is None or "chunked" in forms):
        with torch.no_grad():
            walk(**inputs, chunk_size=chunk_size, launch={"seq_splits": seq_splits})


@pytest.mark.skipif(not _has_ptxas(), reason="the Triton wheel has no ptxas here")
def test_every_kernel_an_example_launches_compiles_for_sm90(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each example's op, every form forward and backward (fp32; Mamba-2 in fp16, Mamba-2,
    GLA and Mamba-1 in bf16, GLA in fp64, whose backward takes the three-SMA path; the chunked
    form of Mamba-2 and GLA at their real head sizes in bf16), with every kernel launch's
    argument types
    and constexprs recorded; then each distinct launch compiled for sm_90 in a process
    without the interpreter, which checks what the interpreter does not (the two faults the
    H100 found in the eleventh session: docs/gpu-runs.md)."""
    records: set[tuple[str, ...]] = set()
    for name in EXAMPLE_DIMS:
        _exercise(name, torch.float32, records, monkeypatch)
    _exercise("mamba2", torch.float16, records, monkeypatch)
    for name in ("mamba2", "gla", "mamba1"):  # bf16: the dtype these run in on the GPU
        _exercise(name, torch.bfloat16, records, monkeypatch)
    _exercise("gla", torch.float64, records, monkeypatch)
    # the GPU's own tiles: Mamba-2 2.7B's head sizes at chunk 128 (the fused W + dlog a
    # launch, 64-row blocks, N 128, P 64) and GLA's at its benchmark's N = P = 128
    _exercise("mamba2", torch.bfloat16, records, monkeypatch, dims=MAMBA2_REAL, seqlen=256,
              forms=("chunked",), chunk_size=128)
    _exercise("mamba2", torch.bfloat16, records, monkeypatch, dims=MAMBA2_REAL, seqlen=256,
              forms=("chunked",), chunk_size=128, seq_splits=2)
    _exercise("linear_attention", torch.float32, records, monkeypatch, forms=("chunked",),
              chunk_size=16, seq_splits=2)
    _exercise("gla", torch.bfloat16, records, monkeypatch, dims=GLA_REAL, seqlen=128,
              forms=("chunked",))
    _exercise("gla", torch.bfloat16, records, monkeypatch, dims=GLA_REAL, seqlen=128,
              forms=("chunked",), seq_splits=2)
    assert len({record[1] for record in records}) >= 20, sorted({r[1] for r in records})
    _compile_recorded(records, tmp_path)


@pytest.mark.skipif(not _has_ptxas(), reason="the Triton wheel has no ptxas here")
def test_fp64_at_real_head_sizes_compiles_for_sm90(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp64 inputs at Mamba-2 2.7B's and GLA's head sizes, every form forward and backward:
    the tiles sized for 16-bit inputs took twice the shared memory in fp64 and did not fit
    the H200's 227 KB (scripts/gpu_fp64_probe.py, docs/gpu-runs.md, eighteenth session)."""
    records: set[tuple[str, ...]] = set()
    _exercise("mamba2", torch.float64, records, monkeypatch, dims=MAMBA2_REAL, seqlen=128)
    _exercise("gla", torch.float64, records, monkeypatch, dims=GLA_REAL, seqlen=128)
    _compile_recorded(records, tmp_path)


def _compile_recorded(records: set[tuple[str, ...]], tmp_path: Path) -> None:
    """Compile each recorded launch for sm_90 in a process without the interpreter; every
    one must compile and fit the shared memory of a block."""
    rows = [[path, name, json.loads(types), json.loads(options)]
            for path, name, types, options in sorted(records)]
    listing = tmp_path / "launches.json"
    listing.write_text(json.dumps(rows))
    env = _compile_env()
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_RECORDED, str(listing)],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
