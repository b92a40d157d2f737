"""The context-parallel state pass on one GPU: its time against the op's on the same part.

    python scripts/gpu_state_pass.py [--seqlen 16384 65536] [--profile | --handoff]

For Mamba-2 2.7B (bf16 x, B, C, z) and GLA (H = 16, N = P = 128, bf16 q, k, v), batch 1:
the state pass (`ssmc.parallel.StatePass`) forward and forward+backward, the op forward
and forward+backward on the same part from a given initial state, and ρ = state pass /
op (the split's expected speed-up on two GPUs is 2 / (1 + ρ)). `--profile` prints the
state pass's heaviest CUDA kernels. The suffix sum of log a is also timed alone, along
the sequence axis in place (torch's outer-axis scan) and along the innermost axis. The
state pass's forward (no gradients) is the module's state walk (`final_state_from_zero`);
with gradients it is torch's matmul path. `--handoff` checks the numbers of a split at
scale on one GPU instead (see `handoff`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpu_parallel import SPECS  # noqa: E402  (the two layers, as the 2-GPU run has them)

from ssmc.load import load  # noqa: E402
from ssmc.parallel import StatePass, _suffix_sums  # noqa: E402
from ssmc.pipeline import parse_file, with_dims  # noqa: E402
from ssmc.reference import random_inputs, reference  # noqa: E402


def cuda_ms(fn, repeats: int = 10) -> float:
    """Median CUDA-event milliseconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(name: str, T: int, profile: bool) -> dict:
    """State pass and op times at batch 1 and T tokens of one spec."""
    path, dims, half = SPECS[name]
    checked = with_dims(parse_file(ROOT / "examples" / path), dims)
    op = load(checked)
    gen = torch.Generator().manual_seed(T)
    inputs = random_inputs(checked, batch=1, seqlen=T, dtype=torch.float32, generator=gen)
    h = inputs.pop("initial_state")
    inputs = {
        k: v.cuda().to(torch.bfloat16 if k in half else torch.float32) for k, v in inputs.items()
    }
    h = h.cuda()
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items()}
    state_pass = StatePass(checked, op)

    def state_fwd() -> None:
        with torch.no_grad():
            state_pass(inputs, torch.float32)

    def state_fwd_bwd() -> None:
        for v in leaves.values():
            v.grad = None
        left, total = state_pass(leaves, torch.float32)
        (left.sum() + total.sum()).backward()

    def op_fwd() -> None:
        with torch.no_grad():
            op(initial_state=h, **inputs)

    def op_fwd_bwd() -> None:
        for v in leaves.values():
            v.grad = None
        y, _ = op(initial_state=h, **leaves)
        y.float().sum().backward()

    row = {"spec": name, "seqlen": T}
    for key, fn in (
        ("state_fwd_ms", state_fwd),
        ("state_fwd_bwd_ms", state_fwd_bwd),
        ("op_fwd_ms", op_fwd),
        ("op_fwd_bwd_ms", op_fwd_bwd),
    ):
        row[key] = cuda_ms(fn)
    row["rho_fwd"] = row["state_fwd_ms"] / row["op_fwd_ms"]
    row["rho_fwd_bwd"] = row["state_fwd_bwd_ms"] / row["op_fwd_bwd_ms"]
    log_a = -torch.rand(1, T, *(16, 128) if name == "gla" else (80,), device="cuda")
    row["suffix_outer_axis_ms"] = cuda_ms(lambda: log_a.flip(1).cumsum(1).flip(1))
    row["suffix_inner_axis_ms"] = cuda_ms(lambda: _suffix_sums(log_a))
    print(json.dumps(row), flush=True)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            state_fwd_bwd()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
    return row


def weak_decays(name: str, inputs: dict, T: int, gen: torch.Generator) -> None:
    """Decays weak enough that a part of T/2 tokens keeps e^-2 of the state it enters (the
    random draw's log a in [−1, −0.01] forgets it within a few hundred tokens, so a split
    would pass whatever state it handed on)."""
    if name == "mamba2":  # log a = Δ A, mean Δ·|A| about 1 → mean log a about −4/T
        inputs["A"] *= 4.0 / T
    else:  # log a = logsigmoid(g)/16 ≈ −e^(−g)/16 → about −4/T
        g = torch.log(torch.tensor(T / 64.0)) + 0.1 * torch.randn(inputs["g"].shape, generator=gen)
        inputs["g"] = g.to(inputs["g"])


