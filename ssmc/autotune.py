"""autotune: time the forms, chunks and launch options of a spec on this device; keep the best.

`autotune(spec, batch=, seqlen=, dims=)` loads the spec's op, draws random inputs, computes
the fp64 reference once, then tries candidates (ssmc.autotune_space): every form the
module has at its default tiles (the chunked form at Q = 64, 128, 256), then, from the
fastest of each form, one launch option at a time (coordinate search), keeping a change
only when it is faster. Every candidate first runs once on outputs poisoned with NaN and
is compared with the reference: one beyond its dtype's bound (DESIGN §5), or one that
fails to compile or launch, is rejected and cannot win. The winner is stored in the
autotune cache (ssmc.autotune_cache), where the op finds it for every call in the same
shape bucket. On the CPU (TRITON_INTERPRET=1) the same path runs on tiny shapes with the
default tiles only, so CI can test it end to end.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ssmc import ir
from ssmc.autotune_bench import DTYPES, Bench, Timer
from ssmc.autotune_bench import timer as bench_timer
from ssmc.autotune_cache import Key, Winner, make_key, record
from ssmc.autotune_space import (
    CHUNKS,
    Candidate,
    backward_knob_values,
    base_candidates,
    knob_values,
)
from ssmc.cost_terms import Shape
from ssmc.errors import SsmcError


class AutotuneError(SsmcError, ValueError):
    """Autotuning cannot run here (no GPU nor interpreter, bad shape) or found no candidate."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Trial:
    """One candidate's outcome: its time when it agreed with the reference, else why not."""

    candidate: Candidate
    time_s: float | None
    error: float | None
    rejected: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """The winner, the planner's choice measured beside it, and every trial."""

    key: Key
    winner: Winner
    planner: Candidate
    trials: tuple[Trial, ...]
    path: Path | None
    """The cache file the winner was stored in (None when not stored)."""
    shape: Mapping[str, Any] = field(default_factory=dict)
    backward_trials: tuple[Trial, ...] = ()
    """The backward's trials (its fused launcher's options), when it was tuned."""
    backward_note: str = ""
    """Why the backward was not tuned, when it was asked for and could not be."""

    @property
    def ratio(self) -> float | None:
        """Planner's measured time / best measured time (1.0 when the planner picked best)."""
        if self.winner.planner_time_s is None:
            return None
        return self.winner.planner_time_s / self.winner.time_s

    def table(self) -> str:
        """One line per trial, fastest first, then the winner against the planner."""
        lines = _trial_lines(self.trials, _candidate_of(self.winner))
        ratio = self.ratio
        planner = f"planner's {self.planner}: " + (
            "not measured" if ratio is None else _fmt(self.winner.planner_time_s).strip()
        )
        best = f"best {_candidate_of(self.winner)}: {_fmt(self.winner.time_s).strip()}"
        lines.append(best + "; " + planner + ("" if ratio is None else f" ({ratio:.2f}×)"))
        if self.backward_trials:
            lines.append("backward:")
            tuned = dict(self.winner.backward)
            stage = self.backward_trials[0].candidate.form
            chosen = Candidate(form=stage, launch=tuple(sorted(tuned.items())))
            lines += _trial_lines(self.backward_trials, chosen)
            default = self.winner.backward_default_time_s
            speedup = "" if not default or not self.winner.backward_time_s else (
                f" ({default / self.winner.backward_time_s:.2f}× its defaults)"
            )
            lines.append(
                f"best backward {tuned or 'defaults'}: "
                f"{_fmt(self.winner.backward_time_s).strip()}{speedup}"
            )
        elif self.backward_note:
            lines.append(f"backward not tuned: {self.backward_note}")
        return "\n".join(lines)


