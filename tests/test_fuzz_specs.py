"""Fuzzing in CI: generated and mutated specs give a rendered module or a located SpecError.

The strategies live in scripts/fuzz.py (the dedicated `--count 100000` run uses the same
ones); here each runs a fixed, derandomised number of examples, a few thousand in all, so
the file stays well under a minute. `known:*` outcomes are bugs already reported (each
has a strict xfail test elsewhere: tests/test_injection.py, tests/test_fuzz_specs.py);
anything else is a failure.
"""

from __future__ import annotations

import importlib.util
import signal
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from ssmc import render
from ssmc.errors import MAX_REPORTED, SpecError
from ssmc.pipeline import parse

ROOT = Path(__file__).resolve().parent.parent


def _fuzz_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("ssmc_fuzz", ROOT / "scripts" / "fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ssmc_fuzz"] = module
    spec.loader.exec_module(module)
    return module


fuzz = _fuzz_module()
CI = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)


def accepted(text: str) -> str:
    key, trace = fuzz.classify(text, compile_source=False)
    assert not key.startswith("unexpected:"), f"{key}\n{trace}\n--- spec ---\n{text}"
    return key


@settings(CI, max_examples=400)
@given(fuzz.grammar_spec())
def test_grammar_specs(text: str) -> None:
    accepted(text)


@settings(CI, max_examples=1200)
@given(fuzz.mutated_example())
def test_mutated_examples(text: str) -> None:
    accepted(text)


@settings(CI, max_examples=400)
@given(fuzz.hostile_spec())
def test_hostile_slots(text: str) -> None:
    accepted(text)


def test_grammar_specs_are_mostly_valid() -> None:
    """The generator is useful only if most of its specs check (and so reach the renderer)."""
    checked = []

    @settings(CI, max_examples=100)
    @given(fuzz.grammar_spec())
    def collect(text: str) -> None:
        try:
            parse(text)
        except SpecError:
            checked.append(False)
        else:
            checked.append(True)

    collect()
    assert sum(checked) >= 0.5 * len(checked), f"{sum(checked)} of {len(checked)} check"


@pytest.mark.parametrize("name", sorted(fuzz.EXAMPLES))
def test_every_example_is_accepted(name: str) -> None:
    assert fuzz.classify(fuzz.EXAMPLES[name]) == ("ok", None)


def test_outcome_rejects_an_unlocated_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle itself: a SpecError without a location where one is due is a failure."""
    from ssmc.errors import Diagnostic

    def unlocated(text: str, source: str = "") -> object:
        raise SpecError([Diagnostic(message="something is wrong")], source=source, text=text)

    monkeypatch.setattr(fuzz, "parse", unlocated)
    key, trace = fuzz.classify("ssm x")
    assert key.startswith("unexpected:") and trace is not None


# --- bugs the fuzzer found (strict xfails: they flip when fixed) --------------------------

CALL_TIME_GROUP = """\
ssm call_time_group
dim H = 4, G, N = 8, P = 8
input x : [batch, seq, H, P]
input B : [batch, seq, G, N]
input C : [batch, seq, G, N]
output y : [batch, seq, H, P]
mask causal
query C
key   B
value x
"""


def test_call_time_group_dim_renders() -> None:
    render.render_module(parse(CALL_TIME_GROUP))


CONSTANT_ROLES = ("gate 0.5", "gate sigmoid(H)", "skip exp(H) * 0.25", "gate sigmoid(H)\nskip 2 * x")


@pytest.mark.parametrize("roles", CONSTANT_ROLES)
def test_output_roles_without_tensors_compile(roles: str) -> None:
    """Found by the recorded run (on 8406ad1): a skip or gate that reads no tensor gave the
    chunked scan's tile epilogue an empty parameter list (a lone `,`) and an empty `if`
    body: the module did not compile."""
    text = CALL_TIME_GROUP.replace("dim H = 4, G,", "dim H = 4, G = 2,") + roles + "\n"
    source = render.render_module(parse(text))
    compile(source, "module.py", "exec", dont_inherit=True)


@pytest.mark.interpret
def test_output_roles_without_tensors_run_chunked() -> None:
    """The constant gate applied on the chunked scan's tile, against the fp64 recurrence."""
    import tempfile
    import warnings

    import torch

    import ssmc
    from ssmc.reference import random_inputs, reference

    text = CALL_TIME_GROUP.replace("dim H = 4, G,", "dim H = 4, G = 2,") + "gate 0.5\n"
    checked = parse(text)
    inputs = random_inputs(checked, batch=1, seqlen=20, dtype=torch.float32)
    inputs.pop("initial_state", None)
    expected = reference(checked, "recurrent")(**{k: v.double() for k, v in inputs.items()})
    expected = expected[0] if isinstance(expected, tuple) else expected
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y, _ = ssmc.load(checked, cache_dir=folder)(**inputs, form="chunked", chunk_size=16)
    error = (y.double() - expected).abs().max() / expected.abs().max()
    assert torch.isfinite(y).all() and error < 1e-5, error


