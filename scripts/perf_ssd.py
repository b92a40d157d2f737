"""Issue-5 diagnostics of the ssmc SSD forward on the GPU, in one call.

1. check: the bench's inputs (bf16 x/z/B/C, fp32 dt/A/dt_bias/D) at the Mamba-2 2.7B layer
   shape against the fp64 reference (‖y − ref‖/‖ref‖ ≤ 1e-2, state ≤ 1e-2, y's dtype bf16);
   fresh random inputs (never zeros).
2. stages: CUDA-graph medians of prologue, chunked_state, chunked_scan (C Bᵀ + scan, with
   the fused epilogue) and the whole op per chunk size, plus the scan/state knob variants
   given by --sweep.
3. host: CPU time of a plain call (no sync, the launches only), the synchronised wall time
   of a plain call, and a cProfile of plain calls (top functions by own time).

Usage (GPU machine, same environment as scripts/gpu_check.sh):
    python3 scripts/perf_ssd.py [--sweep JSON] [--shapes 8x2048,1x16384] [--no-host] [--json PATH]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch
import triton.testing

from ssmc.load import load, load_module
from ssmc.pipeline import parse_file, with_dims
from ssmc.reference import reference

KEYS = ("x", "dt", "B", "C", "z", "A", "dt_bias", "D")


class b:  # noqa: N801 - the bench's shape constants and inputs, as scripts/bench_ssd.py had them
    """The Mamba-2 2.7B layer: H = 80, P = 64, N = 128, G = 1."""

    ROOT = Path(__file__).resolve().parent.parent
    H, P, N, G = 80, 64, 128, 1

    @staticmethod
    def make_inputs(batch: int, T: int) -> dict[str, torch.Tensor]:
        """Random inputs (never zeros): bf16 x, z, B, C; fp32 dt, A, dt_bias, D."""
        gen = torch.Generator(device="cuda").manual_seed(0)
        kw: dict[str, object] = {"device": "cuda", "generator": gen}
        H, P, N, G = b.H, b.P, b.N, b.G
        return {
            "x": torch.randn(batch, T, H, P, dtype=torch.bfloat16, **kw),
            "z": torch.randn(batch, T, H, P, dtype=torch.bfloat16, **kw),
            "dt": torch.randn(batch, T, H, dtype=torch.float32, **kw) - 2.0,
            "B": torch.randn(batch, T, G, N, dtype=torch.bfloat16, **kw),
            "C": torch.randn(batch, T, G, N, dtype=torch.bfloat16, **kw),
            "A": -torch.rand(H, dtype=torch.float32, **kw) * 4 - 0.5,
            "dt_bias": torch.rand(H, dtype=torch.float32, **kw) * 0.5,
            "D": torch.randn(H, dtype=torch.float32, **kw),
        }


def ms(fn) -> float:  # type: ignore[no-untyped-def]
    """Median µs of CUDA-graph replays."""
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")) * 1e3


def check(op, spec, batch: int, T: int, seed: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Relative errors of y and the final state against the fp64 reference."""
    torch.manual_seed(seed)
    t = b.make_inputs(batch, T)
    t["x"] = torch.randn_like(t["x"])  # fresh draws, not the bench's seed
    y, state = op(**t, form="chunked")
    torch.cuda.synchronize()
    want, want_state = reference(spec)(**{k: v.double() for k, v in t.items()})
    err = ((y.double() - want).norm() / want.norm()).item()
    err_s = ((state.double() - want_state).norm() / want_state.norm()).item()
    ok = y.dtype == torch.bfloat16 and err <= 1e-2 and err_s <= 1e-2 and bool(y.isfinite().all())
    return {"batch": batch, "T": T, "dtype": str(y.dtype), "err_y": err, "err_state": err_s, "ok": ok}


