"""Autotune the Mamba-2 2.7B layer and Mamba-1 at benchmark shapes; planner vs best measured.

Per shape: every form at default tiles (the chunked form at Q = 64, 128, 256) is run,
checked against fp64 and timed on this GPU (ssmc.autotune), optionally followed by the
coordinate search over launch options (--search). Printed and written as JSON: the
planner's form and chunk, its measured time, the best measured (form, chunk) at default
tiles and overall, their ratio (issue 5's target: planner within 10 % of the best), and
the cost model's estimate beside the measured time of every form, for calibrating it.
A shape that fails is recorded with its error and the run goes on; the JSON is rewritten
after every shape, so a run cut short still leaves its rows.

    python scripts/gpu_autotune.py --out "$OUT"                 # on the GPU machine
    TRITON_INTERPRET=1 python scripts/gpu_autotune.py --tiny    # CPU: tiny dims and shapes
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MAMBA2_SHAPES = ((8, 2048), (4, 4096), (2, 8192), (1, 16384), (16, 256), (64, 64))
"""The 2.7B layer's four 16384-token shapes, and short T where the quadratic form may win."""
MAMBA1_SHAPES = ((2, 4096), (8, 2048), (1, 16384), (16, 256), (2, 512))
MAMBA1_WIDE = ({"H": 1536}, ((2, 2048), (1, 8192)))
"""Mamba-1 with the channel count of a real layer (d_inner of the 130M model)."""
TINY = (
    ("mamba2.ssm", {"H": 2, "G": 1, "N": 16, "P": 16}, ((1, 32),)),
    ("mamba1.ssm", {"H": 4, "N": 8}, ((1, 16),)),
)
TARGET = 1.10
"""The planner's measured time may be at most 10 % above the best measured (issue 5)."""


def jobs(tiny: bool) -> list[tuple[Path, dict[str, int], tuple[tuple[int, int], ...]]]:
    """(spec file, dims to rebind, shapes) to tune: real sizes, or tiny ones for the CPU."""
    if tiny:
        return [(ROOT / "examples" / name, dims, shapes) for name, dims, shapes in TINY]
    mamba1 = sorted((ROOT / "examples").glob("mamba1*.ssm"))
    wide_dims, wide_shapes = MAMBA1_WIDE
    return [
        (ROOT / "examples" / "mamba2.ssm", {}, MAMBA2_SHAPES),
        *((path, {}, MAMBA1_SHAPES) for path in mamba1),
        *((path, dict(wide_dims), wide_shapes) for path in mamba1),
    ]


def tune_one(
    path: Path,
    dims: dict[str, int],
    batch: int,
    seqlen: int,
    *,
    dtype: str | None,
    search: bool,
    cache_dir: str,
) -> dict[str, Any]:
    """Autotune one shape and compare the planner's pick with the best measured."""
    import ssmc
    from ssmc.cost import Shape
    from ssmc.devices import detect
    from ssmc.pipeline import parse_file, with_dims
    from ssmc.plan import plan

    at = importlib.import_module("ssmc.autotune")
    checked = with_dims(parse_file(path), dims)
    started = time.perf_counter()
    result = ssmc.autotune(
        checked,
        batch=batch,
        seqlen=seqlen,
        dtype=dtype,
        cache_dir=cache_dir,
        search=search,
        progress=sys.stderr.isatty(),
    )
    seconds = time.perf_counter() - started
    dtype_bytes = at.DTYPES[result.key.dtype].itemsize
    planned = plan(
        checked, Shape(batch=batch, seqlen=seqlen, dtype_bytes=dtype_bytes), device=detect()
    )
    measured: dict[str, float] = {}
    for t in result.trials:
        c = t.candidate
        if t.time_s is not None and not c.launch:
            label = c.form + (f"/Q{c.chunk_size}" if c.chunk_size else "")
            measured[label] = t.time_s
    defaults = [t for t in result.trials if t.time_s is not None and not t.candidate.launch]
    best_default = min(defaults, key=lambda t: t.time_s or 0.0)
    winner, planner_s = result.winner, result.winner.planner_time_s
    return {
        "spec": checked.spec.name,
        "file": str(path.relative_to(ROOT)),
        "dims": {d.name: d.value for d in checked.spec.dims},
        "rebound": dims,
        "batch": batch,
        "seqlen": seqlen,
        "dtype": result.key.dtype,
        "planner": {
            "form": winner.planner_form,
            "chunk_size": winner.planner_chunk if winner.planner_form == "chunked" else None,
            "measured_s": planner_s,
            "reason": planned.reason,
        },
        "best_default": _candidate(best_default.candidate, best_default.time_s),
        "best": {
            "form": winner.form,
            "chunk_size": winner.chunk_size,
            "launch": dict(winner.launch),
            "time_s": winner.time_s,
        },
        "ratio_default": None if planner_s is None else planner_s / (best_default.time_s or 1),
        "ratio": result.ratio,
        "within_target": None if result.ratio is None else result.ratio <= TARGET,
        "estimated_s": {
            e.form.value + (f"/Q{e.chunk_size}" if e.form.value == "chunked" else ""): e.time_s
            for e in planned.estimates
        },
        "measured_s": measured,
        "rejected": [
            {"candidate": str(t.candidate), "why": t.rejected}
            for t in result.trials
            if t.time_s is None
        ],
        "trials": len(result.trials),
        "tune_seconds": seconds,
    }


