"""ssmc: compile structured masked attention / state-space specs into Triton-backed ops."""

from __future__ import annotations

from ssmc.autotune import autotune
from ssmc.errors import SpecError, SsmcError, TensorError
from ssmc.ir import CheckedSpec, Form
from ssmc.load import load
from ssmc.log import configure as _configure_logging
from ssmc.pipeline import parse, parse_file
from ssmc.reference import reference

__version__ = "0.1.0"

_configure_logging()  # the `ssmc` logger's level from $SSMC_LOG (default WARNING)

__all__ = [
    "autotune",
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

# `autotune`, `load` and `reference` are imported eagerly: their submodules share their names,
# and a lazy wrapper would be replaced by the submodule as soon as anything imported it.
