"""One decode step at the Mamba-2 2.7B layer: ssmc's decode against mamba_ssm's
`selective_state_update`, against the HBM floor, and the wall time of a plain call.

Issue 5's targets: at batch 64 the step reaches ≥ 90 % of the HBM floor (fp32 state read
and written, inputs read, output written, at the copy bandwidth measured in the same run);
at batch 1 a plain (non-graph) call costs ≤ 20 µs of wall time, Python included.

Layer: H = 80, P = 64, N = 128, G = 1 (examples/mamba2.ssm); x, z, B, C bf16, dt and the
parameters fp32, the state fp32. ssmc's op takes the state [b, H, N, P] as `initial_state`
and returns the next one (no in-place update); mamba_ssm updates its [b, H, P, N] state in
place. Both move the same bytes. Each is first checked against ssmc's fp64 reference on the
same inputs (y and the next state). Figures per batch: CUDA-graph median (GPU time), the
median plain call (`triton.testing.do_bench`: host and device overlapped as a user sees
them), and the wall time of 1000 back-to-back calls (then one synchronisation) per call.

    python scripts/bench_decode.py [--mamba-src .whl/mamba/mamba_ssm-*] [--json out.json]

--profile: instead, cProfile of 2000 plain ssmc calls at batch 1 (where the host's time goes).
--replay-ab R: instead, R rounds at batch 1 alternating ssmc with its decode replay
(ssmc.replay), ssmc without it, and mamba_ssm, in one process: each round's wall and thread
CPU µs per call of 1000 back-to-back calls; the least and the median per mode (the host's
noise between processes is larger than the difference).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ssmc.bench_timing import environment, measure, roofline  # noqa: E402
from ssmc.load import load  # noqa: E402
from ssmc.pipeline import parse_file, with_dims  # noqa: E402
from ssmc.reference import reference  # noqa: E402

DIMS = {"H": 80, "P": 64, "N": 128, "G": 1}
BOUND = 1e-2  # bf16 inputs


def inputs(batch: int, device: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One token per row: ssmc's argument names and layouts (state [b, H, N, P])."""
    H, P, N, G = DIMS["H"], DIMS["P"], DIMS["N"], DIMS["G"]
    bf16, f32 = torch.bfloat16, torch.float32

    def rnd(*shape: int, dtype: torch.dtype = bf16, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen)).to(device, dtype)

    return {
        "x": rnd(batch, 1, H, P),
        "dt": rnd(batch, 1, H, dtype=f32, scale=0.5),
        "B": rnd(batch, 1, G, N),
        "C": rnd(batch, 1, G, N),
        "z": rnd(batch, 1, H, P),
        "A": -torch.empty(H).uniform_(1, 16, generator=gen).to(device),
        "dt_bias": torch.empty(H).uniform_(-4, -1, generator=gen).to(device),
        "D": rnd(H, dtype=f32),
        "initial_state": rnd(batch, H, N, P, dtype=f32, scale=0.3),
    }


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖ in fp64."""
    return ((got.double() - want).norm() / want.norm()).item()


def mamba_step(mamba_src: str | None) -> Any:
    """mamba_ssm's selective_state_update from the unpacked sdist, or None."""
    if mamba_src is None:
        return None
    from ssmc.bench_peers import import_mamba

    import_mamba(mamba_src)  # installs the namespace stand-in for the package
    import importlib

    return importlib.import_module("mamba_ssm.ops.triton.selective_state_update").selective_state_update


