"""`ssmc run`: compile a spec, run it on random inputs, compare with the fp64 reference, time it."""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ssmc import ir
from ssmc.errors import SsmcError
from ssmc.pipeline import parse_file, with_dims

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# DESIGN §5 bounds on ‖out − ref‖ / ‖ref‖ (fp32 dots run in IEEE precision, not tf32).
BOUNDS = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RunReport:
    """What `ssmc run` measured."""

    spec: str
    path: str
    form: str
    shape: str
    errors: Mapping[str, float]
    bound: float
    seconds: float

    @property
    def ok(self) -> bool:
        return all(e <= self.bound for e in self.errors.values())

    def __str__(self) -> str:
        errors = ", ".join(f"{name} {err:.2e}" for name, err in self.errors.items())
        verdict = "ok" if self.ok else f"FAILED (bound {self.bound:.0e})"
        return (f"{self.spec}: {self.shape}\n"
                f"  ran      {self.form} form via {self.path}\n"
                f"  error    ‖out − ref‖/‖ref‖ vs fp64 reference: {errors} → {verdict}\n"
                f"  time     {self.seconds * 1e3:.3f} ms per call")


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64 (NaN anywhere gives inf)."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300))


def run_spec(path: str | Path, *, seqlen: int, batch: int, dims: Mapping[str, int] | None = None,
             form: str | None = None, chunk_size: int | None = None, dtype: str = "float32",
             device: str | None = None) -> RunReport:
    """Compile and run `path` once on random inputs; raise SsmcError if it misses its bound."""
    from ssmc.load import load
    from ssmc.reference import random_inputs, reference

    checked = with_dims(parse_file(path), dims or {})
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = DTYPES[dtype]
    if device == "cpu" and torch_dtype is torch.bfloat16:
        raise SsmcError("bf16 needs a GPU: the Triton interpreter has no bf16")
    generator = torch.Generator().manual_seed(0)
    inputs64 = random_inputs(checked, batch=batch, seqlen=seqlen, generator=generator)
    inputs = {k: _cast(v, torch_dtype).to(device) for k, v in inputs64.items()}

    op = load(checked)
    call = functools.partial(op, **inputs, form=form, chunk_size=chunk_size)
    started = time.perf_counter()
    y, state = call()
    if device == "cuda":
        torch.cuda.synchronize()
        seconds = _cuda_time(call)
    else:
        seconds = time.perf_counter() - started

    y_ref, state_ref = reference(checked, None)(**inputs64)
    errors = {checked.spec.output.name: relative_error(y.cpu(), y_ref)}
    if state is not None and state_ref is not None:
        errors["final_state"] = relative_error(state.cpu(), state_ref)
    bound = BOUNDS[torch_dtype]
    report = RunReport(
        spec=checked.spec.name,
        path=_path_taken(device),
        form=str(getattr(op, "last_form", None) or form or "planned"),
        shape=f"batch {batch} × seqlen {seqlen}, {dtype}, " + _dims_text(checked),
        errors=errors,
        bound=bound,
        seconds=seconds,
    )
    if not report.ok:
        raise SsmcError(str(report))
    return report


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _path_taken(device: str) -> str:
    if device == "cuda":
        return "Triton kernels on " + torch.cuda.get_device_name()
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "Triton kernels under the interpreter (TRITON_INTERPRET=1)"
    return "the PyTorch reference (no GPU; set TRITON_INTERPRET=1 to run the kernels)"


def _cuda_time(call: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")) / 1e3


def _dims_text(checked: ir.CheckedSpec) -> str:
    return ", ".join(f"{d.name}={d.value}" for d in checked.spec.dims if d.value is not None)
