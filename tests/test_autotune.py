"""autotune under the Triton interpreter: every form timed and checked against fp64, a wrong or
failing candidate never wins, the winner is stored and the op runs it; the CLI."""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ssmc
from ssmc.autotune_cache import Winner, lookup, make_key, record
from ssmc.autotune_space import Candidate
from ssmc.cli import main
from ssmc.cost import Shape
from ssmc.pipeline import parse_file, with_dims

AT = importlib.import_module("ssmc.autotune")
EXAMPLES = Path(__file__).parent.parent / "examples"
SMALL = {"H": 2, "G": 1, "N": 16, "P": 16}

pytestmark = pytest.mark.interpret
cpu_only = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="the interpreter's path (CPU tensors, fp32, chunks 16-32); on a GPU the search "
    "runs at real sizes (scripts/gpu_autotune.py, tests/test_autotune_backward.py)",
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder per file: the module is rendered and loaded once."""
    return tmp_path_factory.mktemp("autotune")


@pytest.fixture(scope="module")
def mamba2() -> ssmc.CheckedSpec:
    return with_dims(parse_file(EXAMPLES / "mamba2.ssm"), SMALL)


def fake_timer(times: dict[Candidate, float]) -> Callable[[Candidate, Callable[[], object]], float]:
    """Seconds by candidate (1.0 for the rest), after running the call once."""

    def timer(c: Candidate, call: Callable[[], object]) -> float:
        call()
        return times.get(c, 1.0)

    return timer


@cpu_only
def test_every_form_is_timed_checked_and_the_fastest_stored(
    mamba2: ssmc.CheckedSpec, cache: Path
) -> None:
    result = ssmc.autotune(mamba2, batch=1, seqlen=32, cache_dir=cache, progress=False)
    tried = {(t.candidate.form, t.candidate.chunk_size) for t in result.trials}
    assert tried >= {("recurrent", None), ("quadratic", None), ("chunked", 16), ("chunked", 32)}
    assert all(t.time_s is not None and t.error is not None for t in result.trials)
    assert all(t.error < 1e-5 for t in result.trials if t.error is not None)
    fastest = min(result.trials, key=lambda t: t.time_s or 0.0)
    assert result.winner.time_s == fastest.time_s
    assert (result.winner.form, result.winner.chunk_size) == (
        fastest.candidate.form,
        fastest.candidate.chunk_size,
    )
    # The planner's choice was measured beside it, and the entry is found again by its key.
    assert result.winner.planner_time_s is not None and result.ratio is not None
    assert result.ratio >= 1.0
    assert lookup(result.key, cache) == result.winner
    assert "best " in result.table() and "planner's" in result.table()


def test_a_wrong_candidate_cannot_win(
    mamba2: ssmc.CheckedSpec, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = ssmc.load(mamba2, cache_dir=cache).module
    real = module.recurrent_fwd

    def broken(*args: Any, **kw: Any) -> Any:
        out = real(*args, **kw)
        if kw.get("num_warps") == 2:  # the deliberately broken configuration
            kw["out"][:, -1] += 1.0
        return out

    monkeypatch.setattr(module, "recurrent_fwd", broken)
    good = Candidate(form="recurrent")
    wrong = good.with_option("num_warps", 2)
    crashing = good.with_option("no_such_option", 1)
    result = ssmc.autotune(
        mamba2,
        batch=1,
        seqlen=32,
        cache_dir=cache,
        candidates=[good, wrong, crashing],
        timer=fake_timer({wrong: 1e-9, crashing: 1e-9, good: 0.5}),
        progress=False,
        store=False,
    )
    assert result.winner.form == "recurrent" and dict(result.winner.launch) == {}
    outcome = {t.candidate: t for t in result.trials}
    assert outcome[wrong].time_s is None and "> bound" in outcome[wrong].rejected
    assert outcome[crashing].time_s is None and "no_such_option" in outcome[crashing].rejected
    assert result.path is None


def test_no_correct_candidate_is_an_error(
    mamba2: ssmc.CheckedSpec, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = ssmc.load(mamba2, cache_dir=cache).module

    def nan(*args: Any, **kw: Any) -> Any:
        kw["out"].fill_(float("nan"))
        return kw["out"]

    monkeypatch.setattr(module, "recurrent_fwd", nan)
    with pytest.raises(AT.AutotuneError, match="no candidate agreed"):
        ssmc.autotune(
            mamba2,
            batch=1,
            seqlen=16,
            cache_dir=cache,
            candidates=[Candidate(form="recurrent")],
            progress=False,
        )


def test_packed_uneven_sequences(mamba2: ssmc.CheckedSpec, cache: Path) -> None:
    result = ssmc.autotune(
        mamba2,
        batch=1,
        seqlen=40,
        num_seqs=3,
        cache_dir=cache,
        candidates=[Candidate(form="chunked", chunk_size=16), Candidate(form="recurrent")],
        progress=False,
    )
    assert all(t.time_s is not None for t in result.trials), result.table()
    assert result.key.varlen and result.key.seqs == 4 and result.key.tokens == 64


@pytest.fixture
def op_and_tensors(
    mamba2: ssmc.CheckedSpec, cache: Path
) -> Iterator[tuple[Any, list[torch.Tensor], Shape]]:
    from ssmc.reference import random_inputs

    op = ssmc.load(mamba2, cache_dir=cache)
    inputs = random_inputs(mamba2, batch=2, seqlen=24, generator=torch.Generator().manual_seed(1))
    ordered = [inputs[t.name].float() for t in mamba2.spec.tensors]
    yield op, ordered, Shape(batch=2, seqlen=24, dtype_bytes=4)


def test_the_op_runs_a_stored_winner_else_the_planner(
    mamba2: ssmc.CheckedSpec,
    cache: Path,
    op_and_tensors: tuple[Any, list[torch.Tensor], Shape],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    op, ordered, shape = op_and_tensors
    monkeypatch.setenv("SSMC_CACHE_DIR", str(cache / "op"))
    # No stored winner: off the GPU the module's rule decides (the planner runs on CUDA only).
    assert op._plan_uncached(ordered, None) == (None, None, None)
    stored = Winner(form="chunked", chunk_size=16, launch={"block_m": 16}, time_s=1e-3)
    record(make_key(mamba2, shape, dtype="float32", varlen=False), stored, cache / "op")
    assert op._plan_uncached(ordered, None) == ("chunked", 16, {"block_m": 16})
    # The launch options reach the stage launcher, and the result is still right.
    y = op._run(*ordered, None, None, "chunked", 16, launch={"block_m": 16})[0]
    y_ref = op._run(*ordered, None, None, "recurrent", None)[0]
    assert float((y - y_ref).norm() / y_ref.norm()) < 1e-5


def test_cli_autotune_writes_json(
    tmp_path: Path, cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "tuned.json"
    dims = [a for k, v in SMALL.items() for a in ("--dim", f"{k}={v}")]
    argv = ["autotune", str(EXAMPLES / "mamba2.ssm"), "--shape", "1x16", *dims]
    argv += ["--cache-dir", str(cache), "--no-progress", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "best " in printed and "stored in" in printed
    (report,) = json.loads(out.read_text())
    assert report["batch"] == 1 and report["winner"]["form"] in (
        "recurrent",
        "quadratic",
        "chunked",
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--shape", "8"], "--shape expects BATCHxSEQLEN"),
        (["--shape", "0x16"], "--shape expects BATCHxSEQLEN"),
        (["--dim", "Q=3"], "no dim named Q"),
        pytest.param(["--dtype", "bfloat16"], "bf16 needs a GPU", marks=cpu_only),
    ],
)
def test_cli_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["autotune", str(EXAMPLES / "mamba2.ssm"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_without_gpu_or_interpreter_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["autotune", str(EXAMPLES / "mamba2.ssm"), "--shape", "1x16"]) == 2
    assert "needs a GPU, or TRITON_INTERPRET=1" in capsys.readouterr().err


@cpu_only
def test_gpu_script_runs_its_cpu_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    path = Path(__file__).parent.parent / "scripts" / "gpu_autotune.py"
    spec = importlib.util.spec_from_file_location("gpu_autotune", path)
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--tiny", "--only", "mamba1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "autotune.json").read_text())
    (row,) = report["rows"]
    assert row["spec"] == "mamba1" and row["planner"]["measured_s"] > 0
    assert row["best_default"]["time_s"] <= row["planner"]["measured_s"]
    assert row["ratio_default"] >= 1.0
    assert {k.split("/")[0] for k in row["estimated_s"]} == {"recurrent", "chunked"}
    assert report["environment"]["device"] == "cpu-interpreter"
    assert "planner recurrent" in capsys.readouterr().out


@cpu_only
def test_the_interpreted_op_runs_what_autotune_stored(
    mamba2: ssmc.CheckedSpec, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ssmc.reference import random_inputs

    # A folder of its own: the file's other tests store winners for other buckets in `cache`.
    monkeypatch.setenv("SSMC_CACHE_DIR", str(cache / "interpreted"))
    op = ssmc.load(mamba2)
    ruled = op.module._choose_form(20)[0]
    other = next(f for f in ("quadratic", "recurrent") if f != ruled)
    ssmc.autotune(mamba2, batch=3, seqlen=20, candidates=[Candidate(form=other)], progress=False)
    inputs = random_inputs(mamba2, batch=3, seqlen=20, generator=torch.Generator().manual_seed(2))
    tensors = {k: v.float() for k, v in inputs.items()}
    y, _ = ssmc.load(mamba2)(**tensors)  # a new op: its plans are not cached yet
    assert op.last_form == other
    y_ref, _ = ssmc.reference(mamba2)(**inputs)
    assert float((y.double() - y_ref).norm() / y_ref.norm()) < 1e-5
    # Another bucket has no entry: the module's rule decides.
    inputs = random_inputs(mamba2, batch=1, seqlen=20, generator=torch.Generator().manual_seed(3))
    ssmc.load(mamba2)(**{k: v.float() for k, v in inputs.items()})
    assert op.last_form == ruled


@cpu_only
def test_a_stored_winner_applies_under_autograd_too(
    mamba2: ssmc.CheckedSpec,
    cache: Path,
    op_and_tensors: tuple[Any, list[torch.Tensor], Shape],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Calls that need gradients go through the torch.library op, which takes no launch
    options: the op's implementation finds the tuned ones for the shape itself."""
    op, ordered, shape = op_and_tensors
    monkeypatch.setenv("SSMC_CACHE_DIR", str(cache / "op"))
    stored = Winner(form="chunked", chunk_size=16, launch={"block_m": 16}, time_s=1e-3)
    record(make_key(mamba2, shape, dtype="float32", varlen=False), stored, cache / "op")
    seen: list[Any] = []
    run = op.module._ssmc_run

    def spy(tensors: Any, initial_state: Any, cu_seqlens: Any, form: Any, chunk: Any,
            launch: Any = None, setup: Any = None, keep_core: bool = False) -> Any:
        seen.append((form, chunk, launch))
        return run(tensors, initial_state, cu_seqlens, form, chunk, launch, setup,
                   keep_core=keep_core)

    monkeypatch.setattr(op.module, "_ssmc_run", spy)
    leaves = [t.clone().requires_grad_() for t in ordered]
    y, _ = op(**dict(zip(op._names, leaves, strict=True)))
    assert seen == [("chunked", 16, {"block_m": 16})]
    y.sum().backward()
    y_ref = op._run(*ordered, None, None, "recurrent", None)[0]
    assert float((y.detach() - y_ref).norm() / y_ref.norm()) < 1e-5
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)
    # an explicit chunk other than the tuned one runs without the tuned tiles
    seen.clear()
    op(**dict(zip(op._names, leaves, strict=True)), chunk_size=8)
    assert seen == [("chunked", 8, None)]


