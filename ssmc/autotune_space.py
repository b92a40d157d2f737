"""What the autotuner may try: per form, chunk sizes and the launch options of its stage.

A candidate is (form, chunk size, launch options). The options are keyword arguments of
the form's stage launcher in the generated module (`chunked_fwd`, `quadratic_fwd`, ...),
which `forward(..., launch=...)` passes through; only options that the launcher really
takes are offered (read from its signature), so a template that drops a knob drops it
here too. Values are the powers of two and warp counts the launchers accept; each is
bounded by the chunk (rows of a chunk) or the head sizes, and a value that still does not
compile or computes wrong is rejected by the tuner's check, never trusted.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ssmc import ir
from ssmc.autotune_cache import Option
from ssmc.render import form_stage

CHUNKS = (64, 128, 256)
"""Chunk lengths Q tried for the chunked form on a GPU."""
KNOBS: Mapping[str, Mapping[str, tuple[Option, ...]]] = {
    "recurrent": {"block_p": (4, 8, 16, 32, 64), "block_t": (16, 32, 64), "num_warps": (1, 2, 4, 8)},
    "quadratic": {
        "block_i": (32, 64, 128),
        "block_j": (32, 64),
        "block_n": (32, 64, 128),
        "num_warps": (4, 8),
    },
    "chunked": {
        "block_t": (32, 64, 128),
        "block_m": (32, 64, 128),
        "heads_per_program": (1, 2, 4),
        "num_warps": (4, 8),
        "num_stages": (2, 3, 4),
        "seq_splits": (1, 2, 3, 4, 8),
    },
    "chunked_diag": {
        "block_m": (16, 32, 64),
        "block_n": (16, 32, 64),
        "num_warps": (2, 4, 8),
        "seq_splits": (1, 2, 3, 4, 8),
    },
    "toeplitz": {"block_i": (32, 64, 128), "block_j": (16, 32, 64), "num_warps": (4, 8)},
}
"""Per stage launcher: the options the coordinate search varies, one at a time."""
BACKWARD_KNOBS: Mapping[str, Mapping[str, tuple[Option, ...]]] = {
    "chunked_bwd": {
        "block_t": (32, 64, 128),
        "walk_stages": (1, 2, 3),
        "wdla_splits": (1, 2, 4, 8),
        "head_splits": (1, 2, 4, 8),
        "num_warps": (4, 8),
        "seq_splits": (1, 2, 3, 4, 8),
    },
    "chunked_diag_bwd": {
        "block_t": (32, 64, 128),
        "block_m": (16, 32),
        "head_splits": (1, 4, 16, 64),
        "num_warps": (4, 8),
    },
}
"""Per fused backward launcher (a module's BACKWARD_STAGE): the options the search varies."""
BACKWARD_CHUNK = {"chunked_bwd": 128, "chunked_diag_bwd": 64}
"""The backward launchers' default chunk, which bounds their row options."""
ROWS_OF_A_CHUNK = frozenset({"block_t", "block_m"})
"""Options that must divide the chunk length Q (≤ Q for powers of two)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Candidate:
    """One configuration to time: a form, its chunk Q (chunked only) and launch options."""

    form: str
    chunk_size: int | None = None
    launch: tuple[tuple[str, Option], ...] = ()

    @property
    def options(self) -> dict[str, Option]:
        """The launch options as keyword arguments."""
        return dict(self.launch)

    def with_option(self, name: str, value: Option) -> Candidate:
        """The same candidate with `name` set to `value`."""
        options = {**self.options, name: value}
        return Candidate(
            form=self.form, chunk_size=self.chunk_size, launch=tuple(sorted(options.items()))
        )

    def __str__(self) -> str:
        chunk = f" Q={self.chunk_size}" if self.chunk_size is not None else ""
        options = "".join(f" {k}={v}" for k, v in self.launch)
        return f"{self.form}{chunk}{options or ' (default tiles)'}"


def stage_of(checked: ir.CheckedSpec, form: str) -> str | None:
    """The stage launcher (`<stage>_fwd`) a module runs `form` with; None for the FFT."""
    return form_stage(checked, ir.Form(form))


def base_candidates(forms: tuple[str, ...], chunks: tuple[int, ...]) -> list[Candidate]:
    """Every form at its launcher's default tiles; the chunked form at every chunk in `chunks`."""
    out = []
    for form in forms:
        if form == "chunked":
            out += [Candidate(form=form, chunk_size=q) for q in chunks]
        else:
            out.append(Candidate(form=form))
    return out


def knob_values(
    checked: ir.CheckedSpec,
    module: types.ModuleType,
    candidate: Candidate,
    sizes: Mapping[str, int],
) -> dict[str, tuple[Option, ...]]:
    """The options of `candidate`'s launcher the search may vary, with their allowed values.

    `sizes`: N, P and T of the call (a tile is at most the next power of two of its dim).
    """
    stage = stage_of(checked, candidate.form)
    if stage is None or stage not in KNOBS or not hasattr(module, f"{stage}_fwd"):
        return {}
    limits = {
        "block_p": _pow2(sizes.get("P", 1)),
        "block_n": max(16, _pow2(sizes.get("N", 16))),
        "block_i": max(16, _pow2(sizes.get("T", 16))),
        "block_j": max(16, _pow2(sizes.get("T", 16))),
    }
    return _allowed(KNOBS[stage], getattr(module, f"{stage}_fwd"), limits, candidate.chunk_size)


def backward_knob_values(
    module: types.ModuleType, sizes: Mapping[str, int]
) -> dict[str, tuple[Option, ...]]:
    """The options of the module's fused backward launcher the search may vary, with their
    allowed values ({} where the module has none)."""
    stage = getattr(module, "BACKWARD_STAGE", None)
    if stage is None or stage not in BACKWARD_KNOBS or not hasattr(module, stage):
        return {}
    knobs = BACKWARD_KNOBS[stage]
    heads = sizes.get("H", 1)
    limits = {name: heads for name in knobs if name.endswith("splits")}  # splits of the heads
    return _allowed(knobs, getattr(module, stage), limits, BACKWARD_CHUNK[stage])


def _allowed(
    knobs: Mapping[str, tuple[Option, ...]],
    launcher: Callable[..., object],
    limits: Mapping[str, int],
    chunk: int | None,
) -> dict[str, tuple[Option, ...]]:
    """The knobs `launcher`'s signature takes, each with its values up to its limit (options
    of rows of a chunk up to `chunk` too); knobs left without a value are dropped."""
    accepted = set(inspect.signature(launcher).parameters)
    out = {}
    for name, values in knobs.items():
        if name not in accepted:
            continue
        bound = limits.get(name)
        if name in ROWS_OF_A_CHUNK and chunk is not None:
            bound = chunk if bound is None else min(bound, chunk)
        ok = tuple(v for v in values if not (isinstance(v, int) and bound is not None
                                             and v > bound))
        if ok:
            out[name] = ok
    return out


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
