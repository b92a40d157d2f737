"""The autotuner's persistent cache: measured winners, one JSON file in the ssmc cache folder.

An entry is found by a key over what decides the winner (DESIGN §4): the GPU (name and
compute capability), the shape bucket (powers of two of batch·seqlen and of the number of
sequences, so uneven `cu_seqlens` with the same totals share an entry), the call-time
dims, the input dtype, the spec hash, and the ssmc/Triton/torch versions with the digest
of ssmc's sources. The file is `{"format", "entries", "sha256"}`, the digest over the
entries: it is read without a lock, rewritten whole under a file lock (read, merge,
temporary file, fsync, rename), so concurrent tuners never lose each other's entries and
no reader sees half a file. A damaged file is reported once per process, ignored (the
planner decides) and replaced by the next write.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from ssmc import ir
from ssmc.cost_terms import Shape

FILE_NAME = "autotune.json"
FORMAT = "ssmc-autotune/1"
Option = int | str
_REPORTED: set[str] = set()


@dataclass(frozen=True, slots=True, kw_only=True)
class Winner:
    """The fastest correct candidate of one tuning, and what the planner would have run."""

    form: str
    chunk_size: int | None
    launch: Mapping[str, Option] = field(default_factory=dict)
    """Keyword options of the form's stage launcher (tiles, num_warps, num_stages)."""
    time_s: float
    """Its measured time per call."""
    planner_form: str = ""
    planner_chunk: int | None = None
    planner_time_s: float | None = None
    """The measured time of the planner's choice at its default tiles (None: not measured)."""
    error: float = 0.0
    """Its ‖out − ref‖/‖ref‖ against the fp64 reference."""
    backward: Mapping[str, Option] = field(default_factory=dict)
    """Keyword options of the fused backward's launcher (the module's BACKWARD_STAGE);
    empty when the backward was not tuned, or its defaults won."""
    backward_time_s: float | None = None
    """The tuned backward's measured time per call (None: not tuned)."""
    backward_default_time_s: float | None = None
    """The backward's measured time at its launcher's defaults (None: not tuned)."""
    backward_error: float | None = None
    """The tuned backward's largest ‖grad − ref‖/‖ref‖ against the fp64 reference."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Key:
    """What a tuned winner depends on; `digest` is the entry's name in the file."""

    device: str
    capability: str
    tokens: int
    """Power of two ≥ batch·seqlen."""
    seqs: int
    """Power of two ≥ the number of sequences (batch, or num_seqs when packed)."""
    varlen: bool
    dims: tuple[tuple[str, int], ...]
    dtype: str
    spec_hash: str
    versions: tuple[tuple[str, str], ...]

    @property
    def digest(self) -> str:
        """sha256 of the canonical JSON of every field."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def make_key(
    checked: ir.CheckedSpec,
    shape: Shape,
    *,
    dtype: str,
    varlen: bool,
    device: tuple[str, str] | None = None,
) -> Key:
    """The key of `checked` at `shape` (its bucket) on `device` ((name, capability); the
    present one by default)."""
    from ssmc.render import spec_hash

    name, capability = device if device is not None else device_identity()
    declared = {d.name for d in checked.spec.dims if d.value is None}
    return Key(
        device=name,
        capability=capability,
        tokens=_pow2(shape.batch * shape.seqlen),
        seqs=_pow2(shape.batch * shape.num_seqs),
        varlen=varlen,
        dims=tuple((k, v) for k, v in sorted(shape.dims.items()) if k in declared),
        dtype=dtype,
        spec_hash=spec_hash(checked),
        versions=tuple(sorted(versions().items())),
    )


def device_identity() -> tuple[str, str]:
    """(name, compute capability) of the GPU torch uses; the interpreter or CPU otherwise."""
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        return "cpu-interpreter", "cpu"
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


@functools.cache
def versions() -> dict[str, str]:
    """ssmc, Triton and torch versions, and the digest of ssmc's sources and templates."""
    from ssmc.render import build_digest, tool_versions

    return {**tool_versions(), "build": build_digest()[:16]}


