"""Render kernel templates to Python+Triton source (the only module that imports jinja2).

`render_stage(name, **context)` renders `templates/<name>.py.jinja`; `render_module`
renders the whole generated module of a checked spec. Templates see only typed
values derived from the checked IR and the plan, never spec text.
"""

from __future__ import annotations

import functools

import jinja2

from ssmc.resources import template_dir


@functools.cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def stage_exists(name: str) -> bool:
    """Whether `templates/<name>.py.jinja` exists (a form without its stage is left out)."""
    return (template_dir() / f"{name}.py.jinja").is_file()


def render_stage(name: str, **context: object) -> str:
    """Render `templates/<name>.py.jinja` with `context` (StrictUndefined: every name must be given)."""
    return _environment().get_template(f"{name}.py.jinja").render(**context)