def handoff(name: str, T: int, device: str, smoke: bool) -> dict:
    """One sequence run whole, and run as two halves the way two ranks run it: the first
    half's state pass (the module's walk, no gradients) hands its state to the op on the
    second half. Weak decays, so the handed state matters; y and the final state compared."""
    path, dims, half = SPECS[name]
    checked = parse_file(ROOT / "examples" / path)
    checked = with_dims(checked, {"H": 4, "N": 8, "P": 8} if smoke else dims)
    op = load(checked)
    gen = torch.Generator().manual_seed(T + 1)
    inputs = random_inputs(checked, batch=1, seqlen=T, dtype=torch.float32, generator=gen)
    inputs.pop("initial_state")
    weak_decays(name, inputs, T, gen)
    low = torch.float32 if smoke else torch.bfloat16  # the interpreter has no bf16 dot
    inputs = {k: v.to(device, low if k in half else torch.float32) for k, v in inputs.items()}
    per_token = {t.name for t in checked.spec.tensors if "seq" in t.shape}
    first = {k: (v[:, : T // 2] if k in per_token else v) for k, v in inputs.items()}
    second = {k: (v[:, T // 2 :] if k in per_token else v) for k, v in inputs.items()}
    with torch.no_grad():
        y, state = op(**inputs)
        left, total = StatePass(checked, op)(first, torch.float32)
        y2, state2 = op(initial_state=left, **second)
        zero_y2, _ = op(**second)  # what the second half gives from a zero state
        _, first_final = op(**first)  # the op's own walk over the first half
        checked_only = StatePass(checked)  # torch's matmul path
        torch_left, _ = checked_only(first, torch.float32)
        # the fp64 reference on the same (rounded) values: the yardstick for both runs
        y64, state64 = reference(checked, "chunked")(**{k: v.double() for k, v in inputs.items()})

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    row = {
        "spec": name,
        "seqlen": T,
        "mean_kept_fraction": total.exp().mean().item(),  # e^(Σ log a) over the first half
        "rel_err_y_second_half": rel(y2, y[:, T // 2 :]),
        "rel_err_final_state": rel(state2, state),
        "rel_diff_y_from_zero_state": rel(zero_y2, y[:, T // 2 :]),
        # each run against fp64: the split is as close as the whole
        "rel_err_y_second_half_whole_vs_fp64": rel(y[:, T // 2 :], y64[:, T // 2 :]),
        "rel_err_y_second_half_split_vs_fp64": rel(y2, y64[:, T // 2 :]),
        "rel_err_final_state_whole_vs_fp64": rel(state, state64),
        "rel_err_final_state_split_vs_fp64": rel(state2, state64),
        # the first half's state three ways: the state walk, the op's forward, torch's matmul
        "rel_diff_walk_vs_op_state": rel(left, first_final),
        "rel_diff_torch_vs_op_state": rel(torch_left, first_final),
    }
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlen", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--specs", nargs="+", default=list(SPECS), choices=list(SPECS))
    p.add_argument("--profile", action="store_true")
    p.add_argument(
        "--handoff",
        action="store_true",
        help="instead of timing: the first half's state handed to the second, weak decays",
    )
    p.add_argument("--smoke", action="store_true", help="--handoff on the CPU, tiny heads, fp32")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args()
    if args.handoff:
        device = "cpu" if args.smoke else "cuda"
        rows = [handoff(s, T, device, args.smoke) for s in args.specs for T in args.seqlen]
    else:
        rows = [measure(s, T, args.profile) for s in args.specs for T in args.seqlen]
    if args.json:
        name = "cpu (--smoke)" if args.smoke else torch.cuda.get_device_name()
        Path(args.json).write_text(json.dumps({"device": name, "rows": rows}))


if __name__ == "__main__":
    main()
