"""fp64 inputs at real head sizes on the GPU: each form of Mamba-2 2.7B and GLA (H 16,
N = P = 128), forward and backward at batch 1, T = 1024; prints each form's relative error of y and its
worst gradient from the fp64 reference, or its failure.

    python scripts/gpu_fp64_probe.py
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ssmc.load import load  # noqa: E402
from ssmc.pipeline import parse_file, with_dims  # noqa: E402
from ssmc.reference import random_inputs, reference  # noqa: E402

SPECS = (("mamba2.ssm", {}), ("gla.ssm", {"H": 16, "N": 128, "P": 128}))


def main() -> None:
    for path, dims in SPECS:
        checked = with_dims(parse_file(ROOT / "examples" / path), dims)
        op = load(checked)
        gen = torch.Generator().manual_seed(0)
        inputs = random_inputs(checked, batch=1, seqlen=1024, generator=gen)
        inputs.pop("initial_state", None)
        theirs = {k: v.cuda().requires_grad_() for k, v in inputs.items()}
        want, _ = reference(checked, "chunked")(**theirs)
        weight = torch.randn(want.shape, generator=gen, dtype=torch.float64).cuda()
        (want * weight).sum().backward()
        for form in op.forms:
            leaves = {k: v.cuda().requires_grad_() for k, v in inputs.items()}
            try:
                y, _ = op(**leaves, form=form)
                (y * weight).sum().backward()
                worst = max(rel(leaves[k].grad, t.grad) for k, t in theirs.items())
                print(path, form, f"fp64 fwd+bwd ok: y {rel(y, want):.1e}, worst gradient "
                      f"{worst:.1e} from the fp64 reference", flush=True)
            except Exception as exc:  # noqa: BLE001 - report each form's failure and go on
                last = str(exc).splitlines()[-1][:200] if str(exc) else ""
                # the launch that failed: the last line of the traceback naming a kernel
                launches = [x for x in traceback.format_exc().splitlines() if "_kernel[" in x]
                where = launches[-1].strip() if launches else ""
                print(path, form, "FAILED", type(exc).__name__, last, "at", where, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


if __name__ == "__main__":
    main()
