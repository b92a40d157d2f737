"""The diagonal backward's launches at GLA's shape: each one's time at its defaults and with
other launch options (`chunked_diag_bwd`, examples/gla.ssm's core: H heads, N = P, every
head its own groups), to see what tiles alone can do before the kernels change.

    python scripts/gpu_diag_bwd_sweep.py --batch 8 --seqlen 2048 --heads 16 --dim 128

With --dbc M,BN,W[,CROSS] ...: the dB/dC launches at row blocks of M, N tiles of BN, W
warps and their cross-block dots in CROSS (dot, tf32, ieee) instead (dbc_block_m,
dbc_block_n, dbc_warps, dbc_cross), their time and the gradients against fp64.

With --mamba1: Mamba-1's layout instead of GLA's: --heads channels with P = 1, one B and C
shared by all, N = --dim, log a = Δ A (Δ = softplus(randn − 2), A in [−16, −1]), e.g.
`--mamba1 --batch 2 --heads 1536 --dim 16 --modes straddle chunk`. The fp64 check runs on
the first --check-seqlen tokens of batch row 0 (default: all T for GLA, 256 for Mamba-1).

With --modes: each way of forming dlog a (`dla`) instead, timed per launch, and every
gradient of each against fp64 autograd of the chunked torch form at batch 1 (log a in
[−1, 0] as the bench draws, and weak decays in [−0.05, 0]). With --variants: the same for
launcher options given as `key=value;key=value` (Python literals), e.g.
`"dla='chunk';whole=False" "dla='chunk';whole_blocks=(64,8)"`; the key `launch` maps kernel
names to launch options over the launcher's (num_stages, maxnreg...), e.g.
`"dla='chunk';launch={'chunked_diag_bwd_whole_kernel': {'maxnreg': 128}}"`.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import torch
import triton.testing
from torch.profiler import ProfilerActivity, profile

from ssmc.load import load_source
from ssmc.render import render_stage

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts below
from gpu_bwd_profile import kernel_rows  # noqa: E402
from gpu_fwd_profile import LaunchWith  # noqa: E402

HEADER = "import math\nimport torch\nimport triton\nimport triton.language as tl\n\n"

SWEEP = {
    # kernel → launch options tried in place of the launcher's (num_warps, constexpr tiles);
    # the launcher's defaults at GLA's shape: dla 2 warps, BLOCK_P 128; dbc 1; dx 2
    "chunked_diag_bwd_dla_kernel": [{"num_warps": 1}, {"BLOCK_P": 64}, {"BLOCK_P": 64, "num_warps": 1}],
    "chunked_diag_bwd_dbc_kernel": [{"num_warps": 2}],
    "chunked_diag_bwd_dx_kernel": [{"num_warps": 1}],
}


def per_kernel_ms(call) -> dict[str, float]:
    """CUDA ms per call of each kernel, over five profiled calls after two warm-ups."""
    for _ in range(2):
        call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            call()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / 5 / 1000 for e in kernel_rows(prof)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--modes", nargs="*", default=None,
                        help="compare these dla modes (straddle, chunk, suffix) instead")
    parser.add_argument("--variants", nargs="*", default=None, metavar="KEY=VALUE;...",
                        help="compare these launcher options (Python literals) instead")
    parser.add_argument("--dbc", nargs="*", default=None, metavar="M,BN,W",
                        help="time the dB/dC launches at these row blocks, N tiles and warps")
    parser.add_argument("--mamba1", action="store_true",
                        help="Mamba-1's layout (P = 1, shared B and C) instead of GLA's")
    parser.add_argument("--check-seqlen", type=int, default=None,
                        help="tokens of the fp64 check (default: T, or 256 with --mamba1)")
    args = parser.parse_args()
    source = "\n".join(render_stage(name) for name in ("chunked_diag", "adjoint", "chunked_diag_bwd"))
    mod = load_source(HEADER + source, "chunked_diag_bwd_stage")
    b, T, H, N = args.batch, args.seqlen, args.heads, args.dim
    g = torch.Generator(device="cuda").manual_seed(0)
    if args.mamba1:
        x, dy = (torch.randn(b, T, H, 1, device="cuda", generator=g).bfloat16() for _ in range(2))
        B, C = (torch.randn(b, T, 1, N, device="cuda", generator=g).bfloat16() for _ in range(2))
        dt = torch.nn.functional.softplus(torch.randn(b, T, H, 1, device="cuda", generator=g) - 2)
        log_a = dt * -(1 + 15 * torch.rand(H, N, device="cuda", generator=g))
    else:
        x, B, C, dy = (torch.randn(b, T, H, N, device="cuda", generator=g).bfloat16()
                       for _ in range(4))
        log_a = -torch.rand(b, T, H, N, device="cuda", generator=g)  # [−1, 0], as the bench draws
    check_T = args.check_seqlen or (256 if args.mamba1 else T)

    def call():
        return backward(mod, (x, log_a, B, C, dy), H)

    if args.modes is not None:
        variants = [{"dla": mode} for mode in args.modes]
        return compare_variants(mod, variants, (x, log_a, B, C, dy), H, check_T)
    if args.variants is not None:
        variants = [parse_options(v) for v in args.variants]
        return compare_variants(mod, variants, (x, log_a, B, C, dy), H, check_T)
    if args.dbc is not None:
        variants = [dbc_options(c) for c in args.dbc]
        return compare_variants(mod, variants, (x, log_a, B, C, dy), H, check_T)

    # the launches before the seventeenth session's wide-head defaults, and the dB/dC row
    # block's own triangle as the direct sum (BLOCK_SPREAD < 0): the same gradients up to
    # the order of fp32 sums
    old = {"chunked_diag_bwd_dla_kernel": {"BLOCK_P": 32, "num_warps": 8},
           "chunked_diag_bwd_dbc_kernel": {"num_warps": 8},
           "chunked_diag_bwd_dx_kernel": {"num_warps": 4}}
    kernels = {name: getattr(mod, name) for name in old}
    new_out = call()
    spread = mod.BLOCK_SPREAD
    for name, o in old.items():
        setattr(mod, name, LaunchWith(kernels[name], **o))
    mod.BLOCK_SPREAD = -1.0
    old_out = call()
    old_ms = per_kernel_ms(call)
    for name, kernel in kernels.items():
        setattr(mod, name, kernel)
    mod.BLOCK_SPREAD = -1.0  # the new launches with the direct triangles
    direct_ms = per_kernel_ms(call).get("chunked_diag_bwd_dbc_kernel", float("nan"))
    mod.BLOCK_SPREAD = spread
    print(f"dB/dC with the direct triangles at the new launches: {direct_ms:.3f} ms")
    labels = ("dx", "ds", "dlog_a", "dB", "dC", "dh0")
    for label, got, was in zip(labels, new_out, old_out, strict=True):
        if got is not None:
            diff = ((got.double() - was.double()).norm() / was.double().norm()).item()
            print(f"{label}: ‖new − old‖ / ‖old‖ = {diff:.2e}", flush=True)
            assert diff <= 1e-4 and torch.isfinite(got).all(), label
    print("old launches: " + ", ".join(f"{n} {old_ms.get(n, float('nan')):.3f} ms" for n in old))
    base = per_kernel_ms(call)
    total = triton.testing.do_bench(call, warmup=2, rep=20, return_mode="median")
    print(f"chunked_diag_bwd, bf16 [{b}, {T}, {H}, {N}], N = P = {N}: {total:.3f} ms")
    for name, ms in sorted(base.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  {ms:8.3f} ms  {name[:90]}")
    for name, options in SWEEP.items():
        kernel = getattr(mod, name)
        for o in options:
            setattr(mod, name, LaunchWith(kernel, **o))
            try:
                ms = per_kernel_ms(call).get(name, float("nan"))
                print(f"{name} {o}: {ms:.3f} ms (default {base.get(name, float('nan')):.3f})",
                      flush=True)
            except Exception as exc:  # noqa: BLE001 — an option that cannot launch is reported
                print(f"{name} {o}: failed: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            finally:
                setattr(mod, name, kernel)
    return 0


def fp64_gradients(x, log_a, B, C, dy, H: int) -> dict[str, torch.Tensor]:
    """dx, dlog a, dB, dC of the core by autograd of forms_torch.chunked in fp64."""
    from ssmc import forms_torch

    leaves = [t.double().requires_grad_() for t in (x, log_a, B, C)]
    y, _ = forms_torch.chunked(*leaves, H, chunk_size=64)
    grads = torch.autograd.grad(y, leaves, dy.double())
    return dict(zip(("dx", "dlog_a", "dB", "dC"), grads, strict=True))


def backward(mod, tensors, H: int, launch: dict | None = None, **options) -> tuple:
    """chunked_diag_bwd of (x, log a, B, C, dY), one group per head role as given, chunks of
    64, no s, h0 or dh_T; `options` are its launch options, `launch` kernel name → launch
    options over the launcher's."""
    x, log_a, B, C, dy = tensors
    kernels = {name: getattr(mod, name) for name in launch or {}}
    for name, o in (launch or {}).items():
        setattr(mod, name, LaunchWith(kernels[name], **o))
    try:
        return run_backward(mod, x, log_a, B, C, dy, H, **options)
    finally:
        for name, kernel in kernels.items():
            setattr(mod, name, kernel)


