"""The pipeline of DESIGN §4 as code: one line per arrow."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

from ssmc.check import check
from ssmc.errors import Diagnostic, SpecError
from ssmc.ir import CheckedSpec
from ssmc.lower import lower
from ssmc.parse import parse_tree


def parse(text: str, source: str = "<string>") -> CheckedSpec:
    """Spec text → checked IR: parse, lower, check."""
    tree = parse_tree(text, source)
    spec = lower(tree, source=source, text=text)
    return check(spec, text=text)


def parse_file(path: str | Path) -> CheckedSpec:
    """Read a `.ssm` file and return its checked IR (SpecError on any problem)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        problem = Diagnostic(message=f"not UTF-8 text ({err.reason})",
                             hint="a spec is a UTF-8 text file")
        raise SpecError([problem], source=str(path)) from None
    return parse(text, str(path))


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
