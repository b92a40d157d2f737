"""The pipeline of DESIGN §4 as code: one line per arrow."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from ssmc.check import check
from ssmc.errors import Diagnostic, SpecError
from ssmc.expr import Span
from ssmc.ir import CheckedSpec
from ssmc.lower import lower
from ssmc.parse import parse_tree


def parse(text: str, source: str = "<string>") -> CheckedSpec:
    """Spec text → checked IR: parse, lower, check (line ends normalised first)."""
    text = normalize_newlines(text)
    tree = parse_tree(text, source)
    spec = lower(tree, source=source, text=text)
    return check(spec, text=text)


def parse_file(path: str | Path) -> CheckedSpec:
    """Read a `.ssm` file and return its checked IR (SpecError on any problem)."""
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(data, err, str(path)) from None
    return parse(text, str(path))


def normalize_newlines(text: str) -> str:
    """`\\r\\n` and a lone `\\r` become `\\n`: both entry points see the same lines."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _not_utf8(data: bytes, err: UnicodeDecodeError, source: str) -> SpecError:
    """A located error at the first byte that is not UTF-8 (line:col as the parser counts)."""
    before = normalize_newlines(data[: err.start].decode("utf-8"))
    line = before.count("\n") + 1
    column = len(before) - (before.rfind("\n") + 1) + 1
    span = Span(line=line, column=column, end_line=line, end_column=column + 1)
    byte = data[err.start : err.start + 1].hex()
    problem = Diagnostic(message=f"not UTF-8 text: byte 0x{byte} ({err.reason})", span=span,
                         hint="a spec is a UTF-8 text file; re-save it as UTF-8")
    text = normalize_newlines(data.decode("utf-8", errors="replace"))
    return SpecError([problem], source=source, text=text)


def with_dims(checked: CheckedSpec, dims: Mapping[str, int]) -> CheckedSpec:
    """The same spec with some dims rebound (e.g. smaller sizes for a CPU run), re-checked."""
    if not dims:
        return checked
    spec = checked.spec
    declared = {d.name for d in spec.dims}
    unknown = sorted(set(dims) - declared)
    if unknown:
        problem = Diagnostic(message=f"no dim named {', '.join(unknown)}",
                             hint="dims of this spec: " + ", ".join(sorted(declared)))
        raise SpecError([problem], source=spec.source)
    new_dims = tuple(
        dataclasses.replace(d, value=dims[d.name]) if d.name in dims else d for d in spec.dims
    )
    return check(dataclasses.replace(spec, dims=new_dims))