def test_the_search_varies_only_what_the_launcher_takes_within_its_bounds(
    mamba2: ssmc.CheckedSpec, cache: Path
) -> None:
    import inspect

    from ssmc.autotune_space import KNOBS, knob_values

    module = ssmc.load(mamba2, cache_dir=cache).module
    sizes = {"T": 20, "N": 16, "P": 16, "H": 2}
    chunked = knob_values(mamba2, module, Candidate(form="chunked", chunk_size=32), sizes)
    assert set(chunked) <= set(inspect.signature(module.chunked_fwd).parameters)
    assert chunked["block_t"] == (32,) and chunked["block_m"] == (32,)  # rows of Q = 32
    assert chunked["num_warps"] == KNOBS["chunked"]["num_warps"]  # unbounded
    quadratic = knob_values(mamba2, module, Candidate(form="quadratic"), sizes)
    assert quadratic["block_i"] == (32,)  # ≤ the next power of two of T
    assert "block_n" not in quadratic  # every value above N = 16: the knob is dropped
    recurrent = knob_values(mamba2, module, Candidate(form="recurrent"), sizes)
    assert recurrent["block_t"] == (16, 32, 64)  # tokens a block of the scan: not rows of a chunk
    assert recurrent["block_p"] == (4, 8, 16)  # ≤ P
