"""The generated backward at real sizes: gradients against fp64, peak memory and time against
mamba_ssm.

(a) Gradients: every example in every form its module has, bf16 at T = 4096 and fp32 at
    T = 2048 (and the Mamba-2 2.7B layer, bf16, batch 2, T = 2048): inputs rounded to the
    dtype, the fp64 PyTorch reference sees the same values; random upstream gradients of y
    and of the final state; every buffer the generated module allocates NaN-poisoned.
    Error ‖g − g_ref‖/‖g_ref‖ per gradient against DESIGN §5's bound of the dtype (10× for
    the tensors read by the decay: their gradients are suffix sums of differences).
(b) Memory: the Mamba-2 2.7B layer (H = 80, P = 64, N = 128, G = 1, bf16 x/z/B/C, fp32
    dt/A/dt_bias/D, batch 4, T = 4096). Inputs and the upstream gradient are allocated first;
    then torch.cuda.max_memory_allocated minus that baseline, for the forward (autograd on)
    and for forward + backward (the leaves' .grad kept), for ssmc and for mamba_ssm's
    `mamba_chunk_scan_combined` (optional: imported from the unpacked sdist as
    scripts/bench_ssd.py does). Also the median time of forward + backward of both.

--cpu runs the same code paths at tiny sizes under TRITON_INTERPRET=1 (fp32 and fp16: the
interpreter's bf16 dot is wrong), with a dispatch-mode tracker of live tensor bytes
standing in for the CUDA allocator's peak, so the script is known to run without a GPU.
Prints tables and writes JSON (to --json, or $OUT/backward.json). A full GPU run compiles
and checks ~70 (example, dtype, form) rows: split it over calls with --specs NAME...
(`--specs` alone: no gradient rows, the memory table only; --no-memory: no memory table).
"""

from __future__ import annotations

import os
import sys

if "--cpu" in sys.argv:  # before triton is imported anywhere
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
import weakref  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from ssmc import ir  # noqa: E402
from ssmc.load import load  # noqa: E402
from ssmc.pipeline import parse_file, with_dims  # noqa: E402
from ssmc.reference import random_inputs, reference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BOUNDS = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-5}
DECAY_FACTOR = 10
MAMBA_27B = {"H": 80, "P": 64, "N": 128, "G": 1}
# --cpu: tiny dims per example (as tests/test_backward.py)
TINY = {
    "mamba2": {"H": 4, "G": 2, "N": 16, "P": 16},
    "mamba2_mha": {"H": 2, "N": 16, "P": 16},
    "mka": {"H": 4, "G": 2, "N": 16, "P": 16},
    "mqa": {"H": 4, "G": 2, "N": 16, "P": 16},
    "retnet": {"H": 2, "N": 16, "P": 16},
    "linear_attention": {"H": 2, "N": 16, "P": 16},
    "gla": {"H": 2, "N": 4, "P": 16},
    "mamba1": {"H": 2, "N": 4},
    "s4d": {"H": 4, "N": 8},
    "lssl_hippo": {"H": 4, "N": 8},
    "toeplitz": {"H": 2, "L": 8, "P": 16},
}


# ---------------------------------------------------------------------------------------
# (a) gradients against fp64
# ---------------------------------------------------------------------------------------


