"""Time the chunked forward (state walk + combine + scan) per sequence split at the Mamba-2 layer.

At batch 1 the state walk has one program per head and tile (80 on an H100's 132 SMs), each
walking the whole sequence; `seq_splits` cuts each sequence into segments walked in parallel
(chunked_state_split_fwd). This prints, per call shape and split, the CUDA-graph median of
`chunked_fwd` on the core (bf16 x, B, C; fp32 s, log a; fp32 out) and its output's and final
state's relative difference from the unsplit walk's, and the split the default picks.

    python scripts/gpu_split_sweep.py --shape 1x16384 --shape 2x8192 --splits 1 2 3 4 8 [--heads 80]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def main() -> int:
    import triton.testing
    from gpu_bwd_profile import profile_calls

    from ssmc.load import load
    from ssmc.pipeline import parse_file, with_dims

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", default=[], metavar="BxT")
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--splits", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    parser.add_argument("--heads", type=int, default=80, help="H (Mamba-2 2.7B: 80)")
    parser.add_argument("--kernels", action="store_true", help="also each split's kernels")
    parser.add_argument("--op", action="store_true",
                        help="the whole forward of --spec (Mamba-2: prologue, walk, scan with "
                        "its fused gate and skip) through the module's forward(launch=...)")
    parser.add_argument("--spec", default="examples/mamba2.ssm", help="with --op")
    parser.add_argument("--backward", action="store_true",
                        help="with --op: time the module's backward per split instead")
    parser.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                        help="with --op: the spec's dims (default Mamba-2 2.7B's, --heads)")
    args = parser.parse_args()
    H, P, N = args.heads, 64, 128
    dims = {"H": H, "P": P, "N": N, "G": 1}
    if args.op and args.dim:
        dims = {k: int(v) for k, v in (d.split("=") for d in args.dim)}
    spec = with_dims(parse_file(ROOT / args.spec if args.op else ROOT / "examples" / "mamba2.ssm"),
                     dims)
    module = load(spec).module
    for shape in args.shape or ["1x16384", "2x8192"]:
        b, T = (int(v) for v in shape.split("x"))
        if args.op:
            op_sweep(module, spec, b, T, args)
            continue
        g = torch.Generator(device="cuda").manual_seed(b * T)
        x = torch.randn(b, T, H, P, device="cuda", generator=g).bfloat16()
        B = torch.randn(b, T, 1, N, device="cuda", generator=g).bfloat16()
        C = torch.randn(b, T, 1, N, device="cuda", generator=g).bfloat16()
        s = torch.rand(b, T, H, device="cuda", generator=g) * 0.1
        log_a = -torch.rand(b, T, H, device="cuda", generator=g) * 0.05  # states carry far
        out = torch.empty(b, T, H, P, device="cuda")
        final = torch.empty(b, H, N, P, device="cuda")
        _, first = module.seq_tiles(None, b, T, args.chunk, x.device)
        picked = module.chunked_state_splits(x, B, first=first, heads=H, chunk_size=args.chunk)
        print(f"{shape}, H {H}: default seq_splits {picked}", flush=True)
        want = None
        for k in args.splits:

            run = functools.partial(module.chunked_fwd, x, s, log_a, B, C, heads=H, out=out,
                                    final_state=final, chunk_size=args.chunk, seq_splits=k)

            out.fill_(float("nan"))
            final.fill_(float("nan"))
            run()
            got = (out.clone(), final.clone())
            if want is None:
                want = got
            errs = [float((a - w).norm() / w.norm()) for a, w in zip(got, want, strict=True)]
            ms = triton.testing.do_bench_cudagraph(run, rep=100, return_mode="median")
            print(f"  seq_splits {k}: {ms * 1e3:8.1f} µs  y vs 1 {errs[0]:.1e}  "
                  f"final vs 1 {errs[1]:.1e}", flush=True)
            if args.kernels:
                profile_calls(f"seq_splits {k}: {{:.3f}} ms of kernels", run, top=6)
    return 0


def dims_text(checked) -> str:
    """The spec's bound dims, as NAME=SIZE words."""
    return " ".join(f"{d.name}={d.value}" for d in checked.spec.dims)


def backward_grads(module, t: dict, grad_y: torch.Tensor, chunk: int, k: int) -> tuple:
    """The module's backward with the walks cut into k segments: (the first gradient, ...)."""
    grads, _ = module.backward(**t, form="chunked", chunk_size=chunk, grad_y=grad_y,
                               launch_bwd={"seq_splits": k})
    return tuple(g for g in grads if g is not None)


def bench_tensors(spec, b: int, T: int) -> dict[str, torch.Tensor]:
    """Random inputs of `spec` on the GPU as the bench feeds Mamba-2: bf16 x, B, C, z; fp32
    dt and parameters; no initial state."""
    from ssmc.bench import fp32_tensors
    from ssmc.reference import random_inputs

    drawn = random_inputs(spec, batch=b, seqlen=T, generator=torch.Generator().manual_seed(T))
    drawn.pop("initial_state", None)  # as the bench calls it
    keep = fp32_tensors(spec)
    return {k: v.to("cuda", torch.float32 if k in keep else torch.bfloat16)
            for k, v in drawn.items()}


def op_sweep(module, spec, b: int, T: int, args: argparse.Namespace) -> None:
    """The module's whole forward at chunk `args.chunk` per split (bench_tensors' inputs),
    outputs against the unsplit call's."""
    import triton.testing

    t = bench_tensors(spec, b, T)
    what = "whole backward" if args.backward else "whole forward"
    print(f"{b}x{T}, {spec.spec.name} {dims_text(spec)}: {what}", flush=True)
    want = None
    if args.backward:
        y = module.forward(**t, form="chunked", chunk_size=args.chunk)[0]
        grad_y = torch.randn(y.shape, device="cuda", generator=torch.Generator(
            device="cuda").manual_seed(1)).to(y.dtype)
    for k in args.splits:
        run = functools.partial(module.forward, **t, form="chunked", chunk_size=args.chunk,
                                launch={"seq_splits": k})
        if args.backward:
            run = functools.partial(backward_grads, module, t, grad_y, args.chunk, k)
        y = run()[0].float()
        want = y if want is None else want
        err = float((y - want).norm() / want.norm())
        ms = triton.testing.do_bench_cudagraph(run, rep=100, return_mode="median")
        print(f"  seq_splits {k}: {ms * 1e3:8.1f} µs  y vs first {err:.1e}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
