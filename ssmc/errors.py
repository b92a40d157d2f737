"""Error classes, one per pass, under one base, and the `file:line:col` diagnostic format."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from ssmc.expr import Span

MAX_REPORTED = 20
"""Diagnostics a SpecError prints; the rest are counted ("and N more"), all stay in `.diagnostics`."""
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
"""Unicode categories never printed as they are: controls, format (bidi, zero-width), line and
paragraph separators, surrogates, private and unassigned code points."""


def visible(text: str) -> str:
    """`text` safe for a terminal: each control, bidi, zero-width or separator character but
    `\\n` is written as its escape (`\\x1b`, `\\u202e`); a tab is one space (as lark counts)."""
    if text.isprintable():
        return text
    return "".join(_visible_char(c) for c in text)


def _visible_char(char: str) -> str:
    if char == "\t":
        return " "
    if char == "\n" or unicodedata.category(char) not in _HIDDEN:
        return char
    return repr(char)[1:-1]


def _width(char: str) -> int:
    """Terminal columns one character of a shown line takes (wide East Asian forms take two)."""
    shown = _visible_char(char)
    if len(shown) != 1:
        return len(shown)
    if unicodedata.combining(char):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def source_lines(text: str) -> list[str]:
    """The lines of a spec as the parser counts them: `\\n`, `\\r\\n` and a lone `\\r`
    end a line (ssmc.parse normalises the last two before lexing), nothing else does."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.split("\n")


@dataclass(frozen=True, slots=True, kw_only=True)
class Diagnostic:
    """One problem found in a spec: where, what, and how to fix it."""

    message: str
    span: Span | None = None
    hint: str | None = None

    def render(self, source: str, text: str | None) -> str:
        """`file:line:col: error: message`, the source line with carets, then the hint."""
        return self.render_lines(source, None if text is None else source_lines(text))

    def render_lines(self, source: str, lines: list[str] | None) -> str:
        """`render` with the text already split by `source_lines` (one split per error)."""
        where = "" if self.span is None else f":{self.span.line}:{self.span.column}"
        out = [visible(f"{source}{where}: error: {self.message}")]
        span = self.span
        if span is not None and lines is not None and 1 <= span.line <= len(lines):
            line = lines[span.line - 1]
            start = min(max(span.column - 1, 0), len(line))
            if span.end_line == span.line:
                end = min(max(span.end_column - 1, start + 1), len(line))
            else:
                end = len(line)
            pad = sum(_width(c) for c in line[:start])
            width = max(sum(_width(c) for c in line[start:end]), 1)
            out.append(f"    {visible(line)}")
            out.append("    " + " " * pad + "^" * width)
        if self.hint:
            out.append(visible(f"hint: {self.hint}"))
        return "\n".join(out)


class SsmcError(Exception):
    """Base of every error ssmc reports to a user (the CLI prints it and exits 2)."""


class SpecError(SsmcError):
    """Problems in a spec, each with its location; raised together by one pass."""

    def __init__(
        self, diagnostics: list[Diagnostic], *, source: str = "<string>", text: str | None = None
    ) -> None:
        self.diagnostics = tuple(diagnostics)
        self.source = source
        self.text = text
        self._rendered: str | None = None
        super().__init__()

    def __str__(self) -> str:
        return self.render()

    def render(self) -> str:
        """The first MAX_REPORTED diagnostics formatted for a terminal (rendered once, on
        demand: a pass may find thousands), then how many more there are."""
        if self._rendered is None:
            lines = None if self.text is None else source_lines(self.text)
            shown = [d.render_lines(self.source, lines) for d in self.diagnostics[:MAX_REPORTED]]
            more = len(self.diagnostics) - MAX_REPORTED
            if more > 0:
                shown.append(f"… and {more} more error{'s' if more > 1 else ''}")
            self._rendered = "\n".join(shown)
        return self._rendered


class ParseError(SpecError):
    """The text does not follow the grammar."""


class LowerError(SpecError):
    """The syntax tree has a construct the IR cannot hold (unknown mask, bad keyword...)."""


class CheckError(SpecError):
    """The spec is well-formed but inconsistent (shapes, heads, undeclared names...)."""


class TensorError(SsmcError, ValueError):
    """A tensor handed to an op or reference does not match the spec (shape, dtype, device)."""


class CacheError(SsmcError):
    """An on-disk cache entry could not be read or written."""
