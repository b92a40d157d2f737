"""SSD forward at the Mamba-2 2.7B layer shape: ssmc against mamba_ssm and FLA in one run.

H = 80, P = 64, N = 128, G = 1, bf16 x/B/C, fp32 dt/A; batch·T = 16384 tokens.
Peers are optional: mamba_ssm's pure-Triton SSD (imported without its package __init__,
which needs CUDA extensions) and FLA's chunk_simple_gla (B, C expanded to 80 heads, as a
user of FLA must). Times are medians of CUDA-graph replays (triton.testing.do_bench_cudagraph)
and of plain calls; ratios are peer / ssmc. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch
import triton.testing

from ssmc.load import load
from ssmc.pipeline import parse_file, with_dims

ROOT = Path(__file__).resolve().parent.parent
SHAPES = ((8, 2048), (4, 4096), (2, 8192), (1, 16384))
H, P, N, G = 80, 64, 128, 1


def import_mamba_ssd(source_dir: str | None) -> Callable[..., object] | None:
    """mamba_ssm's `mamba_chunk_scan_combined` from its unpacked sdist, or None."""
    if not source_dir:
        return None
    package = Path(source_dir) / "mamba_ssm"
    if not package.is_dir():
        return None
    stub = types.ModuleType("mamba_ssm")
    stub.__path__ = [str(package)]  # a namespace stand-in: skips __init__'s CUDA imports
    sys.modules.setdefault("mamba_ssm", stub)
    try:
        module = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
    except Exception as err:  # the peer is optional: report and go on without it
        print(f"mamba_ssm unavailable: {type(err).__name__}: {err}")
        return None
    combined: Callable[..., object] = module.mamba_chunk_scan_combined
    return combined


def import_fla() -> Callable[..., object] | None:
    """FLA's `chunk_simple_gla`, or None."""
    try:
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as err:  # optional peer
        print(f"fla unavailable: {type(err).__name__}: {err}")
        return None
    found: Callable[..., object] = chunk_simple_gla
    return found


def bench(fn: Callable[[], object]) -> dict[str, float]:
    """Median ms of CUDA-graph replays and of plain calls."""
    fn()
    torch.cuda.synchronize()
    plain = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    graph = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
    return {"graph_ms": float(graph), "plain_ms": float(plain)}


def make_inputs(batch: int, T: int) -> dict[str, torch.Tensor]:
    """Random Mamba-2 layer inputs (never zeros): bf16 x, z, B, C; fp32 dt, A, dt_bias, D."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    kw: dict[str, object] = {"device": "cuda", "generator": gen}
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


def run_mamba(mamba: Callable[..., object], t: dict[str, torch.Tensor]) -> object:
    """mamba_ssm's fused SSD with its recommended chunk 256."""
    return mamba(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size=256, D=t["D"], z=t["z"],
                 dt_bias=t["dt_bias"], dt_softplus=True, return_final_states=True)


def run_fla(fla: Callable[..., object], t: dict[str, torch.Tensor]) -> object:
    """FLA's chunk_simple_gla, with B and C expanded to every head as FLA needs."""
    batch, T = t["x"].shape[:2]
    delta = torch.nn.functional.softplus(t["dt"] + t["dt_bias"])
    q = t["C"].expand(batch, T, H, N)
    k = t["B"].expand(batch, T, H, N)
    v = (t["x"] * delta[..., None]).to(t["x"].dtype)
    return fla(q, k, v, g=delta * t["A"], scale=1.0, output_final_state=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mamba-src", default=None, help="unpacked mamba-ssm sdist folder")
    parser.add_argument("--json", default="bench_ssd.json")
    args = parser.parse_args()
    mamba = import_mamba_ssd(args.mamba_src)
    fla = import_fla()
    spec = with_dims(parse_file(ROOT / "examples" / "mamba2.ssm"), {"H": H, "P": P, "N": N, "G": G})
    op = load(spec)
    rows: list[dict[str, object]] = []
    table: list[tuple[int, int, dict[str, dict[str, float]]]] = []
    for batch, T in SHAPES:
        inputs = make_inputs(batch, T)
        row: dict[str, object] = {"batch": batch, "T": T}
        times: dict[str, dict[str, float]] = {}
        times["ssmc"] = bench(functools.partial(op, **inputs, form="chunked"))
        if mamba is not None:
            times["mamba_ssm"] = bench(functools.partial(run_mamba, mamba, inputs))
        if fla is not None:
            times["fla_with_expansion"] = bench(functools.partial(run_fla, fla, inputs))
        row.update(times)
        rows.append(row)
        print(json.dumps(row))
        table.append((batch, T, times))
    Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"\n{'batch':>5}{'T':>7}{'ssmc ms':>10}{'mamba ms':>10}{'fla ms':>9}"
          f"{'mamba/ssmc':>12}{'fla/ssmc':>10}  (CUDA-graph medians)")
    nan = {"graph_ms": float("nan")}
    for batch, T, times in table:
        ours_ms = times["ssmc"]["graph_ms"]
        m = times.get("mamba_ssm", nan)["graph_ms"]
        f = times.get("fla_with_expansion", nan)["graph_ms"]
        print(f"{batch:>5}{T:>7}{ours_ms:>10.3f}{m:>10.3f}{f:>9.3f}"
              f"{m / ours_ms:>12.2f}{f / ours_ms:>10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