def autotune(
    spec: ir.CheckedSpec | str | os.PathLike[str],
    *,
    batch: int,
    seqlen: int,
    dims: Mapping[str, int] | None = None,
    num_seqs: int = 1,
    dtype: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    candidates: Iterable[Candidate] | None = None,
    search: bool | None = None,
    store: bool = True,
    progress: bool = True,
    timer: Timer | None = None,
    seed: int = 0,
    backward: bool = False,
    backward_candidates: Iterable[Candidate] | None = None,
) -> Result:
    """Tune `spec` at one call shape on the present device and store the winner.

    dims: call-time dims (and rebound spec dims); num_seqs > 1 packs that many uneven
    sequences with cu_seqlens (batch 1). dtype: of the per-token inputs (default bf16 on
    a GPU, fp32 under the interpreter). candidates: try exactly these (default: every form
    at default tiles, chunked at 64/128/256, or 16/32 under the interpreter); search: vary
    launch options one at a time from each form's best (default: on a GPU only).
    timer(candidate, call) → seconds replaces the CUDA-event timing (tests).
    backward: also tune the fused backward's launcher (the module's BACKWARD_STAGE) for the
    forward's winner: its defaults, then (with search) one option at a time, each candidate's
    gradients checked against fp64 autograd through the reference first; the winner's options
    are stored with the forward's and the op's backward runs them. backward_candidates: try
    exactly these (Candidate(form=BACKWARD_STAGE, launch=...)); implies backward.
    """
    from ssmc.devices import detect
    from ssmc.plan import plan

    device = _device()
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    if dtype not in DTYPES:
        raise AutotuneError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if device == "cpu" and dtype == "bfloat16":
        raise AutotuneError("bf16 needs a GPU: the Triton interpreter has no bf16")
    checked, call_dims = _checked(spec, dims or {}, cache_dir)
    if checked.pieces:
        raise AutotuneError("composite masks (mask algebra) run several ops: tune each piece")
    shape = Shape(
        batch=batch,
        seqlen=seqlen,
        dims=call_dims,
        dtype_bytes=DTYPES[dtype].itemsize,
        num_seqs=num_seqs,
    )
    module = _module(checked, cache_dir)
    forms = tuple(module.FORMS)
    if not forms:
        raise AutotuneError(f"spec {checked.spec.name!r} has no form with kernels yet")
    bench = Bench(checked, module, shape, dtype, device, seed)
    planned = plan(checked, shape, device=detect())
    planner = _planner_candidate(planned.form.value, planned.chunk_size, forms)
    chunks = CHUNKS if device == "cuda" else (16, 32)
    todo = list(candidates) if candidates is not None else base_candidates(forms, chunks)
    if planner is not None and planner not in todo and candidates is None:
        todo.append(planner)
    timing = timer or bench_timer(device)
    tune = _Tuner(bench, timing, progress, len(todo))
    for c in todo:
        tune.trial(c)
    # the backward's search follows `search` when given, else runs on a GPU unless its
    # candidates are given (independently of the forward's)
    search_backward = search if search is not None else (
        device == "cuda" and backward_candidates is None
    )
    if search is None:
        search = device == "cuda" and candidates is None
    if search:
        for c in tune.best_per_form():
            tune.search(c, knob_values(checked, module, c, bench.sizes))
    tune.close()
    best = tune.best()
    if best is None:
        reasons = "; ".join(f"{t.candidate}: {t.rejected}" for t in tune.trials)
        raise AutotuneError(f"no candidate agreed with the fp64 reference ({reasons})")
    planner_trial = tune.done.get(planner) if planner is not None else None
    bwd: _BackwardOutcome | None = None
    note = ""
    if backward or backward_candidates is not None:
        stage = getattr(module, "BACKWARD_STAGE", None)
        if stage is None:
            note = "the module's backward runs no fused launcher (nothing to tune)"
        else:
            bwd = _tune_backward(
                bench, timing, progress, best.candidate, stage, backward_candidates,
                search_backward,
            )
    winner = Winner(
        form=best.candidate.form,
        chunk_size=best.candidate.chunk_size,
        launch=best.candidate.options,
        time_s=best.time_s or 0.0,
        planner_form=planned.form.value,
        planner_chunk=planned.chunk_size,
        planner_time_s=None if planner_trial is None else planner_trial.time_s,
        error=best.error or 0.0,
        **({} if bwd is None else bwd.winner_fields()),
    )
    key = make_key(checked, shape, dtype=dtype, varlen=num_seqs > 1)
    path = record(key, winner, cache_dir) if store else None
    return Result(
        key=key,
        winner=winner,
        planner=planner or Candidate(form=planned.form.value),
        trials=tuple(tune.trials),
        path=path,
        shape={"batch": batch, "seqlen": seqlen, "num_seqs": num_seqs, "dims": dict(call_dims)},
        backward_trials=() if bwd is None else bwd.trials,
        backward_note=note,
    )


