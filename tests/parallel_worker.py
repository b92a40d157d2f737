"""One rank of the context-parallel check: run a spec split across ranks, save y and grads.

Started by tests/test_parallel.py (gloo, CPU) and scripts/gpu_parallel.py (NCCL) with the
usual RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT environment. Every rank draws the
same full inputs from one seed, runs its contiguous part of the sequence through
`ssmc.parallel.ContextParallel`, backpropagates a fixed random projection of y and the
final state (not with --mode op-no-grad), and saves its y, state and gradients for the
caller to compare with the single-process op.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from ssmc.load import load
from ssmc.parallel import ContextParallel
from ssmc.pipeline import parse_file, with_dims
from ssmc.reference import random_inputs, reference

PER_TOKEN_AXIS = 1


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("spec", nargs="+", help="one or more specs, run in turn by the same ranks")
    p.add_argument("--dims", nargs="+", default=[], help="the dims of each spec (k=v,k=v)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seqlen", type=int, default=16)
    p.add_argument("--mode", choices=("reference", "op", "op-no-grad"), default="reference")
    p.add_argument("--dtype", default="float64")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    device = torch.device("cuda", dist.get_rank()) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dims = args.dims or [""] * len(args.spec)
    assert len(dims) == len(args.spec), "one --dims entry per spec"
    for i, (spec, spec_dims) in enumerate(zip(args.spec, dims, strict=True)):
        out = os.path.join(args.out, str(i))
        os.makedirs(out, exist_ok=True)
        run_case(spec, spec_dims, args, device, out)
    dist.destroy_process_group()


def run_case(
    spec: str, spec_dims: str, args: argparse.Namespace, device: torch.device, out: str
) -> None:
    """One spec split across the ranks; this rank's y, state and gradients into `out`."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dims = dict((k, int(v)) for k, v in (kv.split("=") for kv in spec_dims.split(",") if kv))
    checked = with_dims(parse_file(spec), dims)
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    # Drawn in fp64 (the caller's single-process run draws the same numbers), then cast.
    full = random_inputs(checked, batch=args.batch, seqlen=args.seqlen, generator=gen)
    full = {
        k: v.to(device, state_dtype if k == "initial_state" else dtype) for k, v in full.items()
    }
    per_token = {t.name for t in checked.spec.tensors if "seq" in t.shape}
    T = args.seqlen
    assert T % world == 0, "the test splits the sequence evenly"
    part = slice(rank * T // world, (rank + 1) * T // world)
    local = {
        k: (v[:, part] if k in per_token else v).detach().clone().requires_grad_()
        for k, v in full.items()
    }
    op = reference(checked, "chunked", chunk_size=4) if args.mode == "reference" else load(checked)
    if args.mode == "op-no-grad":  # the state pass is then the module's state walk
        with torch.no_grad():
            y, state = ContextParallel(checked, op)(**local)
        torch.save(
            {"y": y.cpu(), "state": state.cpu(), "grads": {}}, os.path.join(out, f"rank{rank}.pt")
        )
        return
    y, state = ContextParallel(checked, op)(**local)
    w_y = torch.randn(args.batch, T, *y.shape[2:], generator=gen, dtype=torch.float64)
    w_s = torch.randn(*state.shape, generator=gen, dtype=torch.float64)
    loss = (y.double() * w_y[:, part].to(device)).sum()
    if rank == world - 1:  # only the last rank's state is the sequence's final state
        loss = loss + (state.double() * w_s.to(device)).sum()
    loss.backward()
    grads = {k: v.grad.detach().cpu() for k, v in local.items() if v.grad is not None}
    torch.save(
        {"y": y.detach().cpu(), "state": state.detach().cpu(), "grads": grads},
        os.path.join(out, f"rank{rank}.pt"),
    )


if __name__ == "__main__":
    main()
