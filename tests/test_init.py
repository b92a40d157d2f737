"""The package's public names stay callable even after their submodules are imported."""

from __future__ import annotations

import importlib


def test_load_and_reference_survive_submodule_imports() -> None:
    importlib.import_module("ssmc.load")
    importlib.import_module("ssmc.reference")
    import ssmc

    assert callable(ssmc.load) and ssmc.load.__module__ == "ssmc.load"
    assert callable(ssmc.reference) and ssmc.reference.__module__ == "ssmc.reference"
    assert callable(ssmc.parse_file)
