"""The front end end to end: every ok spec checks; every bad spec gives its exact diagnostic."""

from __future__ import annotations

from pathlib import Path

import pytest

import ssmc
from ssmc.errors import SpecError

SPECS = Path(__file__).parent / "specs"
OK = sorted((SPECS / "ok").glob("*.ssm"))
ERR = sorted((SPECS / "err").glob("*.ssm"))
EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.ssm"))


def test_corpus_sizes() -> None:
    assert len(ERR) >= 30
    assert len(EXAMPLES) >= 11


@pytest.mark.parametrize("path", OK + EXAMPLES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_ok_specs_check(path: Path) -> None:
    checked = ssmc.parse_file(path)
    assert checked.forms
    assert checked.spec.source == str(path)


@pytest.mark.parametrize("path", ERR, ids=lambda p: p.stem)
def test_err_specs_report(path: Path, request: pytest.FixtureRequest) -> None:
    expected_path = path.with_suffix(".expected")
    with pytest.raises(SpecError) as info:
        ssmc.parse_file(path)
    rendered = info.value.render() + "\n"
    relative = str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)
    rendered = rendered.replace(str(path), relative)
    if request.config.getoption("--update-golden", default=False):
        expected_path.write_text(rendered)
    expected = expected_path.read_text()
    assert rendered == expected


@pytest.mark.parametrize("path", ERR, ids=lambda p: p.stem)
def test_err_specs_have_location_and_hint(path: Path) -> None:
    with pytest.raises(SpecError) as info:
        ssmc.parse_file(path)
    for diagnostic in info.value.diagnostics:
        assert diagnostic.message
        assert diagnostic.hint, f"{path.stem}: every diagnostic says how to fix it"
    located = [d for d in info.value.diagnostics if d.span is not None]
    missing_statement = path.stem.startswith(("missing_", "empty_"))
    assert located or missing_statement, "a problem in the text points at the text"


def test_line_ends_are_the_same_for_text_and_file(tmp_path: Path) -> None:
    """\\n, \\r\\n and a lone \\r end a line for ssmc.parse and ssmc.parse_file alike."""
    text = EXAMPLES[0].read_text()
    lines = text.split("\n")
    mixed = "\r".join(lines[:8]) + "\r\n" + "\n".join(lines[8:]) + "\r# trailing\rvalue x"
    path = tmp_path / "mixed.ssm"
    path.write_bytes(mixed.encode())
    errors = []
    for run in (lambda: ssmc.parse(mixed, str(path)), lambda: ssmc.parse_file(path)):
        with pytest.raises(SpecError) as info:
            run()
        errors.append([(d.message, d.span) for d in info.value.diagnostics])
    assert errors[0] == errors[1]
    assert errors[0][0][1] is not None and errors[0][0][1].line == len(lines) + 2


def test_not_utf8_is_located_at_the_first_bad_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.ssm"
    path.write_bytes(b"ssm a\r\n# caf\xc3\xa9\n# na\xefve\nmask causal\n")
    with pytest.raises(SpecError) as info:
        ssmc.parse_file(path)
    (diagnostic,) = info.value.diagnostics
    assert diagnostic.span is not None
    assert (diagnostic.span.line, diagnostic.span.column) == (3, 5)
    assert "0xef" in diagnostic.message
    assert f"{path}:3:5: error: not UTF-8" in info.value.render()