@pytest.mark.parametrize(("lo", "hi", "value"), [("inf", "inf", "inf"), ("-inf", "-inf", "-inf"),
                                                 ("2", "inf", "2"), ("-inf", "-1", "-1")])
def test_clamp_with_infinite_bounds_folds(lo: str, hi: str, value: str) -> None:
    """Found by the recorded run: folding `clamp(c, inf, inf)` asked torch.clamp for no bound
    at all (RuntimeError); a bound of +inf below or -inf above is a bound, not none."""
    from ssmc import expr as E
    from ssmc.expr_torch import evaluate_named

    bounds = (E.Num(value=float(lo)), E.Num(value=float(hi)))
    call = E.Call(func=E.Func.CLAMP, args=(E.Num(value=0.5), *bounds))
    assert float(evaluate_named(call, {}, {})[0]) == float(value)
    text = CALL_TIME_GROUP.replace("dim H = 4, G,", "dim H = 4, G = 2,")
    skip = f"skip clamp(1, {lo}, {hi}) * x\n".replace("-inf", "(-inf)")
    source = render.render_module(parse(text + skip))
    compile(source, "module.py", "exec", dont_inherit=True)


@pytest.mark.parametrize(
    ("shape", "message"),
    [("[H16777217, L]", "which is not a declared dim"), ("[batch, L]", "batch or seq axis"),
     ("[H, L, P]", "a head axis and one lag axis")],
)
def test_decay_window_with_a_bad_kernel_is_a_located_error(shape: str, message: str) -> None:
    """Found by the recorded run (a mutated examples/decay_window.ssm): a decayed Toeplitz
    kernel whose axes are wrong hit `assert taps is not None` in ssmc/algebra_pieces.py."""
    text = fuzz.EXAMPLES["decay_window"].replace("param K : [H, L]", f"param K : {shape}")
    with pytest.raises(SpecError) as info:
        parse(text)
    (diagnostic,) = info.value.diagnostics
    assert message in diagnostic.message and diagnostic.span is not None


def test_strategies_avoid_known_triggers_by_default() -> None:
    pool = fuzz.pools()
    assert not set(fuzz.KNOWN_BUG_NAMES) & set(pool.names)
    assert not set(fuzz.KNOWN_NUMBERS) & set(pool.numbers)


@pytest.mark.parametrize("name", ["form", "chunk_size", "cu_seqlens", "grad_y", "_ssmc_run"])
def test_reserved_tensor_names_are_located_errors(name: str) -> None:
    """Names the op and module take are refused by check (once bug 7: UnsafeNameError at
    render, tallied `known:reserved-tensor-name`)."""
    text = CALL_TIME_GROUP.replace("dim H = 4, G,", "dim H = 4, G = 2,").replace("x", name)
    assert fuzz.classify(text)[0] == "error:CheckError"


# --- resource limits: parse + check + render in bounded time, or a clean error ------------

LIMIT_S = 5.0
"""The bound for parse + check + render of one spec (the largest take about 3 s here)."""
BASE = (ROOT / "examples" / "mamba2_mha.ssm").read_text()