@dataclass(frozen=True, slots=True)
class _BackwardOutcome:
    """The backward's best trial, its defaults' trial and every trial."""

    best: Trial
    default: Trial | None
    trials: tuple[Trial, ...]

    def winner_fields(self) -> dict[str, Any]:
        return {
            "backward": self.best.candidate.options,
            "backward_time_s": self.best.time_s,
            "backward_default_time_s": None if self.default is None else self.default.time_s,
            "backward_error": self.best.error,
        }


def _tune_backward(
    bench: Bench,
    timer: Timer,
    progress: bool,
    forward: Candidate,
    stage: str,
    candidates: Iterable[Candidate] | None,
    search: bool,
) -> _BackwardOutcome:
    """The fused backward's launcher options for a forward run as `forward`: its defaults,
    then one option at a time (search), or exactly `candidates`; each checked first."""
    default = Candidate(form=stage)
    todo = list(candidates) if candidates is not None else [default]
    tune = _Tuner(bench, timer, progress, len(todo), backward_of=forward, desc="backward")
    for c in todo:
        tune.trial(c)
    if search and candidates is None:
        tune.search(default, backward_knob_values(bench.module, bench.sizes))
    tune.close()
    best = tune.best()
    if best is None:
        reasons = "; ".join(f"{t.candidate}: {t.rejected}" for t in tune.trials)
        raise AutotuneError(f"no backward candidate agreed with the fp64 reference ({reasons})")
    return _BackwardOutcome(best=best, default=tune.done.get(default), trials=tuple(tune.trials))


class _Tuner:
    """Runs trials once each (cached by candidate), with a progress bar."""

    def __init__(
        self,
        bench: Bench,
        timer: Timer,
        progress: bool,
        total: int,
        backward_of: Candidate | None = None,
        desc: str = "autotune",
    ) -> None:
        from tqdm import tqdm

        self.bench, self.timer = bench, timer
        self.backward_of = backward_of
        """The forward's candidate when the trials are of the backward's launcher."""
        self.trials: list[Trial] = []
        self.done: dict[Candidate, Trial] = {}
        self.bar = tqdm(total=total, disable=not progress, unit="cfg", desc=desc)

    def _error(self, c: Candidate) -> float:
        if self.backward_of is not None:
            return self.bench.backward_error(c, self.backward_of)
        return self.bench.error(c)

    def _call(self, c: Candidate) -> Any:
        if self.backward_of is not None:
            return self.bench.backward_call(c, self.backward_of)
        return self.bench.call(c)

    def trial(self, c: Candidate) -> Trial:
        if c in self.done:
            return self.done[c]
        self.bar.set_postfix_str(str(c)[:60])
        try:
            err = self._error(c)
            if not err <= self.bench.bound:
                result = Trial(
                    candidate=c,
                    time_s=None,
                    error=err,
                    rejected=f"error {err:.2e} > bound {self.bench.bound:.0e}",
                )
            else:
                result = Trial(candidate=c, time_s=self.timer(c, self._call(c)), error=err)
        except Exception as exc:  # a candidate that does not compile or launch loses
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            result = Trial(candidate=c, time_s=None, error=None, rejected=message[:200])
        self.done[c] = result
        self.trials.append(result)
        self.bar.update(1)
        return result

    def search(self, start: Candidate, knobs: Mapping[str, tuple[Any, ...]]) -> None:
        """From `start`, one option at a time: keep each value that is faster."""
        self.bar.total += sum(len(v) for v in knobs.values())
        self.bar.refresh()
        best = self.done[start]
        for name, values in knobs.items():
            for value in values:
                trial = self.trial(best.candidate.with_option(name, value))
                if trial.time_s is not None and trial.time_s < (best.time_s or float("inf")):
                    best = trial

    def best_per_form(self) -> list[Candidate]:
        forms: dict[str, Trial] = {}
        for t in self.trials:
            if t.time_s is None:
                continue
            held = forms.get(t.candidate.form)
            if held is None or t.time_s < (held.time_s or float("inf")):
                forms[t.candidate.form] = t
        return [t.candidate for t in forms.values()]

    def best(self) -> Trial | None:
        ok = [t for t in self.trials if t.time_s is not None]
        return min(ok, key=lambda t: t.time_s or 0.0) if ok else None

    def close(self) -> None:
        self.bar.close()


