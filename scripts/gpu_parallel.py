"""Context parallelism on several GPUs: equality with one GPU, and the scaling from 1 to N.

Run with one process per GPU (nvidia-h200-x2):

    python -m torch.distributed.run --nproc_per_node=2 scripts/gpu_parallel.py --json OUT.json

The Mamba-2 2.7B layer (examples/mamba2.ssm: H = 80, P = 64, N = 128, G = 1), bf16, one
long sequence split evenly across the ranks. Rank 0 also runs the whole sequence alone
(the 1-GPU baseline): outputs and gradients of the split run must match it, and the
forward and forward+backward times of both are printed with the speed-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ssmc.load import load  # noqa: E402
from ssmc.parallel import ContextParallel  # noqa: E402
from ssmc.pipeline import parse_file  # noqa: E402
from ssmc.reference import random_inputs  # noqa: E402

PER_TOKEN = ("x", "dt", "B", "C", "z")


def timed(fn, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats`, every rank in step."""
    times = []
    for _ in range(repeats):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlen", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="write the figures here (rank 0)")
    args = p.parse_args()
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    checked = parse_file(ROOT / "examples" / "mamba2.ssm")
    op = load(checked)
    cp = ContextParallel(checked, op)
    rows = []
    for T in args.seqlen:
        row = run_length(T, args, checked, op, cp, rank, world)
        if row is not None:
            rows.append(row)
    if rank == 0 and args.json:
        Path(args.json).write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1)
        )
    dist.destroy_process_group()


def run_length(
    T: int, args: argparse.Namespace, checked, op, cp, rank: int, world: int
) -> dict | None:
    """Split vs whole at one sequence length; the row (rank 0) or None."""
    row = None
    gen = torch.Generator().manual_seed(T)
    full = random_inputs(checked, batch=1, seqlen=T, dtype=torch.float32, generator=gen)
    full.pop("initial_state", None)
    full = {
        k: v.cuda().to(torch.bfloat16 if k in ("x", "B", "C", "z") else torch.float32)
        for k, v in full.items()
    }
    part = slice(rank * T // world, (rank + 1) * T // world)
    local = {k: (v[:, part] if k in PER_TOKEN else v).contiguous() for k, v in full.items()}
    w = torch.randn(1, T, 80, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    leaves = {k: v.detach().requires_grad_() for k, v in local.items()}

    def split_fwd() -> None:
        with torch.no_grad():
            cp(**local)

    def split_fwd_bwd() -> None:
        for v in leaves.values():
            v.grad = None
        y, _ = cp(**leaves)
        (y.float() * w[:, part]).sum().backward()

    t_split = timed(split_fwd, args.repeats)
    t_split_bwd = timed(split_fwd_bwd, args.repeats)
    y_split, _ = cp(**local)
    split_fwd_bwd()
    ys = [torch.empty_like(y_split) for _ in range(world)]
    dist.all_gather(ys, y_split.contiguous())
    grads = {}
    for k in PER_TOKEN:
        parts = [torch.empty_like(leaves[k].grad) for _ in range(world)]
        dist.all_gather(parts, leaves[k].grad.contiguous())
        grads[k] = torch.cat(parts, dim=1)
    dist.barrier()
    if rank == 0:
        whole = {k: v.detach().requires_grad_() for k, v in full.items()}

        def one_fwd() -> None:
            with torch.no_grad():
                op(**full)

        def one_fwd_bwd() -> None:
            for v in whole.values():
                v.grad = None
            y, _ = op(**whole)
            (y.float() * w).sum().backward()

        t_one = statistics.median(_alone(one_fwd, args.repeats))
        t_one_bwd = statistics.median(_alone(one_fwd_bwd, args.repeats))
        y_one, _ = op(**full)
        one_fwd_bwd()
        row = {
            "seqlen": T,
            "world": world,
            "fwd_ms_1gpu": t_one,
            "fwd_ms_split": t_split,
            "fwd_speedup": t_one / t_split,
            "fwd_bwd_ms_1gpu": t_one_bwd,
            "fwd_bwd_ms_split": t_split_bwd,
            "fwd_bwd_speedup": t_one_bwd / t_split_bwd,
            "rel_err_y": rel(torch.cat(ys, dim=1), y_one),
            "rel_err_grads": {k: rel(grads[k], whole[k].grad) for k in PER_TOKEN},
        }
        print(json.dumps(row), flush=True)
    dist.barrier()
    return row


def _alone(fn, repeats: int) -> list[float]:
    """Milliseconds of fn() on this GPU alone (no barrier: the other ranks wait)."""
    out = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return out


if __name__ == "__main__":
    main()
