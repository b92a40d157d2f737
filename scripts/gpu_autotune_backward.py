"""Tune the fused backward's launch options of a spec on this GPU, per call shape.

For each shape the chunked forward is timed at Q = 64, 128, 256 (no forward search), then
the backward's launcher (the module's BACKWARD_STAGE) at its defaults and one option at a
time, every candidate's gradients checked against fp64 autograd through the reference. The
winners go into the autotune cache the op reads ($SSMC_CACHE_DIR unless --cache-dir), so a
benchmark run after this one in the same environment runs them.

    python scripts/gpu_autotune_backward.py --shape 4x4096 --shape 1x16384 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    import ssmc
    from ssmc.autotune_space import CHUNKS, Candidate
    from ssmc.cli import _batch_by_seqlen
    from ssmc.pipeline import parse_file, with_dims

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "examples" / "mamba2.ssm"))
    parser.add_argument("--shape", action="append", metavar="BATCHxSEQLEN")
    parser.add_argument("--dim", action="append", default=[], metavar="NAME=INT")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    dims = {k: int(v) for k, v in (d.split("=") for d in args.dim)}
    checked = with_dims(parse_file(args.spec), dims)
    rows = []
    for text in args.shape or ["4x4096"]:
        batch, seqlen = _batch_by_seqlen(text)
        started = time.perf_counter()
        result = ssmc.autotune(
            checked, batch=batch, seqlen=seqlen, cache_dir=args.cache_dir, backward=True,
            candidates=[Candidate(form="chunked", chunk_size=q) for q in CHUNKS],
            progress=False,
        )
        seconds = time.perf_counter() - started
        print(f"== {checked.spec.name} {batch} × {seqlen} ({seconds:.0f} s)")
        print("  " + result.table().replace("\n", "\n  "), flush=True)
        w = result.winner
        rows.append({
            "spec": checked.spec.name, "batch": batch, "seqlen": seqlen,
            "forward": {"form": w.form, "chunk_size": w.chunk_size, "time_s": w.time_s},
            "backward": dict(w.backward), "backward_time_s": w.backward_time_s,
            "backward_default_time_s": w.backward_default_time_s,
            "backward_error": w.backward_error,
            "trials": [
                {"candidate": str(t.candidate), "time_s": t.time_s, "error": t.error,
                 "rejected": t.rejected}
                for t in result.backward_trials
            ],
            "tune_seconds": seconds,
        })
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
