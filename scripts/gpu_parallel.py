"""Context parallelism on several GPUs: equality with one GPU, and the scaling from 1 to N.

Run with one process per GPU (nvidia-h200-x2):

    python -m torch.distributed.run --nproc_per_node=2 scripts/gpu_parallel.py --json OUT.json

The Mamba-2 2.7B layer (examples/mamba2.ssm: H = 80, P = 64, N = 128, G = 1; or with
`--spec gla` GLA at H = 16, N = P = 128), bf16, one long sequence split evenly across the
ranks. Rank 0 also runs the whole sequence alone
(the 1-GPU baseline): outputs, the final state and every gradient of the split run must
match it, and the forward and forward+backward times of both are printed with the
speed-up. The split's time is broken down on each rank: the state-only pass
(ssmc.parallel.StatePass) alone, and the op alone on the part with a given initial state
(what the split would cost with a free hand-off); the slowest rank's figures are reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ssmc import ir, parallel  # noqa: E402
from ssmc.load import load  # noqa: E402
from ssmc.parallel import ContextParallel, StatePass  # noqa: E402
from ssmc.pipeline import parse_file, with_dims  # noqa: E402
from ssmc.reference import random_inputs  # noqa: E402

SPECS = {  # spec file, dims, the per-token tensors given in bf16 (the rest fp32)
    "mamba2": ("mamba2.ssm", {}, ("x", "B", "C", "z")),
    "gla": ("gla.ssm", {"H": 16, "N": 128, "P": 128}, ("q", "k", "v")),
}
DEVICE = [torch.device("cpu")]  # the rank's device (main sets a GPU unless --smoke)


def timed(fn, repeats: int) -> float:
    """Median milliseconds of fn() over `repeats`, every rank in step."""
    return statistics.median(_alone(fn, repeats, barrier=True))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlen", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--spec", nargs="+", default=["mamba2"], choices=list(SPECS))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", help="write the figures here (rank 0)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="CPU and gloo, a tiny layer (H=4, N=8, P=8) in fp32 (run under TRITON_INTERPRET=1 with "
        "--seqlen 64 --repeats 1): checks the script itself, not the figures",
    )
    args = p.parse_args()
    dist.init_process_group("gloo" if args.smoke else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if not args.smoke:
        torch.cuda.set_device(rank)
        DEVICE[0] = torch.device("cuda", rank)
    rows = []
    for name in args.spec:
        path, dims, half = SPECS[name]
        checked = with_dims(
            parse_file(ROOT / "examples" / path), {"H": 4, "N": 8, "P": 8} if args.smoke else dims
        )
        op = load(checked)
        cp = ContextParallel(checked, op)
        for T in args.seqlen:
            row = run_length(T, args, checked, op, cp, rank, world, half)
            if row is not None:
                rows.append({"spec": name, **row})
    if rank == 0 and args.json:
        Path(args.json).write_text(json.dumps({"device": _device_name(), "rows": rows}, indent=1))
    dist.destroy_process_group()


def run_length(
    T: int, args: argparse.Namespace, checked, op, cp, rank: int, world: int, half: tuple
) -> dict | None:
    """Split vs whole at one sequence length; the row (rank 0) or None."""
    row = None
    per_token = tuple(t.name for t in checked.spec.tensors if t.shape[:2] == (ir.BATCH, ir.SEQ))
    params = tuple(t.name for t in checked.spec.tensors if t.kind is ir.TensorKind.PARAM)
    gen = torch.Generator().manual_seed(T)
    low = torch.float32 if args.smoke else torch.bfloat16  # the interpreter has no bf16 dot
    full = random_inputs(checked, batch=1, seqlen=T, dtype=torch.float32, generator=gen)
    full.pop("initial_state", None)
    full = {k: v.to(DEVICE[0], low if k in half else torch.float32) for k, v in full.items()}
    part = slice(rank * T // world, (rank + 1) * T // world)
    local = {k: (v[:, part] if k in per_token else v).contiguous() for k, v in full.items()}
    with torch.no_grad():  # one call first: the kernels compile outside the timed runs
        y0, s0 = cp(**local)
    draw = torch.Generator().manual_seed(1)  # the same weights on every rank
    w = torch.randn(1, T, *y0.shape[2:], generator=draw).to(DEVICE[0])
    w_state = torch.randn(s0.shape, generator=draw).to(DEVICE[0])
    leaves = {k: v.detach().requires_grad_() for k, v in local.items()}
    last = rank == world - 1

    def split_fwd() -> None:
        with torch.no_grad():
            cp(**local)

    def split_fwd_bwd() -> tuple[torch.Tensor, torch.Tensor]:
        for v in leaves.values():
            v.grad = None
        y, state = cp(**leaves)
        loss = (y.float() * w[:, part]).sum()
        if last:  # the sequence's final state is the last rank's
            loss = loss + (state * w_state).sum()
        loss.backward()
        return y.detach(), state.detach()

    # The pieces of the split, each alone on this rank (no collective inside).
    state_pass = StatePass(checked, op)
    h_in = torch.randn(s0.shape, generator=draw).to(DEVICE[0]) * 0.1
    piece_leaves = {k: v.detach().requires_grad_() for k, v in local.items()}

    def state_fwd() -> None:
        with torch.no_grad():
            state_pass(local, torch.float32)

    def state_fwd_bwd() -> None:
        for v in piece_leaves.values():
            v.grad = None
        left, total = state_pass(piece_leaves, torch.float32)
        ((left * w_state).sum() + total.sum()).backward()

    def part_fwd() -> None:
        with torch.no_grad():
            op(initial_state=h_in, **local)

    def part_fwd_bwd() -> None:
        for v in piece_leaves.values():
            v.grad = None
        y, _ = op(initial_state=h_in, **piece_leaves)
        (y.float() * w[:, part]).sum().backward()

    pieces = {
        "state_pass_fwd_ms": statistics.median(_alone(state_fwd, args.repeats)),
        "state_pass_fwd_bwd_ms": statistics.median(_alone(state_fwd_bwd, args.repeats)),
        "op_part_fwd_ms": statistics.median(_alone(part_fwd, args.repeats)),
        "op_part_fwd_bwd_ms": statistics.median(_alone(part_fwd_bwd, args.repeats)),
    }
    slowest = {}
    for key, value in pieces.items():
        t = torch.tensor([value], device=DEVICE[0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        slowest[key] = t.item()

    t_split = timed(split_fwd, args.repeats)
    t_split_bwd = timed(split_fwd_bwd, args.repeats)
    with torch.no_grad():  # the state pass is then the module's state walk
        y_walk, state_walk = cp(**local)
    ys_walk = [torch.empty_like(y_walk) for _ in range(world)]
    dist.all_gather(ys_walk, y_walk.contiguous())
    y_split, state_split = split_fwd_bwd()
    ys = [torch.empty_like(y_split) for _ in range(world)]
    dist.all_gather(ys, y_split.contiguous())
    states = [torch.empty_like(state_split) for _ in range(world)]
    dist.all_gather(states, state_split.contiguous())
    grads = {}
    for k in per_token:
        parts = [torch.empty_like(leaves[k].grad) for _ in range(world)]
        dist.all_gather(parts, leaves[k].grad.contiguous())
        grads[k] = torch.cat(parts, dim=1)
    state_walk = state_walk.contiguous()
    dist.broadcast(state_walk, src=world - 1)  # the sequence's final state is the last rank's
    for k in params:  # a parameter's gradient is the sum of every rank's
        g = leaves[k].grad.float().contiguous()
        dist.all_reduce(g)
        grads[k] = g
    dist.barrier()
    if rank == 0:
        whole = {k: v.detach().requires_grad_() for k, v in full.items()}

        def one_fwd() -> None:
            with torch.no_grad():
                op(**full)

        def one_fwd_bwd() -> tuple[torch.Tensor, torch.Tensor]:
            for v in whole.values():
                v.grad = None
            y, state = op(**whole)
            ((y.float() * w).sum() + (state * w_state).sum()).backward()
            return y.detach(), state.detach()

        t_one = statistics.median(_alone(one_fwd, args.repeats))
        t_one_bwd = statistics.median(_alone(one_fwd_bwd, args.repeats))
        y_one, state_one = one_fwd_bwd()
        row = {
            "seqlen": T,
            "world": world,
            "fwd_ms_1gpu": t_one,
            "fwd_ms_split": t_split,
            "fwd_speedup": t_one / t_split,
            "fwd_bwd_ms_1gpu": t_one_bwd,
            "fwd_bwd_ms_split": t_split_bwd,
            "fwd_bwd_speedup": t_one_bwd / t_split_bwd,
            **{f"slowest_rank_{k}": v for k, v in slowest.items()},
            # False: the state pass's matmul upcast its bf16 operands (no bmm out_dtype)
            "state_matmul_fp32_out": parallel._OUT_DTYPE_MM["works"],
            "rel_err_y": rel(torch.cat(ys, dim=1), y_one),
            "rel_err_final_state": rel(states[-1], state_one),
            "rel_err_y_no_grad": rel(torch.cat(ys_walk, dim=1), y_one),
            "rel_err_final_state_no_grad": rel(state_walk, state_one),
            "rel_err_grads": {k: rel(grads[k], whole[k].grad) for k in per_token + params},
        }
        print(json.dumps(row), flush=True)
    dist.barrier()
    return row


def _alone(fn, repeats: int, barrier: bool = False) -> list[float]:
    """Milliseconds of fn() on this device, each run; `barrier`: every rank starts each run
    together (without it, only this rank runs and the others wait)."""
    out = []
    for _ in range(repeats):
        if barrier:
            dist.barrier()
        if DEVICE[0].type == "cpu":  # --smoke
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return out


def _device_name() -> str:
    return "cpu (--smoke)" if DEVICE[0].type == "cpu" else torch.cuda.get_device_name()


if __name__ == "__main__":
    main()