def bounded(text: str, seconds: float = LIMIT_S) -> str:
    """Parse, check and render `text` within `seconds`: "ok" or the first diagnostic."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"parse + check + render took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        try:
            checked = parse(text, "limits.ssm")
        except SpecError as err:
            assert err.diagnostics
            return err.diagnostics[0].message
        render.render_module(checked)
        return "ok"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _balanced(terms: list[str]) -> str:
    if len(terms) == 1:
        return terms[0]
    mid = len(terms) // 2
    return f"({_balanced(terms[:mid])} + {_balanced(terms[mid:])})"


def _many_params(n: int) -> str:
    """A skip summing n params [H] (balanced, so the nesting stays shallow)."""
    terms = _balanced([f"w{i}" for i in range(n)])
    decls = "".join(f"param w{i} : [H]\n" for i in range(n))
    return BASE.replace("skip  D * x", f"skip  D * x * {terms}").replace(
        "param D ", decls + "param D "
    )


@pytest.mark.parametrize(
    ("case", "text", "expected"),
    [
        ("N=2^24", BASE.replace("N = 64", "N = 16777216"), "ok"),
        ("P=2^24", BASE.replace("P = 64", "P = 16777216"), "ok"),
        ("all dims at call time", BASE.replace("dim H = 8, N = 64, P = 64", "dim H, N, P"), "ok"),
        (
            "L=2^24",
            (ROOT / "examples" / "toeplitz.ssm").read_text().replace("L = 64", "L = 16777216"),
            "ok",
        ),
        ("H=2^24+1", BASE.replace("H = 8", "H = 16777217"), "dim H = 16777217 is out of range"),
        ("H=10^22", BASE.replace("H = 8", "H = 99999999999999999999999"), "is out of range"),
        ("64 parens", BASE.replace("query C", "query " + "(" * 64 + "C" + ")" * 64), "ok"),
        (
            "65 parens",
            BASE.replace("query C", "query " + "(" * 65 + "C" + ")" * 65),
            "brackets nested deeper than 64 levels",
        ),
        (
            "depth 49",
            BASE.replace("skip  D * x", "skip  D * x" + " + x" * 47),
            "expression nested deeper than 48 levels once its lets are inlined",
        ),
        (
            "500 operators",
            BASE.replace("skip  D * x", "skip  D * x" + " + x" * 500),
            "expression nested deeper than 48 levels once its lets are inlined",
        ),
        (
            "let doubling x2^60",
            BASE.replace(
                "let delta = softplus(dt + dt_bias)",
                "let e0 = dt\n"
                + "".join(f"let e{i} = e{i - 1} + e{i - 1}\n" for i in range(1, 61))
                + "let delta = softplus(e60)",
            ),
            "terms once its lets are inlined; the limit is 4096",
        ),
        (
            "8000 lets",
            BASE.replace(
                "let delta", "".join(f"let u{i} = dt * {i}\n" for i in range(8000)) + "let delta"
            ),
            "ok",
        ),
        (
            "16000 dims",
            BASE.replace(
                "dim H = 8", "dim H = 8\ndim " + ", ".join(f"a{i} = 1" for i in range(16000))
            ),
            "ok",
        ),
        ("300 params in one skip", _many_params(300), "ok"),
        ("200000 chars", BASE + "#" * (200_000 - len(BASE) - 1) + "\n", "ok"),
        (
            "200001 chars",
            BASE + "#" * (200_001 - len(BASE) - 1) + "\n",
            "spec is 200001 characters long; the limit is 200000",
        ),
        ("90000 comment lines", BASE + "#\n" * 90_000, "ok"),
        ("190000 blank lines", BASE + "\n" * 190_000, "ok"),
        ("a 95000-char name", BASE.replace("dt_bias", "b" * 95_000), "ok"),
        (
            "5000 unknown names",
            BASE.replace(
                "param D ", "".join(f"param w{i} : [H]\n" for i in range(5000)) + "param D "
            ),
            "`w0` is declared but never used",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 40 else "",
)
def test_resource_limits(case: str, text: str, expected: str) -> None:
    result = bounded(text)
    assert result == expected if expected == "ok" else expected in result, (case, result)


def test_many_heads_render_in_bounded_time() -> None:
    assert bounded(BASE.replace("H = 8", "H = 16777216"), seconds=2.0) == "ok"


def test_many_params_render_in_bounded_time() -> None:
    """2000 params in one skip: the backward's derivatives are one reverse walk (e7d2cd4; it
    was one walk per tensor, ~18 s here); the planner's cost model decides whether the
    chunked scan fuses the epilogue without building it (bug 21, ~5.2 s before)."""
    assert bounded(_many_params(2000)) == "ok"


def test_many_diagnostics_in_bounded_time() -> None:
    """20 000 errors: rendered lazily, the first MAX_REPORTED then a count (was ~27 s, every
    diagnostic rendered at construction, each splitting the whole text)."""
    text = BASE + "value x\n" * 20_000
    assert "`value` is given twice" in bounded(text)

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("rendering the diagnostics took more than 5 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
    try:
        with pytest.raises(SpecError) as info:
            parse(text, "many.ssm")
        rendered = str(info.value)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert len(info.value.diagnostics) == 20_000
    assert rendered.count(": error: ") == MAX_REPORTED
    assert rendered.endswith(f"… and {20_000 - MAX_REPORTED} more errors")
