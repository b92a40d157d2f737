"""A decode call replayed from its recorded launches (the host path of a one-token step).

A decode step's GPU work is a few microseconds; its cost at batch 1 is the host's: the
op's checks, the module's setup, the argument lists of its launches and the launcher's
specialisation key. None of these depend on anything but the call's layout (shapes,
strides, dtypes, devices), so after one call of a layout has gone through the whole path
with every launch reaching a compiled kernel's runner (the module's `record`), `Replay`
keeps those launches: a later call of the same layout allocates the outputs, puts its
tensors into the argument slots the recorded call's tensors had, and calls the runners.

Only launches whose every tensor argument is one of the call's inputs or returned outputs
(by identity) are kept: a tensor made inside the call (a buffer, a conversion, a view)
means the call cannot be replayed, and it keeps the whole path.
"""

from __future__ import annotations

from collections.abc import Sequence
from operator import itemgetter
from typing import Any

import torch
from torch import Tensor

Launch = tuple[Any, tuple[Any, ...]]
"""(runner, args): a compiled kernel's runner for its grid and the arguments it was given."""


class Replay:
    """The launches of one recorded call. Each launch's arguments are picked (one itemgetter)
    from the pool (call's inputs, its new outputs, the launch's other arguments): a tensor
    argument by the index of the input or output it was, anything else as recorded."""

    __slots__ = ("outputs", "launches")

    def __init__(
        self,
        outputs: tuple[tuple[tuple[int, ...], torch.dtype, torch.device] | None, ...],
        launches: tuple[tuple[Any, tuple[Any, ...], Any], ...],
    ) -> None:
        self.outputs = outputs
        self.launches = launches  # (runner, the launch's other arguments, its itemgetter)

    @classmethod
    def build(
        cls,
        inputs: Sequence[Tensor | None],
        outputs: Sequence[Tensor | None],
        launches: Sequence[Launch],
    ) -> Replay | None:
        """The replay of a call that took `inputs` (None: an optional one not given), returned
        `outputs` and made `launches`; None where it could not be repeated from those alone:
        a tensor argument that is neither, an input given twice (its slot would be ambiguous),
        an output that is an input or not contiguous (replays allocate contiguous ones), an
        input not 16-byte aligned (replays take aligned inputs only)."""
        slot: dict[int, int] = {}
        for i, t in enumerate(inputs):
            if t is None:
                continue
            if id(t) in slot or t.data_ptr() & 15:
                return None
            slot[id(t)] = i
        shapes: list[tuple[tuple[int, ...], torch.dtype, torch.device] | None] = []
        for j, t in enumerate(outputs):
            if t is None:
                shapes.append(None)
                continue
            if id(t) in slot or not t.is_contiguous():
                return None
            slot[id(t)] = len(inputs) + j
            shapes.append((tuple(t.shape), t.dtype, t.device))
        pool = len(inputs) + len(outputs)
        kept = []
        for runner, args in launches:
            picks: list[int] = []
            constants: list[Any] = []
            for value in args:
                if isinstance(value, Tensor):
                    source = slot.get(id(value))
                    if source is None:
                        return None
                    picks.append(source)  # no tensor of the recorded call is kept
                else:
                    picks.append(pool + len(constants))
                    constants.append(value)
            kept.append((runner, tuple(constants), _picker(picks)))
        return cls(tuple(shapes), tuple(kept))

    def __call__(self, inputs: Sequence[Tensor | None]) -> list[Tensor | None]:
        """The outputs of the call on `inputs`, laid out as the recorded call's and, as its
        were, 16-byte aligned (the compiled kernels assume it: the caller's key has it)."""
        outputs = [
            None if spec is None else torch.empty(spec[0], dtype=spec[1], device=spec[2])
            for spec in self.outputs
        ]
        for runner, constants, pick in self.launches:
            runner(*pick((*inputs, *outputs, *constants)))
        return outputs


def _picker(indices: list[int]) -> Any:
    """pool → the tuple of pool[i] for i in indices (itemgetter gives a bare item for one)."""
    if len(indices) == 1:
        (i,) = indices
        return lambda pool: (pool[i],)
    if not indices:
        return lambda pool: ()
    return itemgetter(*indices)