def _device() -> str:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    raise AutotuneError(
        "autotune times the generated kernels: it needs a GPU, or TRITON_INTERPRET=1 to run "
        "them on the CPU (tiny shapes only)"
    )


def _checked(
    spec: ir.CheckedSpec | str | os.PathLike[str],
    dims: Mapping[str, int],
    cache_dir: str | os.PathLike[str] | None,
) -> tuple[ir.CheckedSpec, dict[str, int]]:
    """The checked spec with its bound dims rebound where `dims` says, and the call-time dims."""
    from ssmc.load import as_checked
    from ssmc.pipeline import with_dims

    checked = as_checked(spec, cache_dir=cache_dir)
    declared = {d.name: d.value for d in checked.spec.dims}
    unknown = sorted(set(dims) - set(declared))
    if unknown:
        raise AutotuneError(
            f"no dim named {', '.join(unknown)}; dims of {checked.spec.name}: "
            + ", ".join(declared)
        )
    rebound = {k: v for k, v in dims.items() if declared[k] is not None and declared[k] != v}
    call_time = {k: v for k, v in dims.items() if declared[k] is None}
    missing = sorted(k for k, v in declared.items() if v is None and k not in call_time)
    if missing:
        raise AutotuneError("dims bound at call time need values: " + ", ".join(missing))
    return with_dims(checked, rebound), call_time


def _module(checked: ir.CheckedSpec, cache_dir: str | os.PathLike[str] | None) -> Any:
    from ssmc.load import load

    return load(checked, cache_dir=cache_dir).module


def _planner_candidate(form: str, chunk: int, forms: tuple[str, ...]) -> Candidate | None:
    if form not in forms:
        return None
    return Candidate(form=form, chunk_size=chunk if form == "chunked" else None)


def _candidate_of(w: Winner) -> Candidate:
    return Candidate(form=w.form, chunk_size=w.chunk_size, launch=tuple(sorted(w.launch.items())))


def _trial_lines(trials: tuple[Trial, ...], chosen: Candidate) -> list[str]:
    """One line per trial: the timed ones fastest first (→ marks `chosen`), then the
    rejected ones with why."""
    ok = sorted((t for t in trials if t.time_s is not None), key=lambda t: t.time_s or 0)
    lines = [
        f"{'→' if t.candidate == chosen else ' '} {_fmt(t.time_s)}  err {t.error:.1e}  "
        f"{t.candidate}"
        for t in ok
    ]
    lines += [f"✗ rejected  {t.candidate}: {t.rejected}" for t in trials if t.time_s is None]
    return lines


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:8.3f} ms"
    return f"{seconds * 1e6:8.1f} µs"
