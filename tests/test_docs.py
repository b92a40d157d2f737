"""docs/language.md: every spec it shows checks, every error it shows is the real one.

Blocks fenced as ```ssm whose first code line is `ssm NAME` are complete specs and must
pass `ssmc.parse`; other ```ssm blocks are statement fragments and must follow the
grammar. Blocks fenced as ```ssm-error must raise SpecError with exactly the diagnostics
of the ```text block after them (whose file name is used as the source name); one copied
from tests/specs/err/ must still match that spec and its .expected file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import ssmc
from ssmc.errors import SpecError
from ssmc.parse import parse_tree

ROOT = Path(__file__).parent.parent
DOC = ROOT / "docs" / "language.md"
EXAMPLES = sorted((ROOT / "examples").glob("*.ssm"))
FENCE = re.compile(r"^```([\w-]*)\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block of the page: its info string, text and first line number."""

    lang: str
    text: str
    line: int


def _blocks(markdown: str) -> list[Block]:
    blocks: list[Block] = []
    lang: str | None = None
    body: list[str] = []
    start = 0
    for number, line in enumerate(markdown.splitlines(), start=1):
        match = FENCE.match(line)
        if lang is None:
            if match:
                lang, body, start = match.group(1), [], number + 1
        elif line.rstrip() == "```":
            blocks.append(Block(lang=lang, text="\n".join(body) + "\n", line=start))
            lang = None
        else:
            body.append(line)
    assert lang is None, f"docs/language.md: the block opened on line {start - 1} is not closed"
    return blocks


def _is_spec(block: Block) -> bool:
    """A complete spec: its first line that is not blank or a comment is the header."""
    code = [
        line
        for line in block.text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    return bool(code) and code[0].startswith("ssm ")


BLOCKS = _blocks(DOC.read_text(encoding="utf-8"))
SPECS = [b for b in BLOCKS if b.lang == "ssm" and _is_spec(b)]
FRAGMENTS = [b for b in BLOCKS if b.lang == "ssm" and not _is_spec(b)]
ERRORS = [
    (b, BLOCKS[i + 1] if i + 1 < len(BLOCKS) and BLOCKS[i + 1].lang == "text" else None)
    for i, b in enumerate(BLOCKS)
    if b.lang == "ssm-error"
]


def _id(block: Block) -> str:
    return f"language.md:{block.line}"


def test_page_has_specs_and_errors() -> None:
    assert len(SPECS) >= 15
    assert len(ERRORS) >= 5
    assert all(expected is not None for _, expected in ERRORS), "show each error's text"


@pytest.mark.parametrize("block", SPECS, ids=_id)
def test_spec_checks(block: Block) -> None:
    checked = ssmc.parse(block.text, _id(block))
    assert checked.forms


@pytest.mark.parametrize("block", FRAGMENTS, ids=_id)
def test_fragment_follows_the_grammar(block: Block) -> None:
    parse_tree("ssm fragment\n" + block.text, _id(block))


@pytest.mark.parametrize(("block", "expected"), ERRORS, ids=[_id(b) for b, _ in ERRORS])
def test_error_is_reported_as_shown(block: Block, expected: Block | None) -> None:
    assert _is_spec(block), "an error example is a whole spec"
    source = expected.text.split(":", 1)[0] if expected else _id(block)
    with pytest.raises(SpecError) as info:
        ssmc.parse(block.text, source)
    if expected is not None:
        assert info.value.render() + "\n" == expected.text
        copied = ROOT / source
        if copied.is_file():
            assert copied.read_text(encoding="utf-8") == block.text
            assert copied.with_suffix(".expected").read_text(encoding="utf-8") == expected.text


def test_examples_table_lists_every_example() -> None:
    text = DOC.read_text(encoding="utf-8")
    table = text[text.index("## The examples") :]
    rows = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^\| `([\w.]+\.ssm)` \|[^|]*\|[^|]*\| (\w+) \|", table, re.M)
    }
    assert sorted(rows) == [p.name for p in EXAMPLES]
    for path in EXAMPLES:
        assert ssmc.parse_file(path).pattern.value == rows[path.name], path.name
