"""Context parallelism (ssmc.parallel) equals the single-process op, forward and backward.

Two gloo processes each run half of the sequence (tests/parallel_worker.py); their outputs,
the last rank's final state and every gradient (per-token tensors concatenated, parameter
gradients summed over ranks) must match one process running the whole sequence. The
state-only pass is checked on its own, in process, against the reference's final state.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssmc.load import load
from ssmc.parallel import ContextParallel, ContextParallelError, StatePass
from ssmc.pipeline import parse, parse_file, with_dims
from ssmc.reference import random_inputs, reference

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("parallel_worker.py")
CASES = {
    "mamba2": ("mamba2.ssm", "H=4,G=2,N=4,P=4"),  # scalar decay, B and C shared by 2 heads
    "gla": ("gla.ssm", "H=2,N=4,P=4"),  # diagonal decay
    "retnet": ("retnet.ssm", "H=2,N=4,P=4"),  # constant decay
    "linear_attention": ("linear_attention.ssm", "H=2,N=4,P=4"),  # causal: no decay
    "mqa": ("mqa.ssm", "H=4,G=2,N=4,P=4"),  # x and B shared by 2 heads, C per head
}


def _spec(case: str, tmp_path: Path) -> Path:
    """The case's spec file; mqa gains the initial_state flag context parallelism needs."""
    name = CASES[case][0]
    text = (ROOT / "examples" / name).read_text()
    if "\ninitial_state\n" in text:
        return ROOT / "examples" / name
    path = tmp_path / name
    path.write_text(text.replace("final_state\n", "initial_state\nfinal_state\n"))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(
    specs: list[Path],
    dims: list[str],
    mode: str,
    dtype: str,
    out: Path,
    world: int = 2,
    seqlen: int = 16,
) -> None:
    """Every spec split across `world` gloo ranks in turn (one start-up for all of them);
    spec i's per-rank results land in out/i/."""
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "WORLD_SIZE": str(world),
        # the repository first, then whatever else the caller put on the path (the GPU
        # machine's carried wheels)
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, str(WORKER), *map(str, specs), "--dims", *dims, "--mode", mode]
    cmd += ["--dtype", dtype, "--out", str(out), "--seqlen", str(seqlen)]
    procs = [
        subprocess.Popen(cmd, env={**env, "RANK": str(r)}, stderr=subprocess.PIPE, text=True)
        for r in range(world)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    failed = [
        f"rank {r} failed:\n{err[-2000:]}"
        for r, (p, err) in enumerate(zip(procs, errors, strict=True))
        if p.returncode != 0
    ]
    assert not failed, "\n".join(failed)


def _single(spec: Path, dims: str, batch: int = 2, seqlen: int = 16) -> dict:
    """The whole sequence in one process (fp64 reference), same inputs and loss as the worker."""
    parsed = dict((k, int(v)) for k, v in (kv.split("=") for kv in dims.split(",")))
    checked = with_dims(parse_file(spec), parsed)
    gen = torch.Generator().manual_seed(0)
    full = random_inputs(checked, batch=batch, seqlen=seqlen, generator=gen)
    leaves = {k: v.clone().requires_grad_() for k, v in full.items()}
    y, state = reference(checked, "recurrent")(**leaves)
    w_y = torch.randn(batch, seqlen, *y.shape[2:], generator=gen, dtype=torch.float64)
    w_s = torch.randn(*state.shape, generator=gen, dtype=torch.float64)
    ((y * w_y).sum() + (state * w_s).sum()).backward()
    per_token = {t.name for t in checked.spec.tensors if "seq" in t.shape}
    grads = {k: v.grad for k, v in leaves.items() if v.grad is not None}
    return {"y": y.detach(), "state": state.detach(), "grads": grads, "per_token": per_token}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _compare(out: Path, want: dict, bound: float, world: int = 2) -> None:
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    y = torch.cat([r["y"] for r in ranks], dim=1)
    assert _rel(y, want["y"]) < bound, f"y: {_rel(y, want['y']):.2e}"
    assert _rel(ranks[-1]["state"], want["state"]) < bound
    for name, g in want["grads"].items():
        if name in want["per_token"]:
            got = torch.cat([r["grads"][name] for r in ranks], dim=1)
        elif name == "initial_state":  # read on rank 0 only
            got = ranks[0]["grads"][name]
        else:
            got = sum(r["grads"][name] for r in ranks)
        assert _rel(got, g) < bound, f"grad of {name}: {_rel(got, g):.2e}"


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Every case split across two ranks of the fp64 reference: case -> (spec, results)."""
    tmp = tmp_path_factory.mktemp("parallel")
    cases = sorted(CASES)
    specs = [_spec(case, tmp) for case in cases]
    _run_ranks(specs, [CASES[c][1] for c in cases], "reference", "float64", tmp)
    return {
        case: (spec, tmp / str(i)) for i, (case, spec) in enumerate(zip(cases, specs, strict=True))
    }


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_match_one_reference(case: str, reference_runs: dict) -> None:
    spec, out = reference_runs[case]
    _compare(out, _single(spec, CASES[case][1]), 1e-10)


def test_three_ranks_fold_the_earlier_states(tmp_path: Path) -> None:
    """Rank 2 enters with rank 1's state plus rank 0's decayed across rank 1."""
    spec, dims = _spec("mamba2", tmp_path), CASES["mamba2"][1]
    _run_ranks([spec], [dims], "reference", "float64", tmp_path, world=3, seqlen=24)
    _compare(tmp_path / "0", _single(spec, dims, seqlen=24), 1e-10, world=3)


@pytest.mark.interpret
@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2,
    reason="the ranks take NCCL and a GPU each where CUDA is (scripts/gpu_parallel.py on 2 GPUs)",
)
def test_two_ranks_of_generated_kernels(tmp_path: Path) -> None:
    """The generated ops (interpreter, fp32): a scalar decay with shared B/C, and causal."""
    cases = ["mamba2", "linear_attention"]
    specs = [_spec(case, tmp_path) for case in cases]
    _run_ranks(specs, [CASES[c][1] for c in cases], "op", "float32", tmp_path)
    for i, (case, spec) in enumerate(zip(cases, specs, strict=True)):
        _compare(tmp_path / str(i), _single(spec, CASES[case][1]), 1e-4)


@pytest.mark.interpret
@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() < 2,
    reason="the ranks take NCCL and a GPU each where CUDA is (scripts/gpu_parallel.py on 2 GPUs)",
)
def test_two_ranks_of_generated_kernels_without_gradients(tmp_path: Path) -> None:
    """Without gradients each rank's state pass is the module's state walk (scalar decay with
    shared B/C, diagonal decay): y and the final state still match one process."""
    cases = ["mamba2", "gla"]
    specs = [_spec(case, tmp_path) for case in cases]
    _run_ranks(specs, [CASES[c][1] for c in cases], "op-no-grad", "float32", tmp_path)
    for i, (case, spec) in enumerate(zip(cases, specs, strict=True)):
        want = _single(spec, CASES[case][1])
        _compare(tmp_path / str(i), {**want, "grads": {}}, 1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_pass_is_the_final_state_from_zero(case: str, tmp_path: Path) -> None:
    """S⁰ + exp(Σ log a) ⊙ h0 is the reference's final state from h0, values and gradients."""
    checked = _checked(_spec(case, tmp_path), CASES[case][1])
    gen = torch.Generator().manual_seed(1)
    inputs = random_inputs(checked, batch=2, seqlen=11, generator=gen)
    h0 = inputs.pop("initial_state")
    w = torch.randn(h0.shape, generator=gen, dtype=torch.float64)
    mine = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    theirs = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    left, log_total = StatePass(checked)(mine, torch.float64)
    got = left + log_total.exp().unsqueeze(-1) * h0
    _, want = reference(checked, "recurrent")(initial_state=h0, **theirs)
    assert _rel(got, want) < 1e-12, f"state: {_rel(got, want):.2e}"
    (got * w).sum().backward()
    (want * w).sum().backward()
    for name, t in theirs.items():  # C (the query) does not reach the state: no gradient
        if t.grad is None:
            assert mine[name].grad is None, f"grad of {name}"
        else:
            assert _rel(mine[name].grad, t.grad) < 1e-12, f"grad of {name}"


WALK_CASES = {**CASES, "mamba1": ("mamba1.ssm", "H=4,N=4")}  # diagonal, the decay fused
WALK_CASES.pop("mqa")  # x and B shared as in mamba2


@pytest.mark.interpret
@pytest.mark.parametrize("case", sorted(WALK_CASES))
def test_state_walk_of_generated_kernels(case: str, tmp_path: Path) -> None:
    """The module's final_state_from_zero (the state walk alone, cut into segments or not,
    a partial last chunk) is the fp64 state pass; StatePass takes it without gradients."""
    path = _spec(case, tmp_path) if case in CASES else ROOT / "examples" / WALK_CASES[case][0]
    checked = _checked(path, WALK_CASES[case][1])
    op = load(checked)
    gen = torch.Generator().manual_seed(3)
    for seqlen, splits in ((40, None), (40, 3), (16, 2)):
        inputs = random_inputs(checked, batch=2, seqlen=seqlen, generator=gen)
        inputs.pop("initial_state", None)
        want, want_total = StatePass(checked)(inputs, torch.float64)
        f32 = {k: v.float() for k, v in inputs.items()}
        launch = {"seq_splits": splits}
        got, total = op.module.final_state_from_zero(**f32, chunk_size=16, launch=launch)
        assert got.dtype == total.dtype == torch.float32
        assert _rel(got, want) < 1e-5, f"T={seqlen}, splits={splits}: {_rel(got, want):.2e}"
        if total.dim() == 2:  # a scalar decay: one total per head
            total = total[..., None].expand_as(want_total)
        assert (total.double() - want_total).abs().max() < 1e-5 * seqlen
    state_pass = StatePass(checked, op)
    assert state_pass.walk is not None
    with torch.no_grad():
        left, log_total = state_pass(f32, torch.float32)
    assert _rel(left, want) < 1e-5
    assert (log_total.double() - want_total).abs().max() < 1e-5 * seqlen


@pytest.mark.interpret
def test_state_walk_with_tensors_named_as_module_globals(tmp_path: Path) -> None:
    """Tensors named as the module's globals (torch, the launcher, the prologue) still reach
    the walk as values: final_state_from_zero hands them on as a tuple."""
    names = {"q": "tensors", "k": "torch", "v": "chunked_diag_final_state", "g": "prologue_roles"}
    text = (ROOT / "examples" / "gla.ssm").read_text()
    text = re.sub(r"\b[qkvg]\b", lambda m: names[m.group(0)], text.split("ssm gla", 1)[1])
    checked = with_dims(parse("ssm named" + text, "named.ssm"), {"H": 2, "N": 4, "P": 4})
    op = load(checked)
    inputs = random_inputs(checked, batch=1, seqlen=20, generator=torch.Generator().manual_seed(5))
    inputs.pop("initial_state")
    want, _ = StatePass(checked)(inputs, torch.float64)
    got, _ = op.module.final_state_from_zero(**{k: v.float() for k, v in inputs.items()})
    assert _rel(got, want) < 1e-5


def test_state_pass_off_the_kernels_is_torch(tmp_path: Path) -> None:
    """On a CPU without the interpreter the op runs the reference: so does the state pass,
    and the module's walk is never launched."""
    checked = _checked(_spec("gla", tmp_path), CASES["gla"][1])
    op = load(checked)
    op.interpreted = False  # as when TRITON_INTERPRET is unset

    def launch(**_: torch.Tensor) -> None:
        raise AssertionError("the walk's kernels launched on a CPU without the interpreter")

    state_pass = StatePass(checked, op)
    state_pass.walk = launch
    inputs = random_inputs(checked, batch=1, seqlen=9, generator=torch.Generator().manual_seed(4))
    inputs.pop("initial_state")
    with torch.no_grad():
        got, got_total = state_pass(inputs, torch.float64)
    want, want_total = StatePass(checked)(inputs, torch.float64)
    assert torch.equal(got, want) and torch.equal(got_total, want_total)


def test_state_pass_of_bf16_inputs_is_fp32(tmp_path: Path) -> None:
    """16-bit inputs: the matmul's result stays fp32 (a bf16 state would round the hand-off)."""
    checked = _checked(_spec("mamba2", tmp_path), CASES["mamba2"][1])
    gen = torch.Generator().manual_seed(2)
    inputs = random_inputs(checked, batch=1, seqlen=64, generator=gen)
    inputs.pop("initial_state")
    half = {k: v.to(torch.bfloat16) if k in ("x", "B") else v for k, v in inputs.items()}
    want, _ = StatePass(checked)(inputs, torch.float64)
    got, _ = StatePass(checked)(half, torch.float32)
    assert got.dtype == torch.float32
    assert _rel(got, want) < 2e-2


def _checked(spec: Path, dims: str):  # noqa: ANN202
    parsed = dict((k, int(v)) for k, v in (kv.split("=") for kv in dims.split(",")))
    return with_dims(parse_file(spec), parsed)


def test_toeplitz_is_refused() -> None:
    checked = parse_file(ROOT / "examples" / "s4d.ssm")
    with pytest.raises(ContextParallelError, match="Toeplitz"):
        ContextParallel(checked, reference(checked))


def test_spec_without_initial_state_is_refused() -> None:
    checked = parse_file(ROOT / "examples" / "mqa.ssm")
    with pytest.raises(ContextParallelError, match="initial_state"):
        ContextParallel(checked, reference(checked))


def test_composite_mask_is_refused() -> None:
    checked = parse_file(ROOT / "examples" / "mamba2_2ss.ssm")
    with pytest.raises(ContextParallelError, match="composite"):
        ContextParallel(checked, reference(checked))


def test_spec_without_final_state_is_refused() -> None:
    text = (ROOT / "examples" / "mamba2.ssm").read_text().replace("final_state\n", "")
    checked = parse(text)
    with pytest.raises(ContextParallelError, match="final_state"):
        ContextParallel(checked, reference(checked))
