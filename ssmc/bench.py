"""`ssmc bench`: time a spec's op in every form it has, beside its peers, per sequence length.

For each (batch, T) the spec gets fresh random inputs (`ssmc.reference.random_inputs`,
cast to the bench dtype); every series — ssmc in each form, ssmc as the planner picks,
and each peer that applies (`ssmc.bench_peers`) — is first checked once against the fp64
reference on exactly those inputs (output, final state and, with `backward`, every
gradient: ‖out − ref‖/‖ref‖ against the DESIGN §5 bound of the dtype), then timed:
forward, and forward + backward when asked (`ssmc.bench_timing`: plain and CUDA-graph
medians, peak extra memory). The report is a dict (written as JSON) with the device,
versions, the measured roofline and each configuration's figures, including the floor
time of moving the call's inputs and outputs once at the measured copy bandwidth.

On a CPU the same run works at tiny sizes: dims above `CPU_DIM` shrink to it, fp32
(the Triton interpreter has no bf16), wall time only, peers skipped with a note.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ssmc import forms_torch, ir
from ssmc.bench_peers import PEERS, Case, PeerCall, load_peers
from ssmc.bench_timing import Timing, environment, measure, roofline
from ssmc.bind import bind
from ssmc.errors import SpecError, SsmcError
from ssmc.pipeline import parse_file, with_dims
from ssmc.reference import canonical_roles, decay_inputs, random_inputs, reference
from ssmc.run import BOUNDS, DTYPES, relative_error

_log = logging.getLogger(__name__)

GPU_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
GPU_TOKENS = 16384
"""Default batch·T on a GPU: the Mamba-2 2.7B layer benchmark of issue 5."""
CPU_SEQLENS = (16, 32)
CPU_DIM = 8
PLANNER = "planner"


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchConfig:
    """What to run; None means the device's default (see the module docstring)."""

    file: str
    seqlens: tuple[int, ...] | None = None
    batches: tuple[int, ...] | None = None
    tokens: int | None = None
    """batch = tokens // T for each T (overrides `batches`)."""
    dims: Mapping[str, int] = field(default_factory=dict)
    dtype: str = "bfloat16"
    backward: bool = False
    forms: tuple[str, ...] | None = None
    """Forms to time (and "planner"); default every form of the op, then the planner's."""
    peers: tuple[str, ...] = PEERS
    mamba_src: str | None = None
    device: str | None = None
    warmup_ms: int = 25
    rep_ms: int = 100
    cpu_reps: int = 3
    progress: bool = True
    seed: int = 0


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Check and time every series at every shape; the report (see `ssmc bench --help`)."""
    from ssmc.load import load

    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SsmcError("bench: --device cuda, but torch sees no CUDA GPU")
    notes: list[str] = []
    checked = _checked(config, device, notes)
    dtype = _dtype(config.dtype, device, notes)
    shapes = _shapes(config, device)
    if device.type == "cpu":
        notes.append("CPU: wall time of plain calls only (no CUDA graphs, no memory figures); "
                     + ("kernels under the Triton interpreter" if _interpreted() else
                        "the PyTorch reference runs (set TRITON_INTERPRET=1 for the kernels)"))
    op = load(checked)
    forms = _forms(config, [f.value for f in op.forms])
    peers = load_peers(list(config.peers), device, config.mamba_src)
    notes += peers.notes
    report: dict[str, Any] = {
        "spec": checked.spec.name,
        "file": str(config.file),
        **environment(device),
        "peer_versions": peers.versions,
        "dtype": str(dtype).removeprefix("torch."),
        "fp32_tensors": sorted(fp32_tensors(checked)) if dtype != torch.float32 else [],
        "dims": {d.name: d.value for d in checked.spec.dims},
        "backward": config.backward,
        "roofline": roofline(device),
        "notes": notes,
        "results": [],
    }
    _log.info("bench %s on %s: shapes %s, forms %s, peers %s", checked.spec.name,
              report["device"], shapes, forms, sorted(peers.found))
    steps = len(shapes) * (len(forms) + len(peers.found))
    with tqdm(total=steps, desc=f"bench {checked.spec.name}", unit="run",
              disable=None if config.progress else True) as bar:
        for batch, T in shapes:
            shape = _Shape(checked, batch, T, dtype, device, config)
            for form in forms:
                bar.set_postfix_str(f"T={T} ssmc {form}")
                report["results"].append(shape.ssmc(op, form, report["roofline"]))
                bar.update()
            for candidates in peers.calls(shape.case):
                bar.set_postfix_str(f"T={T} {candidates[0].series}")
                report["results"].append(shape.peer(candidates, report["roofline"]))
                bar.update()
            del shape
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return report


def failed(report: Mapping[str, Any]) -> list[str]:
    """The ssmc series that missed their error bound or raised (a peer's failure is only noted)."""
    return [f"{r['series']} at batch {r['batch']}, T {r['T']}: "
            + (r["error"] or f"error {r['max_rel_err']:.2e} > {r['bound']:.0e}")
            for r in report["results"] if r["kind"] == "ssmc" and not r["ok"]]


def _checked(config: BenchConfig, device: torch.device, notes: list[str]) -> ir.CheckedSpec:
    """The spec with --dim applied; on a CPU, dims above CPU_DIM shrink to it unless given."""
    checked = parse_file(config.file)
    dims = dict(config.dims)
    if device.type == "cpu":
        small = {d.name: CPU_DIM for d in checked.spec.dims
                 if d.value is not None and d.value > CPU_DIM and d.name not in dims}
        try:
            shrunk = with_dims(checked, {**small, **dims})
        except SpecError:
            small = {}
        else:
            if small:
                notes.append("CPU: dims shrunk to " + ", ".join(f"{k}={v}" for k, v in small.items()))
            return shrunk
    return with_dims(checked, dims)


def _dtype(name: str, device: torch.device, notes: list[str]) -> torch.dtype:
    if name not in DTYPES:
        raise SsmcError(f"bench: --dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if device.type == "cpu" and name == "bfloat16":
        notes.append("CPU: float32 instead of bfloat16 (the Triton interpreter has no bf16)")
        return torch.float32
    return DTYPES[name]


def _shapes(config: BenchConfig, device: torch.device) -> list[tuple[int, int]]:
    """(batch, T) pairs: each T with tokens // T, or the paired/broadcast --batch, or 1."""
    cuda = device.type == "cuda"
    seqlens = config.seqlens or (GPU_SEQLENS if cuda else CPU_SEQLENS)
    tokens = config.tokens or (GPU_TOKENS if cuda and not config.batches else None)
    if any(T < 1 for T in seqlens):
        raise SsmcError(f"bench: sequence lengths must be ≥ 1, got {seqlens}")
    if tokens:
        return [(max(1, tokens // T), T) for T in seqlens]
    batches = config.batches or (1,)
    if len(batches) == 1:
        batches = batches * len(seqlens)
    if len(batches) != len(seqlens) or any(b < 1 for b in batches):
        raise SsmcError(f"bench: give one batch size, or one per sequence length "
                        f"({len(seqlens)}), each ≥ 1; got {batches}")
    return list(zip(batches, seqlens, strict=True))


def _forms(config: BenchConfig, available: list[str]) -> list[str]:
    forms = list(config.forms or (*available, PLANNER))
    unknown = [f for f in forms if f not in (*available, PLANNER)]
    if unknown:
        raise SsmcError(f"bench: no form {', '.join(unknown)} for this spec; "
                        f"choose from {', '.join((*available, PLANNER))}")
    return forms


def fp32_tensors(checked: ir.CheckedSpec) -> frozenset[str]:
    """Tensors kept in fp32 whatever the bench dtype: params and what the decay reads (the
    way Mamba-2 is run: bf16 x, B, C, z; fp32 dt, A, dt_bias, D)."""
    params = {t.name for t in checked.spec.tensors if t.kind is ir.TensorKind.PARAM}
    return frozenset(params) | decay_inputs(checked.spec)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_REFERENCE_ELEMENTS = 1 << 27
"""fp64 elements of T·Q·H·P (y's size times the reference's chunk) that one pass of the
reference may cover: its autograd keeps tensors of about that size (T·Q·H·N for a diagonal
decay); GLA at batch 8 × T 2048, H 16, N = P = 128 asked for 16 GiB in one pass."""


def _reference_chunk(checked: ir.CheckedSpec, T: int, dims: Mapping[str, int]) -> int:
    """The fp64 reference's chunk at length T: at most 32 chunks keeps its autograd memory
    bounded at long T (64-token chunks at T = 16384 ran out). A diagonal decay holds a Q × Q
    mask per state dim (T·Q·H·N elements a row), so there Q also keeps one row of that within
    _REFERENCE_ELEMENTS (Q = T / 32 at T = 16384 asked for 137 GB with GLA's H = 16, N = 128)."""
    chunk = max(64, T // 32)
    if isinstance(checked.spec.mask, ir.DiagonalSemiseparable) and checked.state_size:
        N = checked.state_size if isinstance(checked.state_size, int) else dims[checked.state_size]
        H = math.prod(dims[d] if isinstance(d, str) else d for d in checked.spec.output.shape[2:3])
        while chunk > 16 and T * chunk * H * N > _REFERENCE_ELEMENTS:
            chunk //= 2
    return chunk


def _reference_by_rows(checked: ir.CheckedSpec, exact: Mapping[str, Tensor], grad_y: Tensor,
                       chunk: int, backward: bool
                       ) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """y, final state and (with `backward`) the gradients of the fp64 reference, computed a
    group of batch rows at a time: per-row tensors' gradients are joined, the others' summed."""
    spec = checked.spec
    per_row = {t.name for t in spec.tensors if t.shape and t.shape[0] == "batch"}
    batch, T = grad_y.shape[0], grad_y.shape[1]
    row = T * chunk * math.prod(grad_y.shape[2:])
    rows = max(1, min(batch, _REFERENCE_ELEMENTS // max(row, 1)))
    run = reference(checked, chunk_size=chunk)
    ys, states, parts = [], [], []
    for start in range(0, batch, rows):
        cut = slice(start, start + rows)
        leaves = {k: (v[cut] if k in per_row else v).clone().requires_grad_(backward)
                  for k, v in exact.items()}
        y, state = run(**leaves)
        ys.append(y.detach())
        states.append(None if state is None else state.detach())
        if backward:
            grads = torch.autograd.grad(y, list(leaves.values()), grad_y[cut].double(),
                                        allow_unused=True)
            parts.append(dict(zip(leaves, grads, strict=True)))
        del y, state, leaves
    grads_ref: dict[str, Tensor] = {}
    for name in parts[0] if parts else ():
        got = [p[name] for p in parts]
        if got[0] is None:
            continue
        grads_ref[name] = torch.cat(got) if name in per_row else torch.stack(got).sum(0)
    state_ref = None if states[0] is None else torch.cat(states)
    return torch.cat(ys), state_ref, grads_ref


class _Shape:
    """One (batch, T): the inputs, the fp64 reference (and its gradients), then each series."""

    def __init__(self, checked: ir.CheckedSpec, batch: int, T: int, dtype: torch.dtype,
                 device: torch.device, config: BenchConfig) -> None:
        self.checked, self.batch, self.T, self.config = checked, batch, T, config
        self.device, self.bound = device, BOUNDS[dtype]
        generator = torch.Generator().manual_seed(config.seed + T)
        drawn = random_inputs(checked, batch=batch, seqlen=T, dtype=torch.float32,
                              generator=generator)
        drawn.pop("initial_state", None)
        wide = fp32_tensors(checked)
        self.inputs = {k: v.to(device=device, dtype=torch.float32 if k in wide else dtype)
                       for k, v in drawn.items()}
        exact = {k: v.double() for k, v in self.inputs.items()}
        dims = bind(checked, exact)
        roles64 = canonical_roles(checked, exact, dims)
        self.case = Case(checked=checked, inputs=self.inputs, roles=_cast_roles(roles64))
        self.roles64 = roles64
        self.ref_chunk = _reference_chunk(checked, T, dims)
        self.output = checked.spec.output.name
        y_shape = (batch, T, *(dims[d] if isinstance(d, str) else d
                               for d in checked.spec.output.shape[2:]))
        self.grad_y = torch.randn(y_shape, generator=generator).to(device)
        self.y_ref, self.state_ref, self.grads_ref = _reference_by_rows(
            checked, exact, self.grad_y, self.ref_chunk, config.backward)
        self.io_bytes = (sum(t.nbytes for t in self.inputs.values())
                         + self.y_ref.numel() * _size(dtype))
        if self.state_ref is not None:
            self.io_bytes += self.state_ref.numel() * 4
        self._core: Tensor | None = None

    def core_ref(self) -> Tensor:
        """The fp64 core without skip and gate (what the generic peer mappings compute)."""
        if self._core is None:
            r = self.roles64
            assert r.B is not None and r.C is not None
            self._core, _ = forms_torch.chunked(
                r.x, r.log_a, r.B, r.C, r.H, chunk_size=self.ref_chunk
            )
        return self._core

    def row(self, series: str, kind: str, **fields: Any) -> dict[str, Any]:
        return {"series": series, "kind": kind, "batch": self.batch, "T": self.T,
                "tokens": self.batch * self.T, "io_MB": self.io_bytes / 1e6, "form": None,
                "fwd": None, "fwd_bwd": None, "errors": {}, "max_rel_err": None,
                "bound": self.bound, "ok": None, "error": None, "note": "", **fields}

    def ssmc(self, op: Any, form: str, roof: Mapping[str, float] | None) -> dict[str, Any]:
        """Check ssmc's op in `form` (or as planned) against fp64, then time it."""
        row = self.row(f"ssmc {form}", "ssmc", form=form, ok=False)
        call_form = None if form == PLANNER else form
        try:
            y, state = op(**self.inputs, form=call_form)
            row["form"] = op.last_form or form
            errors = {self.output: relative_error(y, self.y_ref)}
            if state is not None and self.state_ref is not None:
                errors["final_state"] = relative_error(state, self.state_ref)
            forward = functools.partial(op, **self.inputs, form=call_form)
            both = None
            if self.config.backward:
                names = list(self.grads_ref)
                leaves = {k: self.inputs[k].detach().clone().requires_grad_() for k in names}

                def both() -> tuple[Tensor | None, ...]:
                    y, _ = op(**{**self.inputs, **leaves}, form=call_form)
                    return torch.autograd.grad(y, list(leaves.values()), self.grad_y.to(y.dtype),
                                               allow_unused=True)

                for k, g in zip(names, both(), strict=True):
                    errors[f"d{k}"] = relative_error(g, self.grads_ref[k]) if g is not None \
                        else float("inf")
            row.update(self._errors(errors))
            self._time(row, forward, both, roof)
        except Exception as err:  # recorded in the report; the run goes on
            row["error"] = _describe(err)
            _log.warning("ssmc %s at batch %d, T %d failed: %s", form, self.batch, self.T,
                         row["error"])
        return row

    def peer(self, candidates: list[PeerCall], roof: Mapping[str, float] | None) -> dict[str, Any]:
        """The first mapping of a peer that matches the reference (or the last tried), timed."""
        row = self.row(candidates[0].series, "peer")
        for call in candidates:
            try:
                y = call.fn(*call.args)
                target = (self.y_ref if call.expected == "spec" else
                          self.core_ref() if call.expected == "core" else None)
                errors = {self.output: relative_error(y, target)} if target is not None else {}
                row.update(self._errors(errors), note=call.note, error=None)
                if row["ok"] is not False:
                    break
            except Exception as err:
                row.update(error=_describe(err), note=call.note)
        if row["error"] is None:
            forward = functools.partial(call.fn, *call.args)
            both = self._peer_backward(call) if self.config.backward else None
            try:
                self._time(row, forward, both, roof)
            except Exception as err:
                row["error"] = _describe(err)
        return row

    def _peer_backward(self, call: PeerCall) -> Callable[[], object]:
        leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in call.args]
        wanted = [a for a in leaves if a.requires_grad]

        def both() -> object:
            y = call.fn(*leaves)
            return torch.autograd.grad(y, wanted, self.grad_y.to(y.dtype), allow_unused=True)

        return both

    def _errors(self, errors: Mapping[str, float]) -> dict[str, Any]:
        if not errors:
            return {"errors": {}, "max_rel_err": None, "ok": None}
        worst = max(errors.values())
        return {"errors": dict(errors), "max_rel_err": worst, "ok": worst <= self.bound}

    def _time(self, row: dict[str, Any], forward: Callable[[], object],
              both: Callable[[], object] | None, roof: Mapping[str, float] | None) -> None:
        kw = {"warmup_ms": self.config.warmup_ms, "rep_ms": self.config.rep_ms,
              "cpu_reps": self.config.cpu_reps}
        fwd = measure(forward, self.device, **kw)
        row["fwd"] = fwd.as_dict()
        if both is not None:
            row["fwd_bwd"] = measure(both, self.device, **kw).as_dict()
        if roof:
            floor_ms = self.io_bytes / (roof["copy_GBps"] * 1e9) * 1e3
            row["floor_ms"] = floor_ms
            row["of_floor"] = floor_ms / _best(fwd)
        _log.info("%s at batch %d, T %d: %.4g ms, error %s", row["series"], self.batch, self.T,
                  _best(fwd), row["max_rel_err"])


def _cast_roles(roles: Any) -> Any:
    """The fp64 roles as fp32 (the peers' core inputs are cast from these)."""
    import dataclasses

    return dataclasses.replace(roles, **{
        f.name: getattr(roles, f.name).float() for f in dataclasses.fields(roles)
        if isinstance(getattr(roles, f.name), Tensor)
    })


def _best(t: Timing) -> float:
    return t.graph_ms if t.graph_ms is not None else t.plain_ms


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]
