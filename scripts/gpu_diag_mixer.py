"""Diagnose a SequenceMixer on the GPU: output and every gradient against an fp64 CPU copy.

The MQAR layer shape (d_model 128, Mamba-2 spec with H = 8, G = 1, N = 64, P = 32, T = 256),
per form, in fp32 and under bf16 autocast; prints ‖Δ‖/‖ref‖ per tensor.
"""

from __future__ import annotations

import sys

import torch

from ssmc.nn import SequenceMixer


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double().cpu() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def main() -> int:
    torch.manual_seed(0)
    dims = {"H": 8, "G": 1, "N": 64, "P": 32}
    cpu = SequenceMixer("examples/mamba2.ssm", 128, dims=dims).double()
    x = torch.randn(4, 256, 128, dtype=torch.float64)
    y_ref = cpu(x)
    y_ref.square().mean().backward()
    grads_ref = {k: p.grad.clone() for k, p in cpu.named_parameters()}
    worst = 0.0
    for form in ("quadratic", "chunked", "recurrent"):
        for autocast in (False, True):
            gpu = SequenceMixer("examples/mamba2.ssm", 128, dims=dims)
            gpu.load_state_dict(cpu.state_dict())
            gpu = gpu.float().cuda()
            gpu.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                y = gpu(x.float().cuda(), form=form)
            y.float().square().mean().backward()
            errs = {"y": rel(y.float(), y_ref)}
            errs |= {k: rel(p.grad, grads_ref[k]) for k, p in gpu.named_parameters()}
            worst = max(worst, max(errs.values()))
            shown = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
            print(f"{form:<10} autocast={autocast!s:<5} {shown}")
    print(f"worst relative error {worst:.2e}")
    return 0 if worst < 5e-2 else 1


if __name__ == "__main__":
    sys.exit(main())