def store_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache file: `<cache_dir or $SSMC_CACHE_DIR or ~/.cache/ssmc>/autotune.json`."""
    from ssmc.load import default_cache_dir

    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / FILE_NAME


def lookup(key: Key, cache_dir: str | os.PathLike[str] | None = None) -> Winner | None:
    """The stored winner for `key`, or None (no entry, or a damaged file: reported once)."""
    raw = read_entries(store_path(cache_dir)).get(key.digest)
    return None if raw is None else _winner(raw["winner"])


def record(key: Key, winner: Winner, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Store `winner` under `key`, keeping every other entry (atomic, under a file lock)."""
    from ssmc.errors import CacheError
    from ssmc.load import _write_atomic

    path = store_path(cache_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CacheError(f"cannot create the cache folder {path.parent}: {err}") from err
    with FileLock(str(path) + ".lock"):
        entries = read_entries(path)
        entries[key.digest] = {"key": asdict(key), "winner": asdict(winner)}
        _write_atomic(path, dumps(entries))
    return path


def dumps(entries: Mapping[str, Any]) -> str:
    """The file text of `entries`: format, entries, and the sha256 of the entries' JSON."""
    body = _canonical(entries)
    digest = hashlib.sha256(body.encode()).hexdigest()
    return json.dumps({"format": FORMAT, "entries": entries, "sha256": digest}, indent=1) + "\n"


def read_entries(path: Path) -> dict[str, Any]:
    """The entries of the file at `path`; {} when absent, or when damaged (said once)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as err:
        return _damaged(path, str(err))
    try:
        data = json.loads(text)
        entries = data["entries"]
        ok = data["format"] == FORMAT and isinstance(entries, dict)
        ok = ok and hashlib.sha256(_canonical(entries).encode()).hexdigest() == data["sha256"]
        if ok:
            for raw in entries.values():
                _winner(raw["winner"])
    except (ValueError, KeyError, TypeError) as err:
        return _damaged(path, f"{type(err).__name__}: {err}")
    if not ok:
        return _damaged(path, "its checksum or format does not match")
    return dict(entries)


def _damaged(path: Path, why: str) -> dict[str, Any]:
    if str(path) not in _REPORTED:
        _REPORTED.add(str(path))
        warnings.warn(
            f"ssmc: the autotune cache {path} is damaged ({why}); ignoring it, the next "
            "autotune rewrites it",
            RuntimeWarning,
            stacklevel=3,
        )
    return {}


def _winner(raw: Any) -> Winner:
    """A Winner from its JSON object, every field checked (TypeError/KeyError when wrong)."""
    if not isinstance(raw, dict) or not isinstance(raw["form"], str):
        raise TypeError("a winner must be an object with a form")
    launch, backward = raw.get("launch", {}), raw.get("backward", {})
    for options in (launch, backward):
        if not isinstance(options, dict) or not all(
            isinstance(k, str) and isinstance(v, int | str) for k, v in options.items()
        ):
            raise TypeError("launch options must map names to ints or strings")
    chunk = raw.get("chunk_size")
    if chunk is not None and not isinstance(chunk, int):
        raise TypeError("chunk_size must be an int or null")
    time_s = float(raw["time_s"])
    if not math.isfinite(time_s) or time_s <= 0:
        raise ValueError("time_s must be a positive number")
    planner_time = raw.get("planner_time_s")
    return Winner(
        form=raw["form"],
        chunk_size=chunk,
        launch=dict(launch),
        time_s=time_s,
        planner_form=str(raw.get("planner_form", "")),
        planner_chunk=raw.get("planner_chunk"),
        planner_time_s=None if planner_time is None else float(planner_time),
        error=float(raw.get("error", 0.0)),
        backward=dict(backward),
        backward_time_s=_seconds(raw.get("backward_time_s")),
        backward_default_time_s=_seconds(raw.get("backward_default_time_s")),
        backward_error=None if raw.get("backward_error") is None else float(raw["backward_error"]),
    )


def _seconds(raw: Any) -> float | None:
    """A measured time from JSON: None, or a positive finite number (ValueError otherwise)."""
    if raw is None:
        return None
    seconds = float(raw)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError("a measured time must be a positive number")
    return seconds


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def tuned(
    checked: ir.CheckedSpec,
    shape: Shape,
    *,
    dtype: str,
    varlen: bool,
    forms: tuple[str, ...],
    cache_dir: str | os.PathLike[str] | None = None,
) -> Winner | None:
    """The stored winner for a call (what the op runs instead of the planner's choice), or
    None when there is none for this device and bucket or its form is not in `forms`."""
    winner = lookup(make_key(checked, shape, dtype=dtype, varlen=varlen), cache_dir)
    if winner is None or winner.form not in forms:
        return None
    return winner
