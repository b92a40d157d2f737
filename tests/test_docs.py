"""The docs run: language.md's specs and errors are the real ones; tutorial.md runs as written.

docs/language.md: blocks fenced as ```ssm whose first code line is `ssm NAME` are complete
specs and must pass `ssmc.parse`; other ```ssm blocks are statement fragments and must
follow the grammar. Blocks fenced as ```ssm-error must raise SpecError with exactly the
diagnostics of the ```text block after them (whose file name is used as the source name);
one copied from tests/specs/err/ must still match that spec and its .expected file.

docs/tutorial.md: in a scratch folder, a block preceded by `<!-- file: NAME -->` is written
to NAME (a spec must parse), the ```python blocks run in order in one namespace (a line
`steps = N  # tests/test_docs.py runs M` runs M steps), and each `$ ssmc ...` line of a
```console block must exit 0.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

import ssmc
from ssmc.cli import main
from ssmc.errors import SpecError
from ssmc.parse import parse_tree

ROOT = Path(__file__).parent.parent
DOC = ROOT / "docs" / "language.md"
EXAMPLES = sorted((ROOT / "examples").glob("*.ssm"))
FENCE = re.compile(r"^```([\w-]*)\s*$")


@dataclass(frozen=True)
class Block:
    """One fenced block of the page: its info string, text, first line number, and the line
    just above its opening fence."""

    lang: str
    text: str
    line: int
    before: str = ""


def _blocks(markdown: str, page: str = "docs/language.md") -> list[Block]:
    blocks: list[Block] = []
    lang: str | None = None
    body: list[str] = []
    start = 0
    previous = ""
    above = ""
    for number, line in enumerate(markdown.splitlines(), start=1):
        match = FENCE.match(line)
        if lang is None:
            if match:
                lang, body, start, above = match.group(1), [], number + 1, previous
        elif line.rstrip() == "```":
            blocks.append(Block(lang=lang, text="\n".join(body) + "\n", line=start, before=above))
            lang = None
        else:
            body.append(line)
        previous = line
    assert lang is None, f"{page}: the block opened on line {start - 1} is not closed"
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


TUTORIAL = ROOT / "docs" / "tutorial.md"
FILE_MARK = re.compile(r"^<!-- file: ([\w.]+) -->$")
STEPS_LINE = re.compile(r"^steps = \d+  # tests/test_docs.py runs (\d+)$", re.M)


@pytest.mark.interpret
def test_tutorial_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _blocks(TUTORIAL.read_text(encoding="utf-8"), "docs/tutorial.md")
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "tutorial"}
    ran = {"file": 0, "python": 0, "console": 0}
    for block in blocks:
        where = f"tutorial.md:{block.line}"
        marked = FILE_MARK.match(block.before.strip())
        if marked:
            (tmp_path / marked.group(1)).write_text(block.text, encoding="utf-8")
            if block.lang == "ssm":
                ssmc.parse(block.text, where)
            ran["file"] += 1
        elif block.lang == "python":
            code = STEPS_LINE.sub(lambda m: f"steps = {m.group(1)}", block.text)
            exec(compile(code, where, "exec"), namespace)
            ran["python"] += 1
        elif block.lang == "console":
            for line in block.text.splitlines():
                if line.startswith("$ "):
                    words = shlex.split(line[2:])
                    assert words[0] == "ssmc", f"{where}: {line}"
                    assert main(words[1:]) == 0, f"{where}: {line}"
                    ran["console"] += 1
    assert ran["file"] >= 1 and ran["python"] >= 3 and ran["console"] >= 3, ran
    # The training loop ran its shortened number of steps, and the loss came down.
    losses = namespace["losses"]
    assert isinstance(losses, list) and len(losses) == int(STEPS_LINE.findall(
        TUTORIAL.read_text(encoding="utf-8"))[0])
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.1, losses
