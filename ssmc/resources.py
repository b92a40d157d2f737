"""Where the grammar and templates live: in the installed package, or in the source tree."""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

_SOURCE_ROOT = Path(__file__).resolve().parent.parent


def data_dir(name: str) -> Path:
    """`grammar` or `templates`: the packaged copy if installed, else the source tree's."""
    packaged = resources.files("ssmc").joinpath(name)
    if packaged.is_dir():
        return Path(str(packaged))
    source = _SOURCE_ROOT / name
    if source.is_dir():
        return source
    raise FileNotFoundError(f"ssmc data folder {name!r} is missing from the installation")


@functools.cache
def grammar_text() -> str:
    """The text of the `.ssm` grammar (grammar/ssm.lark)."""
    return (data_dir("grammar") / "ssm.lark").read_text(encoding="utf-8")


def template_dir() -> Path:
    """The folder that holds the Jinja2 kernel templates."""
    return data_dir("templates")
