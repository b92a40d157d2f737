"""parse: `.ssm` text → lark syntax tree, or a ParseError with location and what was expected."""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable

import lark

from ssmc.errors import Diagnostic, ParseError
from ssmc.expr import FUNC_NAMES, Span
from ssmc.resources import grammar_text

MAX_SOURCE_CHARS = 200_000
MAX_NESTING = 64

KEYWORDS = (
    "ssm",
    "dim",
    "input",
    "param",
    "output",
    "let",
    "mask",
    "query",
    "key",
    "value",
    "skip",
    "gate",
    "initial_state",
    "final_state",
    "varlen",
)

_TERMINAL_WORDS = {
    "NAME": "a name",
    "INT": "an integer",
    "NUMBER": "a number",
    "TENSOR_KIND": "`input` or `param`",
    "ROLE": "a role (query, key, value, skip, gate)",
    "FLAG": "a flag (initial_state, final_state, varlen)",
    "LPAR": "`(`",
    "RPAR": "`)`",
    "LSQB": "`[`",
    "RSQB": "`]`",
    "COMMA": "`,`",
    "COLON": "`:`",
    "EQUAL": "`=`",
    "PLUS": "`+`",
    "MINUS": "`-`",
    "STAR": "`*`",
    "SLASH": "`/`",
    "__ANON_0": "`**`",
    "$END": "the end of the file",
}


@functools.cache
def _parser() -> lark.Lark:
    return lark.Lark(grammar_text(), parser="lalr", propagate_positions=True, maybe_placeholders=True)


def parse_tree(text: str, source: str = "<string>") -> lark.Tree:
    """Parse spec text into its lark syntax tree (no meaning attached yet)."""
    _check_limits(text, source)
    try:
        return _parser().parse(text)
    except lark.exceptions.UnexpectedInput as err:
        raise ParseError([_diagnose(err, text)], source=source, text=text) from None


def _check_limits(text: str, source: str) -> None:
    """Refuse texts whose size or nesting would make later passes slow or recursive."""
    if len(text) > MAX_SOURCE_CHARS:
        raise ParseError(
            [Diagnostic(message=f"spec is {len(text)} characters long; the limit is "
                        f"{MAX_SOURCE_CHARS}", hint="a spec declares one layer in a few lines")],
            source=source,
            text=text,
        )
    if not text.strip():
        raise ParseError(
            [Diagnostic(message="the spec is empty",
                        hint="a spec starts with `ssm NAME`; see examples/ for complete ones")],
            source=source,
            text=text,
        )
    level = 0
    line, column = 1, 0
    in_comment = False
    for char in text:
        column += 1
        if char == "\n":
            line, column, in_comment = line + 1, 0, False
            continue
        if in_comment:
            continue
        if char == "#":
            in_comment = True
        elif char in "([":
            level += 1
            if level > MAX_NESTING:
                span = Span(line=line, column=column, end_line=line, end_column=column + 1)
                raise ParseError(
                    [Diagnostic(message=f"brackets nested deeper than {MAX_NESTING} levels",
                                span=span, hint="split the expression with `let`")],
                    source=source,
                    text=text,
                )
        elif char in ")]":
            level = max(level - 1, 0)


def _diagnose(err: lark.exceptions.UnexpectedInput, text: str) -> Diagnostic:
    line, column = max(err.line, 1), max(err.column, 1)
    if isinstance(err, lark.exceptions.UnexpectedCharacters):
        position = err.pos_in_stream or 0
        char = text[position] if position < len(text) else ""
        span = Span(line=line, column=column, end_line=line, end_column=column + 1)
        return Diagnostic(
            message=f"unexpected character {char!r}",
            span=span,
            hint=_hint_expected(err.allowed) if err.allowed else
            "names are ASCII letters, digits and `_`; comments start with `#`",
        )
    if isinstance(err, lark.exceptions.UnexpectedEOF):
        last = text.rstrip().splitlines() or [""]
        end_line = len(last)
        end_col = len(last[-1]) + 1
        span = Span(line=end_line, column=end_col, end_line=end_line, end_column=end_col + 1)
        return Diagnostic(message="the file ends in the middle of a statement", span=span,
                          hint=_hint_expected(err.expected))
    assert isinstance(err, lark.exceptions.UnexpectedToken)
    token = err.token
    if token.type == "$END":
        return _diagnose(lark.exceptions.UnexpectedEOF(err.expected), text)
    width = max(len(str(token)), 1)
    span = Span(line=line, column=column, end_line=line, end_column=column + width)
    expected = set(err.expected) | set(getattr(err, "accepts", None) or ())
    if "$END" in expected and "MINUS" not in expected:
        # After a whole mask statement: `*`, `+` (mask algebra) and a `)` that LALR state
        # merging brings in would only crowd the statement keywords out of the hint.
        expected -= {"RPAR", "STAR", "PLUS"}
    message = f"unexpected {_describe(token)}"
    hint = _hint_expected(expected)
    suggestion = _suggest_keyword(str(token), expected) if token.type == "NAME" else None
    if suggestion:
        hint = f"did you mean `{suggestion}`? ({hint})"
    if err.state is not None and token.type == "NAME" and str(token) in KEYWORDS:
        message = f"`{token}` is a keyword and cannot be used here"
    return Diagnostic(message=message, span=span, hint=hint)


def _describe(token: lark.Token) -> str:
    if token.type in ("NAME", "INT", "NUMBER"):
        return f"{_TERMINAL_WORDS[token.type].split()[-1]} `{token}`"
    return f"`{token}`"


def _hint_expected(expected: Iterable[object]) -> str:
    words = sorted({_terminal_word(str(t)) for t in expected})
    if not words:
        return "check the statement against docs/language.md"
    if len(words) > 8:
        words = words[:8] + ["…"]
    return "expected " + ", ".join(words)


def _terminal_word(name: str) -> str:
    if name in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[name]
    lowered = name.lower()
    if lowered in KEYWORDS:
        return f"`{lowered}`"
    return name.lower()


def _suggest_keyword(word: str, expected: set[str]) -> str | None:
    """The keyword or function nearest to a misspelt word, if one is close."""
    candidates = [k for k in KEYWORDS if k.upper() in expected or _keyword_allowed(k, expected)]
    candidates += list(FUNC_NAMES) if "NAME" in expected else []
    match = difflib.get_close_matches(word, candidates or list(KEYWORDS), n=1, cutoff=0.6)
    return match[0] if match else None


def _keyword_allowed(keyword: str, expected: set[str]) -> bool:
    if keyword in ("input", "param"):
        return "TENSOR_KIND" in expected
    if keyword in ("query", "key", "value", "skip", "gate"):
        return "ROLE" in expected
    if keyword in ("initial_state", "final_state", "varlen"):
        return "FLAG" in expected
    return False