class _PoisonTorch(types.SimpleNamespace):
    """torch for a generated module: every float buffer it allocates starts as NaN."""

    def __getattr__(self, name: str) -> object:
        return getattr(torch, name)

    @staticmethod
    def empty(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = torch.empty(*args, **kwargs)
        return out.fill_(math.nan) if out.is_floating_point() else out

    @staticmethod
    def empty_like(*args: Any, **kwargs: Any) -> torch.Tensor:
        out = torch.empty_like(*args, **kwargs)
        return out.fill_(math.nan) if out.is_floating_point() else out


def _decay_inputs(checked: ir.CheckedSpec) -> set[str]:
    """The tensors the decay (or a Toeplitz kernel) reads."""
    from ssmc.expr import refs

    mask = checked.spec.mask
    exprs = [getattr(mask, f, None) for f in ("log_a", "log_gamma")]
    if isinstance(mask, ir.Toeplitz) and isinstance(mask.kernel, ir.LtiKernel):
        exprs += [mask.kernel.A, mask.kernel.B, mask.kernel.C, mask.kernel.dt]
    return set().union(*(refs(e) for e in exprs if e is not None))


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖/‖want‖ in fp64 (inf for a non-finite element; ‖got − want‖ when want = 0)."""
    got64, want64 = got.double(), want.double()
    if not torch.isfinite(got64).all():
        return math.inf
    scale = want64.norm().item()
    diff = (got64 - want64).norm().item()
    return diff / scale if scale > 0 else diff


def gradient_cases(
    cpu: bool, quick: bool
) -> list[tuple[str, dict[str, int], int, int, torch.dtype]]:
    """(example, dims, batch, T, dtype) whose gradients are checked."""
    out = []
    names = sorted(p.stem for p in (ROOT / "examples").glob("*.ssm"))
    if cpu:
        for name in names:
            out.append((name, TINY.get(name, {}), 2, 37, torch.float32))
        out.append(("mamba2", TINY["mamba2"], 2, 37, torch.float16))
        return out
    long, short = (1024, 512) if quick else (4096, 2048)
    for name in names:
        out.append((name, {}, 2, long, torch.bfloat16))
        out.append((name, {}, 1, short, torch.float32))
    if not quick:
        out.append(("mamba2", MAMBA_27B, 2, 2048, torch.bfloat16))
    return out


def check_gradients(
    name: str, dims: dict[str, int], batch: int, T: int, dtype: torch.dtype, device: str
) -> list[dict[str, Any]]:
    """One row per form of the example's module: the error of every gradient."""
    spec = parse_file(ROOT / "examples" / f"{name}.ssm")
    if device == "cpu" and not dims:  # an example without tiny dims: every dim at most 8
        dims = {d.name: min(d.value, 8) for d in spec.spec.dims if d.value is not None}
    checked = with_dims(spec, dims)
    gen = torch.Generator().manual_seed(T + batch)
    drawn = random_inputs(checked, batch=batch, seqlen=T, generator=gen)
    params = {t.name for t in checked.spec.tensors if t.kind is ir.TensorKind.PARAM}
    # rounded to the dtype under test; parameters and states stay fp32 (as mamba_ssm's)
    inputs = {
        k: v.to(device, dtype if k not in params and k != "initial_state" else torch.float32)
        for k, v in drawn.items()
    }
    init = inputs.pop("initial_state", None)
    leaves64 = {k: v.double().requires_grad_() for k, v in inputs.items()}
    init64 = None if init is None else init.double().requires_grad_()
    y64, state64 = reference(checked)(**leaves64, initial_state=init64)
    dy = torch.randn(y64.shape, generator=gen).to(device)
    dstate = None if state64 is None else torch.randn(state64.shape, generator=gen).to(device)
    outs, grads = [y64], [dy.double()]
    if dstate is not None:
        outs.append(state64)
        grads.append(dstate.double())
    wrt = [*leaves64.values(), *([init64] if init64 is not None else [])]
    want = dict(
        zip([*leaves64, "initial_state"], torch.autograd.grad(outs, wrt, grads), strict=False)
    )
    del y64, state64, outs, leaves64, init64
    op = load(checked)
    op.module.torch = _PoisonTorch()  # every buffer the module allocates starts as NaN
    through_decay = _decay_inputs(checked)
    rows = []
    try:
        for form in op.forms:
            row: dict[str, Any] = {
                "spec": name,
                "dims": dims,
                "batch": batch,
                "T": T,
                "dtype": str(dtype).removeprefix("torch."),
                "form": form.value,
            }
            try:
                leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
                leaf_init = None if init is None else init.clone().requires_grad_()
                started = time.perf_counter()
                y, state = op(**leaves, initial_state=leaf_init, form=form.value)
                outputs, upstream = [y], [dy.to(y.dtype)]
                if state is not None and dstate is not None:
                    outputs.append(state)
                    upstream.append(dstate)
                torch.autograd.backward(outputs, upstream)
                if device == "cuda":
                    torch.cuda.synchronize()
                row["first_call_s"] = time.perf_counter() - started
                got = {k: v.grad for k, v in leaves.items()}
                if leaf_init is not None:
                    got["initial_state"] = leaf_init.grad
                errors, ok = {}, True
                for k, g in got.items():
                    err = math.inf if g is None else _error(g, want[k])
                    errors[k] = err
                    ok &= err <= BOUNDS[dtype] * (DECAY_FACTOR if k in through_decay else 1)
                row["errors"], row["ok"] = errors, ok
            except Exception as err:  # a failing form is a row of the report
                row["ok"] = False
                row["error"] = f"{type(err).__name__}: {err}"[:400]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        op.module.torch = torch
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------
# (b) peak memory and time at the 2.7B layer shape
# ---------------------------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """CPU stand-in for the CUDA allocator's peak: bytes of the live storages created under
    the mode (a storage counts from its first tensor until its last tensor dies)."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: dict[int, list[int]] = {}
        self.live = 0
        self.peak = 0

    def _drop(self, key: int) -> None:
        entry = self.refs.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self.refs[key]

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func.namespace == "ssmc":  # see inside ssmc's ops (the mode is off inside a call)
            with self:
                keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
                out = func.redispatch(keys, *args, **(kwargs or {}))
        else:
            out = func(*args, **(kwargs or {}))
        given = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        ids = {id(a) for a in given}
        # a view of a storage made before the mode (an input's) is no allocation
        older = {a.untyped_storage().data_ptr() for a in given}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and id(t) not in ids:
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key == 0 or (key in older and key not in self.refs):
                    continue
                if key not in self.refs:
                    self.refs[key] = [0, storage.nbytes()]
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                self.refs[key][0] += 1
                weakref.finalize(t, self._drop, key)
        return out


@contextmanager
def peak_bytes(device: str) -> Iterator[dict[str, int]]:
    """{"peak": bytes above the allocation at entry} of the block, filled on exit."""
    result: dict[str, int] = {}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["peak"] = torch.cuda.max_memory_allocated() - base
        result["held"] = torch.cuda.memory_allocated() - base
    else:
        with LiveBytes() as tracker:
            yield result
        result["peak"], result["held"] = tracker.peak, tracker.live


def layer_inputs(
    batch: int, T: int, dims: dict[str, int], device: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Random Mamba-2 layer inputs (never zeros), as scripts/bench_ssd.py draws them."""
    H, P, N, G = dims["H"], dims["P"], dims["N"], dims["G"]
    gen = torch.Generator(device=device).manual_seed(0)
    kw: dict[str, Any] = {"device": device, "generator": gen}
    return {
        "x": torch.randn(batch, T, H, P, dtype=dtype, **kw),
        "z": torch.randn(batch, T, H, P, dtype=dtype, **kw),
        "dt": torch.randn(batch, T, H, dtype=torch.float32, **kw) - 2.0,
        "B": torch.randn(batch, T, G, N, dtype=dtype, **kw),
        "C": torch.randn(batch, T, G, N, dtype=dtype, **kw),
        "A": -torch.rand(H, dtype=torch.float32, **kw) * 4 - 0.5,
        "dt_bias": torch.rand(H, dtype=torch.float32, **kw) * 0.5,
        "D": torch.randn(H, dtype=torch.float32, **kw),
    }


def import_mamba(source_dir: str | None) -> Callable[..., Any] | None:
    """mamba_ssm's `mamba_chunk_scan_combined` through ssmc.bench_peers' importer."""
    from ssmc.bench_peers import import_mamba as importer

    found, _version = importer(source_dir)
    return found


def measure(
    name: str,
    run: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    inputs: dict[str, torch.Tensor],
    device: str,
    timing: bool,
) -> dict[str, Any]:
    """Peak memory of forward and of forward + backward above inputs + upstream gradient,
    and the median ms of forward + backward."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    y = run(leaves)
    dy = torch.randn_like(y)
    torch.autograd.backward(y, dy)  # warm-up: every kernel compiled before measuring
    del y
    for v in leaves.values():
        v.grad = None
    row: dict[str, Any] = {"impl": name, "x_mib": inputs["x"].nbytes / 2**20}
    with peak_bytes(device) as fwd:
        y = run(leaves)
    row["fwd_peak_mib"] = fwd["peak"] / 2**20
    row["fwd_held_mib"] = fwd["held"] / 2**20
    del y
    with peak_bytes(device) as both:
        y = run(leaves)
        torch.autograd.backward(y, dy)
        del y
    row["fwd_bwd_peak_mib"] = both["peak"] / 2**20
    if timing and device == "cuda":
        import triton.testing

        def step() -> None:
            torch.autograd.backward(run(leaves), dy)

        row["fwd_bwd_ms"] = float(
            triton.testing.do_bench(
                step, warmup=10, rep=100, grad_to_none=list(leaves.values()), return_mode="median"
            )
        )
        row["fwd_ms"] = float(
            triton.testing.do_bench(lambda: run(leaves), warmup=10, rep=100, return_mode="median")
        )
    print(json.dumps(row), flush=True)
    return row


def memory_rows(
    cpu: bool, mamba_src: str | None, slices: list[int] | None = None
) -> list[dict[str, Any]]:
    """ssmc (and mamba_ssm when importable, on CUDA) at the 2.7B layer (--cpu: a tiny one);
    `slices`: also ssmc with each of these values of the module's _BACKWARD_SLICE (elements of
    y a backward pass handles at once)."""
    device = "cpu" if cpu else "cuda"
    dims = {"H": 4, "P": 16, "N": 16, "G": 1} if cpu else MAMBA_27B
    batch, T = (2, 64) if cpu else (4, 4096)
    dtype = torch.float16 if cpu else torch.bfloat16
    inputs = layer_inputs(batch, T, dims, device, dtype)
    op = load(with_dims(parse_file(ROOT / "examples" / "mamba2.ssm"), dims))
    shape = {"batch": batch, "T": T, **dims, "dtype": str(dtype).removeprefix("torch.")}
    rows = [
        {
            **shape,
            **measure("ssmc", lambda t: op(**t, form="chunked")[0], inputs, device, timing=not cpu),
        }
    ]
    default_slice = op.module._BACKWARD_SLICE
    for elements in slices or []:
        op.module._BACKWARD_SLICE = elements
        run = measure(
            f"ssmc slice={elements}", lambda t: op(**t, form="chunked")[0], inputs, device,
            timing=not cpu,
        )
        rows.append({**shape, "backward_slice": elements, **run})
    op.module._BACKWARD_SLICE = default_slice
    mamba = None if cpu else import_mamba(mamba_src)
    if mamba is not None:

        def run_mamba(t: dict[str, torch.Tensor]) -> torch.Tensor:
            out = mamba(
                t["x"],
                t["dt"],
                t["A"],
                t["B"],
                t["C"],
                chunk_size=256,
                D=t["D"],
                z=t["z"],
                dt_bias=t["dt_bias"],
                dt_softplus=True,
            )
            return out[0] if isinstance(out, tuple) else out

        rows.append({**shape, **measure("mamba_ssm", run_mamba, inputs, device, timing=True)})
    return rows


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cpu", action="store_true", help="tiny sizes under the interpreter")
    parser.add_argument("--quick", action="store_true", help="T = 1024/512, no 2.7B gradient case")
    parser.add_argument("--specs", nargs="*", default=None, help="only these examples")
    parser.add_argument("--no-memory", action="store_true", help="skip (b)")
    parser.add_argument("--mamba-src", default=None, help="unpacked mamba-ssm sdist folder")
    parser.add_argument(
        "--slices", type=int, nargs="*", default=None,
        help="memory table: also ssmc with these _BACKWARD_SLICE values (elements of y)",
    )
    parser.add_argument(
        "--json", default=None, help="default $OUT/backward.json or ./backward.json"
    )
    args = parser.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu")
    path = Path(args.json or Path(os.environ.get("OUT", ".")) / "backward.json")
    report: dict[str, Any] = {"gradients": [], "memory": []}
    for case in gradient_cases(args.cpu, args.quick):
        if args.specs is None or case[0] in args.specs:
            report["gradients"] += check_gradients(*case, device=device)
            path.write_text(json.dumps(report, indent=1))
    if not args.no_memory:
        report["memory"] = memory_rows(args.cpu, args.mamba_src, args.slices)
        path.write_text(json.dumps(report, indent=1))

    print(
        f"\n{'spec':<18}{'dims':<22}{'b':>2}{'T':>6} {'dtype':<9}{'form':<11}"
        f"{'worst gradient':<26}  ok"
    )
    for r in report["gradients"]:
        dims = ",".join(f"{k}={v}" for k, v in r["dims"].items()) or "spec"
        errors = r.get("errors", {})
        worst = max(errors, key=errors.get) if errors else "-"
        detail = f"{worst} {errors[worst]:.2e}" if errors else r.get("error", "")[:60]
        print(
            f"{r['spec']:<18}{dims[:21]:<22}{r['batch']:>2}{r['T']:>6} {r['dtype']:<9}"
            f"{r['form']:<11}{detail:<26}  {'yes' if r['ok'] else 'NO'}"
        )
    if report["memory"]:
        print(
            f"\n{'impl':<24}{'fwd peak MiB':>13}{'held MiB':>10}{'fwd+bwd peak MiB':>18}"
            f"{'(in |x|)':>9}{'fwd+bwd ms':>12}{'fwd ms':>9}   (peaks above inputs + dy)"
        )
        for r in report["memory"]:
            print(
                f"{r['impl']:<24}{r['fwd_peak_mib']:>13.1f}{r['fwd_held_mib']:>10.1f}"
                f"{r['fwd_bwd_peak_mib']:>18.1f}{r['fwd_bwd_peak_mib'] / r['x_mib']:>9.2f}"
                f"{r.get('fwd_bwd_ms', math.nan):>12.3f}{r.get('fwd_ms', math.nan):>9.3f}"
            )
    failed = [r for r in report["gradients"] if not r["ok"]]
    print(
        f"{len(report['gradients']) - len(failed)} gradient rows passed, {len(failed)} failed;"
        f" JSON: {path}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