def _candidate(c: Any, time_s: float | None) -> dict[str, Any]:
    return {"form": c.form, "chunk_size": c.chunk_size, "launch": c.options, "time_s": time_s}


def environment() -> dict[str, Any]:
    """Device, versions and date of the run."""
    import torch
    import triton

    from ssmc.autotune_cache import device_identity, versions

    name, capability = device_identity()
    return {
        "device": name,
        "capability": capability,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "ssmc_build": versions().get("build"),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "command": " ".join(sys.argv),
    }


def line(row: dict[str, Any]) -> str:
    """One printed line per shape: planner pick vs best, with the ratio."""
    head = f"{row['spec']:8s} {row['batch']:>3d} × {row['seqlen']:<6d}"
    if row.get("rebound"):
        head += " " + ",".join(f"{k}={v}" for k, v in row["rebound"].items())
    if "error" in row:
        return f"{head} FAILED: {row['error']}"
    p, b = row["planner"], row["best_default"]
    pick = p["form"] + (f"/Q{p['chunk_size']}" if p["chunk_size"] else "")
    best = b["form"] + (f"/Q{b['chunk_size']}" if b["chunk_size"] else "")
    ratio = row["ratio_default"]
    verdict = "—" if ratio is None else ("ok" if ratio <= TARGET else "MISS")
    ratio_text = "n/a" if ratio is None else f"{ratio:.2f}×"
    return (
        f"{head} planner {pick:14s} {_ms(p['measured_s'])}  best {best:14s} "
        f"{_ms(b['time_s'])}  ratio {ratio_text} {verdict}  (tuned {_ms(row['best']['time_s'])})"
    )


def _ms(seconds: float | None) -> str:
    return "     n/a" if seconds is None else f"{seconds * 1e3:8.3f} ms"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"), help="output folder")
    parser.add_argument("--tiny", action="store_true", help="tiny dims and shapes (CPU/CI)")
    parser.add_argument("--search", action="store_true", help="also search launch options")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--only", help="tune only specs whose name contains this")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=540.0,
        help="start no new shape after this many seconds (default 540)",
    )
    args = parser.parse_args(argv)
    if args.tiny or not _has_gpu():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.tiny = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"environment": environment(), "target": TARGET, "rows": []}
    cache_dir = tempfile.mkdtemp(prefix="ssmc-autotune-")
    failures, started = 0, time.monotonic()
    for path, dims, shapes in jobs(args.tiny):
        if args.only and args.only not in path.stem:
            continue
        for batch, seqlen in shapes:
            if time.monotonic() - started > args.budget_s:
                report["rows"].append(
                    {
                        "spec": path.stem,
                        "batch": batch,
                        "seqlen": seqlen,
                        "rebound": dims,
                        "skipped": "time budget spent",
                    }
                )
                print(f"{path.stem} {batch} × {seqlen}: skipped (time budget)", flush=True)
                continue
            try:
                row = tune_one(
                    path,
                    dims,
                    batch,
                    seqlen,
                    dtype=args.dtype,
                    search=args.search,
                    cache_dir=cache_dir,
                )
            except Exception as exc:  # one failing shape must not lose the others
                failures += 1
                row = {
                    "spec": path.stem,
                    "batch": batch,
                    "seqlen": seqlen,
                    "rebound": dims,
                    "error": f"{type(exc).__name__}: {exc}"[:500],
                    "traceback": traceback.format_exc(limit=-4),
                }
            report["rows"].append(row)
            print(line(row), flush=True)
            (out / "autotune.json").write_text(json.dumps(report, indent=1) + "\n")
    rows = [r for r in report["rows"] if r.get("ratio_default") is not None]
    missed = [r for r in rows if r["ratio_default"] > TARGET]
    print(
        f"{len(rows) - len(missed)}/{len(rows)} shapes within {TARGET:.2f}× of the best "
        f"measured; {failures} failed; wrote {out / 'autotune.json'}"
    )
    return 1 if failures else 0


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"


if __name__ == "__main__":
    sys.exit(main())
