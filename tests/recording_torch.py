"""A stand-in for torch inside a rendered stage module: float buffers it allocates start
as NaN (so a kernel that leaves part of one unwritten shows), and their shapes are
recorded (so a test can show that no per-head gradient buffer exists)."""

from __future__ import annotations

import torch


class RecordingTorch:
    """torch for a stage module: `empty` / `empty_like` results poisoned and recorded."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def __getattr__(self, name: str) -> object:
        return getattr(torch, name)

    def _poison(self, out: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(out.shape))
        return out.fill_(float("nan")) if out.is_floating_point() else out

    def empty(self, *args, **kwargs) -> torch.Tensor:
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs) -> torch.Tensor:
        return self._poison(torch.empty_like(*args, **kwargs))
