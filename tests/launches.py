"""Launches of a generated module's kernels, recorded as "name(grid)" in order."""

from __future__ import annotations

from typing import Any

import pytest


def record_launches(monkeypatch: pytest.MonkeyPatch, module: Any, names: tuple[str, ...]) -> list[str]:
    """The list each launch of the kernels `names` of `module` is appended to (the kernels
    still run), for the rest of the test."""
    launched: list[str] = []

    class Recorded:
        def __init__(self, kernel: Any, name: str) -> None:
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid: Any) -> Any:
            launched.append(f"{self.name}{tuple(grid)}")
            return self.kernel[grid]

    for name in names:
        monkeypatch.setattr(module, name, Recorded(getattr(module, name), name))
    return launched
