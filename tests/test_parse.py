"""parse: the grammar accepts the examples; random and mutated text gives only clean errors."""

from __future__ import annotations

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ssmc
from ssmc.errors import ParseError, SpecError
from ssmc.parse import MAX_NESTING, parse_tree

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.ssm"))
EXAMPLE_TEXTS = [p.read_text() for p in EXAMPLES]
TOKENS = ["ssm", "dim", "input", "param", "output", "let", "mask", "query", "key", "value",
          "skip", "gate", "initial_state", "final_state", "varlen", "batch", "seq", "H", "N",
          "P", "x", "B", "C", "dt", "A", "(", ")", "[", "]", ",", ":", "=", "*", "/", "+", "-",
          "**", "1", "0.5", "1e3", "exp", "softplus", "clamp", "inf", "semiseparable",
          "diagonal", "causal", "toeplitz", "lti", "\n", "#", "{{", "}}", "__import__", "'"]


def _accepts_or_reports(text: str) -> None:
    try:
        ssmc.parse(text, "fuzz.ssm")
    except SpecError as err:
        assert err.diagnostics
        assert "Traceback" not in err.render()


def test_examples_parse() -> None:
    for text in EXAMPLE_TEXTS:
        tree = parse_tree(text)
        assert tree.data == "start"


def test_nesting_limit_is_an_error_not_a_recursion() -> None:
    text = "ssm a\nlet q = " + "(" * (MAX_NESTING + 1) + "x" + ")" * (MAX_NESTING + 1)
    try:
        parse_tree(text)
    except ParseError as err:
        assert "nested deeper" in err.render()
    else:
        raise AssertionError("deep nesting was accepted")


def test_long_file_is_refused() -> None:
    text = "ssm a\n" + "# padding\n" * 30_000
    try:
        parse_tree(text)
    except ParseError as err:
        assert "limit" in err.render()
    else:
        raise AssertionError("an oversized spec was accepted")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_random_text(text: str) -> None:
    _accepts_or_reports(text)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), max_size=60))
def test_random_token_soup(tokens: list[str]) -> None:
    _accepts_or_reports(" ".join(tokens))


@st.composite
def mutated_example(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from(EXAMPLE_TEXTS))
    for _ in range(draw(st.integers(1, 4))):
        if not text:
            break
        pos = draw(st.integers(0, len(text) - 1))
        kind = draw(st.sampled_from(["delete", "insert", "replace", "swap_lines"]))
        if kind == "delete":
            end = min(len(text), pos + draw(st.integers(1, 12)))
            text = text[:pos] + text[end:]
        elif kind == "insert":
            text = text[:pos] + draw(st.sampled_from(TOKENS)) + text[pos:]
        elif kind == "replace":
            text = text[:pos] + draw(st.sampled_from(TOKENS)) + text[pos + 1:]
        else:
            lines = text.splitlines()
            i, j = draw(st.integers(0, len(lines) - 1)), draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
            text = "\n".join(lines)
    return text


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_example())
def test_mutated_examples(text: str) -> None:
    _accepts_or_reports(text)