def stages(m, op, batch: int, T: int, sweep: dict) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Per-stage CUDA-graph medians (µs)."""
    t = b.make_inputs(batch, T)
    tensors = tuple(t[k] for k in KEYS)
    sizes = m._bind(tensors)
    x, s, la, B, C = m.prologue_fwd(tensors, sizes)
    out = torch.empty(batch, T, b.H, b.P, device="cuda", dtype=torch.bfloat16)
    fin = torch.empty(batch, b.H, b.N, b.P, device="cuda")
    row = {"prologue": ms(lambda: m.prologue_fwd(tensors, sizes))}
    for Q in (64, 128, 256):
        tiles, first = m.seq_tiles(None, batch, T, Q, x.device)
        kw = {"chunk_size": Q, "dot_precision": "tf32"}

        def state(**knobs):  # type: ignore[no-untyped-def]
            return m.chunked_state_fwd(x, s, la, B, C, tiles=tiles, first=first, heads=b.H,  # noqa: B023
                                       initial_state=None, final_state=fin, **kw, **knobs)  # noqa: B023

        H_r = state()

        def scan(**knobs):  # type: ignore[no-untyped-def]
            return m.chunked_scan_fwd(x, s, la, B, C, states=H_r, tiles=tiles, heads=b.H, out=out,  # noqa: B023
                                      epilogue=(tensors, sizes), **kw, **knobs)  # noqa: B023

        row[f"state Q{Q}"], row[f"scan Q{Q}"] = ms(state), ms(scan)
        row[f"op Q{Q}"] = ms(lambda Q=Q: op(**t, form="chunked", chunk_size=Q))
        for knobs in sweep.get(f"scan{Q}", []):
            try:
                row[f"scan Q{Q} {knobs}"] = ms(lambda k=knobs: scan(**k))
            except Exception as err:  # a variant that does not compile is a row, not the end
                print(f"scan Q{Q} {knobs}: {type(err).__name__}: {str(err)[:200]}")
        for knobs in sweep.get(f"state{Q}", []):
            try:
                row[f"state Q{Q} {knobs}"] = ms(lambda k=knobs: state(**k))
            except Exception as err:
                print(f"state Q{Q} {knobs}: {type(err).__name__}: {str(err)[:200]}")
    return row


def host(op, batch: int, T: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """CPU µs of a plain call, synchronised wall µs, GPU µs (graph), and a profile."""
    t = b.make_inputs(batch, T)
    for _ in range(20):
        op(**t)
    torch.cuda.synchronize()
    cpu, wall = [], []
    for _ in range(50):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        op(**t)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        cpu.append((t1 - t0) * 1e6)
        wall.append((t2 - t0) * 1e6)
    gpu = ms(lambda: op(**t))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(100):
        op(**t)
    prof.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
    return {"batch": batch, "T": T, "cpu_us": statistics.median(cpu),
            "wall_us": statistics.median(wall), "gpu_us": gpu,
            "profile": text.getvalue()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sweep", default="{}",
                        help='JSON {"scan64": [knobs, ...], "state128": [...], ...}: variants to time')
    parser.add_argument("--shapes", default="8x2048,1x16384")
    parser.add_argument("--no-host", action="store_true")
    parser.add_argument("--json", default="perf_ssd.json")
    args = parser.parse_args()
    spec = with_dims(parse_file(b.ROOT / "examples" / "mamba2.ssm"),
                     {"H": b.H, "P": b.P, "N": b.N, "G": b.G})
    m, op = load_module(spec), load(spec)
    report: dict[str, object] = {}
    report["check"] = [check(op, spec, 2, 2048, 1), check(op, spec, 1, 8192, 2)]
    for r in report["check"]:
        print("check", r)
    report["stages"] = {}
    for shape in args.shapes.split(","):
        batch, T = map(int, shape.split("x"))
        row = stages(m, op, batch, T, json.loads(args.sweep))
        report["stages"][f"{batch}x{T}"] = row
        print(f"stages batch {batch} T {T}:")
        for k, v in row.items():
            print(f"  {k:<44}{v:8.0f} us")
    report["host"] = [] if args.no_host else [host(op, 8, 2048), host(op, 1, 64)]
    for r in report["host"]:
        print(r.pop("profile") if r["T"] == 2048 else "", end="")
        print("host", r)
    Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0 if all(r["ok"] for r in report["check"]) else 1


if __name__ == "__main__":
    sys.exit(main())
