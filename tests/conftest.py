"""Shared test setup: run generated kernels under the Triton interpreter when there is no GPU."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch

# triton.jit reads TRITON_INTERPRET when a kernel is decorated, so it is set before any
# generated module is imported; on a GPU machine the same tests run the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite golden files (expected diagnostics, rendered kernels)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run scripts/gpu_check.sh there)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def gen(request: pytest.FixtureRequest) -> torch.Generator:
    """A generator seeded from the test id: fresh inputs per case, reproducible per run."""
    seed = int.from_bytes(hashlib.sha256(request.node.nodeid.encode()).digest()[:7], "little")
    return torch.Generator().manual_seed(seed)
