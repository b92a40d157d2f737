"""autotune of the fused backward under the Triton interpreter: its launcher's options are
checked against fp64 gradients (a wrong or failing one never wins), stored with the forward's
winner, and the op's backward runs them; the search space follows the launcher."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import pytest
import torch

import ssmc
from ssmc.autotune_cache import Winner, lookup, make_key, record
from ssmc.autotune_space import BACKWARD_KNOBS, Candidate, backward_knob_values
from ssmc.cli import main
from ssmc.cost import Shape
from ssmc.pipeline import parse_file, with_dims

AT = importlib.import_module("ssmc.autotune")
EXAMPLES = Path(__file__).parent.parent / "examples"
SMALL = {"H": 2, "G": 1, "N": 16, "P": 16}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # (the interpreter on the CPU)

pytestmark = pytest.mark.interpret


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("autotune_backward")


@pytest.fixture(scope="module")
def mamba2() -> ssmc.CheckedSpec:
    return with_dims(parse_file(EXAMPLES / "mamba2.ssm"), SMALL)


def fake_timer(times: dict[Candidate, float]) -> Any:
    """Seconds by candidate (1.0 for the rest), after running the call once."""

    def timer(c: Candidate, call: Any) -> float:
        call()
        return times.get(c, 1.0)

    return timer


def test_the_module_names_its_fused_backward(mamba2: ssmc.CheckedSpec, cache: Path) -> None:
    module = ssmc.load(mamba2, cache_dir=cache).module
    assert module.BACKWARD_STAGE == "chunked_bwd"
    gla = with_dims(parse_file(EXAMPLES / "gla.ssm"), {"H": 2, "N": 16, "P": 16})
    assert ssmc.load(gla, cache_dir=cache).module.BACKWARD_STAGE == "chunked_diag_bwd"


def test_the_backward_space_is_the_launchers_options(
    mamba2: ssmc.CheckedSpec, cache: Path
) -> None:
    module = ssmc.load(mamba2, cache_dir=cache).module
    knobs = backward_knob_values(module, {"H": 2, "N": 16, "P": 16})
    accepted = set(inspect.signature(module.chunked_bwd).parameters)
    assert knobs and set(knobs) <= accepted & set(BACKWARD_KNOBS["chunked_bwd"])
    assert max(knobs["block_t"]) <= 128  # rows of the backward's chunk
    assert max(knobs["head_splits"]) <= 2 and max(knobs["wdla_splits"]) <= 2  # at most H


def test_backward_candidates_are_checked_and_the_fastest_correct_stored(
    mamba2: ssmc.CheckedSpec, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = ssmc.load(mamba2, cache_dir=cache).module
    real = module.chunked_bwd

    def broken(*args: Any, **kw: Any) -> Any:
        out = real(*args, **kw)
        if kw.get("walk_stages") == 3:  # the deliberately broken configuration
            out[3].mul_(1.5)  # dB
        return out

    monkeypatch.setattr(module, "chunked_bwd", broken)
    default = Candidate(form="chunked_bwd")
    good = default.with_option("block_t", 16)
    wrong = default.with_option("walk_stages", 3)
    crashing = default.with_option("no_such_option", 1)
    forward = Candidate(form="chunked", chunk_size=16)
    result = ssmc.autotune(
        mamba2,
        batch=1,
        seqlen=40,
        dtype="float32",
        cache_dir=cache,
        candidates=[forward],
        backward_candidates=[default, good, wrong, crashing],
        timer=fake_timer({wrong: 1e-9, crashing: 1e-9, good: 0.25, default: 0.5}),
        progress=False,
    )
    outcome = {t.candidate: t for t in result.backward_trials}
    assert outcome[wrong].time_s is None and "> bound" in outcome[wrong].rejected
    assert outcome[crashing].time_s is None and "no_such_option" in outcome[crashing].rejected
    assert outcome[default].error is not None and outcome[default].error < 1e-5
    assert outcome[good].error is not None and outcome[good].error < 1e-5
    assert dict(result.winner.backward) == {"block_t": 16}
    assert result.winner.backward_time_s == 0.25 and result.winner.backward_default_time_s == 0.5
    assert lookup(result.key, cache) == result.winner
    table = result.table()
    assert "best backward {'block_t': 16}" in table and "2.00× its defaults" in table


def test_a_module_without_a_fused_backward_says_so(cache: Path) -> None:
    toeplitz = with_dims(parse_file(EXAMPLES / "toeplitz.ssm"), {"H": 2, "P": 4})
    module = ssmc.load(toeplitz, cache_dir=cache).module
    assert module.BACKWARD_STAGE is None
    result = ssmc.autotune(
        toeplitz, batch=1, seqlen=16, dtype="float32", cache_dir=cache, backward=True,
        progress=False, store=False,
        candidates=[Candidate(form=module.FORMS[0])],
    )
    assert result.backward_trials == () and dict(result.winner.backward) == {}
    assert "backward not tuned" in result.table()


def test_the_op_backward_runs_the_stored_options(
    mamba2: ssmc.CheckedSpec, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ssmc.reference import random_inputs

    folder = cache / "op"
    monkeypatch.setenv("SSMC_CACHE_DIR", str(folder))
    op = ssmc.load(mamba2)
    inputs = random_inputs(mamba2, batch=2, seqlen=24, generator=torch.Generator().manual_seed(5))
    tensors = {k: v.float().to(DEVICE) for k, v in inputs.items()}
    stored = Winner(form="chunked", chunk_size=16, time_s=1e-3, backward={"block_t": 16})
    shape = Shape(batch=2, seqlen=24, dtype_bytes=4)
    record(make_key(mamba2, shape, dtype="float32", varlen=False), stored, folder)
    seen: list[dict[str, Any]] = []
    real = op.module.chunked_bwd

    def spy(*args: Any, **kw: Any) -> Any:
        seen.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(op.module, "chunked_bwd", spy)
    leaves = {k: v.clone().requires_grad_() for k, v in tensors.items()}
    init = leaves.pop("initial_state", None)
    y, state = op(**leaves, initial_state=init)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    torch.autograd.backward([y], [dy])
    assert seen and all(kw.get("block_t") == 16 for kw in seen)
    # the gradients are still those of the fp64 reference
    exact = {k: v.double().requires_grad_() for k, v in tensors.items()}
    init64 = exact.pop("initial_state", None)
    y64, _ = ssmc.reference(mamba2)(**exact, initial_state=init64)
    torch.autograd.backward([y64], [dy.double()])
    for name, leaf in leaves.items():
        want = exact[name].grad
        assert leaf.grad is not None and want is not None
        err = float((leaf.grad.double() - want).norm() / want.norm())
        assert err < 1e-5, (name, err)


def test_cli_autotune_backward(
    cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dims = [a for k, v in SMALL.items() for a in ("--dim", f"{k}={v}")]
    argv = ["autotune", str(EXAMPLES / "mamba2.ssm"), "--shape", "1x16", *dims, "--backward"]
    argv += ["--cache-dir", str(cache), "--no-progress", "--no-store", "--dtype", "float32"]
    argv += ["--no-search"]  # (on a GPU the search would run: its winner varies)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "backward:" in printed and "chunked_bwd (default tiles)" in printed
    assert "best backward defaults" in printed
