"""Error classes, one per pass, under one base, and the `file:line:col` diagnostic format."""

from __future__ import annotations

from dataclasses import dataclass

from ssmc.expr import Span


@dataclass(frozen=True, slots=True, kw_only=True)
class Diagnostic:
    """One problem found in a spec: where, what, and how to fix it."""

    message: str
    span: Span | None = None
    hint: str | None = None

    def render(self, source: str, text: str | None) -> str:
        """`file:line:col: error: message`, the source line with carets, then the hint."""
        if self.span is None:
            head = f"{source}: error: {self.message}"
        else:
            head = f"{source}:{self.span.line}:{self.span.column}: error: {self.message}"
        lines = [head]
        if self.span is not None and text is not None:
            source_lines = text.splitlines()
            if 1 <= self.span.line <= len(source_lines):
                line = source_lines[self.span.line - 1].expandtabs(1)
                start = max(self.span.column - 1, 0)
                if self.span.end_line == self.span.line:
                    width = max(self.span.end_column - self.span.column, 1)
                else:
                    width = max(len(line) - start, 1)
                lines.append(f"    {line}")
                lines.append("    " + " " * start + "^" * width)
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)


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
        super().__init__(self.render())

    def render(self) -> str:
        """All diagnostics, formatted for a terminal."""
        return "\n".join(d.render(self.source, self.text) for d in self.diagnostics)


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