def run_backward(mod, x, log_a, B, C, dy, H: int, **options) -> tuple:
    """mod.chunked_diag_bwd as `backward` calls it."""
    return mod.chunked_diag_bwd(x, None, log_a, B, C, heads=H, initial_state=None,
                                cu_seqlens=None, dy=dy, dfinal=None,
                                **{"chunk_size": 64, **options})


def gradient_errors(got: tuple, want: dict[str, torch.Tensor]) -> dict[str, float]:
    """‖got − want‖ / ‖want‖ of dx, dlog a, dB, dC (chunked_diag_bwd's outputs 0, 2, 3, 4)."""
    return {k: ((got[i].double() - want[k]).norm() / want[k].norm()).item()
            for i, k in ((0, "dx"), (2, "dlog_a"), (3, "dB"), (4, "dC"))}


def parse_options(text: str) -> dict:
    """`key=value;key=value` with Python literals as values → launcher options."""
    options = {}
    for item in filter(None, text.split(";")):
        key, _, value = item.partition("=")
        options[key.strip()] = ast.literal_eval(value.strip())
    return options


def compare_variants(mod, variants: list[dict], tensors, H: int, check_T: int) -> int:
    """Per variant (launcher options): the backward's time per launch and in all, and its
    gradients at batch 1 against fp64 (the bench's decays and weak ones). A variant that
    cannot compile or launch is reported and left out of the checks."""
    ran = []
    for options in variants:
        def call(options=options):
            return backward(mod, tensors, H, **options)

        try:
            ms = per_kernel_ms(call)
            total = triton.testing.do_bench(call, warmup=2, rep=20, return_mode="median")
        except Exception as exc:  # noqa: BLE001 — a config that cannot launch is reported
            print(f"{options}: failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            continue
        ran.append(options)
        print(f"{options}: chunked_diag_bwd {total:.3f} ms; "
              + ", ".join(f"{k[:40]} {v:.3f}" for k, v in sorted(ms.items(), key=lambda kv: -kv[1])),
              flush=True)
    x, log_a, B, C, dy = (t[:1, :check_T] for t in tensors)
    for label, la in (("bench decays", log_a), ("weak decays (1/20)", log_a / 20)):
        one = (x, la, B, C, dy)
        want = fp64_gradients(*one, H)
        for options in ran:
            errs = gradient_errors(backward(mod, one, H, **options), want)
            print(f"{label}, {options}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()),
                  flush=True)
            assert all(v < 5e-2 for v in errs.values()), (options, errs)
        del want
    return 0


def dbc_options(config: str) -> dict:
    """`M,BN,W[,CROSS]` → the dB/dC launches' launcher options."""
    m, bn, w, *cross = config.split(",")
    return dict(dbc_block_m=int(m), dbc_block_n=int(bn), dbc_warps=int(w),
                dbc_cross=(cross or ["dot"])[0])

if __name__ == "__main__":
    sys.exit(main())