def mamba_args(t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
    """mamba_ssm's layout of the same step: state [b, H, P, N], per-(head, P) views."""
    H, P, N = DIMS["H"], DIMS["P"], DIMS["N"]
    state = t["initial_state"].transpose(-1, -2).contiguous()
    kwargs = dict(
        x=t["x"][:, 0], dt=t["dt"][:, 0, :, None].expand(-1, H, P),
        A=t["A"][:, None, None].expand(H, P, N), B=t["B"][:, 0], C=t["C"][:, 0],
        D=t["D"][:, None].expand(H, P), z=t["z"][:, 0],
        dt_bias=t["dt_bias"][:, None].expand(H, P), dt_softplus=True,
    )
    return state, kwargs


def wall_us(fn: Any, calls: int = 1000) -> float:
    """µs per call of `calls` back-to-back calls, one synchronisation at the end."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / calls * 1e6


def floor_bytes(batch: int) -> int:
    """State read + written (fp32), x, z, B, C read (bf16), dt read (fp32), y written (bf16)."""
    H, P, N, G = DIMS["H"], DIMS["P"], DIMS["N"], DIMS["G"]
    return batch * (2 * H * N * P * 4 + 3 * H * P * 2 + 2 * G * N * 2 + H * 4)


def bench(batch: int, op: Any, ref: Any, step: Any, copy_gbps: float) -> list[dict[str, Any]]:
    """Rows for ssmc (and mamba_ssm) at one batch."""
    gen = torch.Generator().manual_seed(batch)
    t = inputs(batch, "cuda", gen)
    y64, state64 = ref(**{k: v.double() for k, v in t.items()})
    floor_ms = floor_bytes(batch) / (copy_gbps * 1e9) * 1e3
    rows = []

    y, state = op(**t)
    assert op.last_form == "decode", op.last_form
    errors = {"y": error(y, y64), "state": error(state, state64)}
    timing = measure(lambda: op(**t), torch.device("cuda"))
    rows.append({"impl": "ssmc", "batch": batch, "errors": errors, **timing.as_dict(),
                 "wall_us": wall_us(lambda: op(**t)), "floor_ms": floor_ms})
    if step is not None:
        state_m, kwargs = mamba_args(t)
        out = step(state_m, **kwargs)
        errors = {"y": error(out, y64[:, 0]), "state": error(state_m.transpose(-1, -2), state64)}
        state_m, kwargs = mamba_args(t)  # the step above updated it in place
        timing = measure(lambda: step(state_m, **kwargs), torch.device("cuda"))
        rows.append({"impl": "mamba_ssm", "batch": batch, "errors": errors, **timing.as_dict(),
                     "wall_us": wall_us(lambda: step(state_m, **kwargs)), "floor_ms": floor_ms})
    return rows


def profile_calls(op: Any, calls: int = 2000) -> None:
    """cProfile of `calls` plain calls of the op at batch 1, by own time and by cumulative."""
    import cProfile
    import pstats

    t = inputs(1, "cuda", torch.Generator().manual_seed(1))
    for _ in range(100):
        op(**t)
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        op(**t)
    torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(25)


def replay_ab(op: Any, step: Any, rounds: int) -> dict[str, Any]:
    """Per mode, the wall and CPU µs per call of each round (replay_ab in the docstring)."""
    t = inputs(1, "cuda", torch.Generator().manual_seed(1))
    record, replays = op._record, op._replays

    def with_replay(on: bool) -> Any:
        def switch() -> None:
            op._record, op._replays = (record, replays) if on else (None, {})

        return switch

    def call() -> Any:
        return op(**t)

    modes = {"ssmc replay": (with_replay(True), call),
             "ssmc no replay": (with_replay(False), call)}
    if step is not None:
        state_m, kwargs = mamba_args(t)
        modes["mamba_ssm"] = (lambda: None, lambda: step(state_m, **kwargs))
    times: dict[str, dict[str, list[float]]] = {m: {"wall": [], "cpu": []} for m in modes}
    for _ in range(rounds):
        for name, (switch, call) in modes.items():
            switch()
            c0 = time.thread_time()
            wall = wall_us(call)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append((time.thread_time() - c0) / 1020 * 1e6)
    with_replay(True)()
    assert op._replays, "the replay mode replayed"
    print(f"batch 1, {rounds} rounds of 1000 calls, µs per call: least / median (wall; thread CPU)")
    report = {}
    for name, row in times.items():
        wall, cpu = sorted(row["wall"]), sorted(row["cpu"])
        report[name] = {"wall_us": row["wall"], "cpu_us": row["cpu"]}
        print(f"{name:15} wall {wall[0]:6.1f} / {wall[len(wall) // 2]:6.1f}   "
              f"cpu {cpu[0]:6.1f} / {cpu[len(cpu) // 2]:6.1f}")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mamba-src", default=None)
    parser.add_argument("--batch", type=int, nargs="*", default=[1, 8, 64, 256])
    parser.add_argument("--json", default=None)
    parser.add_argument("--profile", action="store_true", help="cProfile of batch-1 calls")
    parser.add_argument("--replay-ab", type=int, default=0, metavar="ROUNDS",
                        help="rounds of batch-1 calls alternating replay on / off / mamba_ssm")
    args = parser.parse_args()
    checked = with_dims(parse_file(ROOT / "examples" / "mamba2.ssm"), DIMS)
    op = load(checked)
    if args.profile:
        profile_calls(op)
        return 0
    ref = reference(checked, "recurrent")
    step = mamba_step(args.mamba_src)
    if args.replay_ab:
        report = replay_ab(op, step, args.replay_ab)
        if args.json:
            Path(args.json).write_text(json.dumps({**environment(torch.device("cuda")),
                                                   "replay_ab": report}, indent=1))
        return 0
    roof = roofline(torch.device("cuda"))
    rows = []
    for batch in args.batch:
        rows += bench(batch, op, ref, step, roof["copy_GBps"])
    print(f"copy bandwidth {roof['copy_GBps']:.0f} GB/s")
    print(f"{'impl':10} {'batch':>5} {'graph µs':>9} {'plain µs':>9} {'wall µs':>8} "
          f"{'floor µs':>9} {'of floor':>8} {'err y':>8} {'err state':>9} ok")
    failed = False
    for r in rows:
        graph = r["graph_ms"]
        ok = max(r["errors"].values()) <= BOUND
        failed |= r["impl"] == "ssmc" and not ok
        share = f"{r['floor_ms'] / graph:8.0%}" if graph else "       –"
        print(f"{r['impl']:10} {r['batch']:5} {graph * 1e3 if graph else float('nan'):9.1f} "
              f"{r['plain_ms'] * 1e3:9.1f} {r['wall_us']:8.1f} {r['floor_ms'] * 1e3:9.1f} {share} "
              f"{r['errors']['y']:8.1e} {r['errors']['state']:9.1e} {'yes' if ok else 'NO'}")
    if args.json:
        report = {**environment(torch.device("cuda")), "roofline": roof, "dims": DIMS,
                  "results": rows}
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
