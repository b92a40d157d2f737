"""ssmc: compile structured masked attention / state-space specs into Triton-backed ops."""

from __future__ import annotations

from typing import Any

from ssmc.errors import SpecError, SsmcError, TensorError
from ssmc.ir import CheckedSpec, Form
from ssmc.pipeline import parse, parse_file

__version__ = "0.1.0"

__all__ = [
    "CheckedSpec",
    "Form",
    "SpecError",
    "SsmcError",
    "TensorError",
    "__version__",
    "load",
    "parse",
    "parse_file",
    "reference",
]


def reference(spec: CheckedSpec, form: Form | str | None = None, **options: Any) -> Any:
    """The PyTorch reference of a checked spec in one form (see ssmc.reference)."""
    from ssmc.reference import reference as build

    return build(spec, form, **options)


def load(spec: Any, **options: Any) -> Any:
    """Compile a spec (path, text or CheckedSpec) into a callable op (see ssmc.load)."""
    from ssmc.load import load as build

    return build(spec, **options)
