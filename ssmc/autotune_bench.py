"""The autotuner's bench: inputs, the fp64 reference, and one candidate's check and time.

`Bench` draws random inputs for a spec at one call shape (per-token inputs in the tuned
dtype, parameters and states fp32), computes the fp64 reference of those rounded inputs
once, and runs a candidate through the generated module's `forward(..., launch=...)`:
`error` after NaN-poisoning the memory its outputs will take, `timer` with CUDA events
after warm-up (perf_counter under the interpreter).
"""

from __future__ import annotations

import statistics
import time
import types
from collections.abc import Callable
from typing import Any

import torch

from ssmc import ir
from ssmc.autotune_space import Candidate
from ssmc.cost_terms import Shape
from ssmc.errors import SsmcError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BOUNDS = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 1e-2}
"""‖out − ref‖/‖ref‖ bounds per input dtype (DESIGN §5; fp32 dots run in IEEE precision)."""
Timer = Callable[[Candidate, Callable[[], object]], float]


class Bench:
    """Inputs, the fp64 reference and the call of one candidate at one shape."""

    def __init__(
        self,
        checked: ir.CheckedSpec,
        module: types.ModuleType,
        shape: Shape,
        dtype: str,
        device: str,
        seed: int,
    ) -> None:
        from ssmc.reference import random_inputs, reference

        self.module, self.dtype, self.device = module, dtype, device
        self.checked, self.seed = checked, seed
        self._dout: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._ref_grads: dict[str, torch.Tensor] | None = None
        generator = torch.Generator().manual_seed(seed)
        inputs64 = random_inputs(
            checked,
            batch=shape.batch,
            seqlen=shape.seqlen,
            dims=dict(shape.dims),
            generator=generator,
        )
        kinds = {t.name: t.kind for t in checked.spec.tensors}
        self.tensors = {
            k: v.to(device=device, dtype=_dtype_of(kinds.get(k), dtype))
            for k, v in inputs64.items()
        }
        self.cu_seqlens = _uneven_offsets(shape, device) if shape.num_seqs > 1 else None
        if self.cu_seqlens is not None and "initial_state" in self.tensors:
            h0 = self.tensors["initial_state"]
            self.tensors["initial_state"] = h0[:1].expand(shape.num_seqs, *h0.shape[1:]).clone()
        exact = {k: v.double() for k, v in self.tensors.items()}
        # The recurrent reference holds one state per head (the chunked one holds a
        # [Q, Q, N] mask per chunk and head for a diagonal decay: tens of GB at real sizes).
        form = ir.Form.RECURRENT if ir.Form.RECURRENT in checked.forms else None
        y, state = reference(checked, form)(**exact, cu_seqlens=self.cu_seqlens)
        self.ref = (y, state)
        self.bound = BOUNDS[dtype]
        H = checked.heads.output
        self.sizes = {
            "T": -(-shape.seqlen // shape.num_seqs),
            "P": int(y.shape[3]),
            "N": int(state.shape[2]) if state is not None else _dim(checked, shape, "N"),
            "H": int(y.shape[2]) if isinstance(H, str) else H,
        }
        self.out_numel = y.numel()

    def call(self, c: Candidate) -> Callable[[], Any]:
        """A no-argument call of the module's forward for candidate `c`."""
        options = c.options

        def run() -> Any:
            return self.module.forward(
                **self.tensors,
                cu_seqlens=self.cu_seqlens,
                form=c.form,
                chunk_size=c.chunk_size,
                launch=options or None,
            )

        return run

    def error(self, c: Candidate) -> float:
        """max over outputs of ‖out − ref‖/‖ref‖, the outputs' memory NaN-poisoned first."""
        from ssmc.run import relative_error

        self._poison()
        y, state = self.call(c)()
        if self.device == "cuda":
            torch.cuda.synchronize()
        errors = [relative_error(y, self.ref[0])]
        if state is not None and self.ref[1] is not None:
            errors.append(relative_error(state, self.ref[1]))
        return max(errors)

    def backward_call(self, c: Candidate, forward: Candidate) -> Callable[[], Any]:
        """A no-argument call of the module's backward with the options of `c` (its fused
        launcher's), for a forward run as `forward`, on the bench's fixed output gradients."""
        dy, dstate = self._output_grads()
        options = c.options

        def run() -> Any:
            return self.module.backward(
                **self.tensors,
                cu_seqlens=self.cu_seqlens,
                form=forward.form,
                chunk_size=forward.chunk_size,
                grad_y=dy,
                grad_final_state=dstate,
                launch_bwd=options or None,
            )

        return run

    def backward_error(self, c: Candidate, forward: Candidate) -> float:
        """max over gradients of ‖grad − ref‖/‖ref‖ against fp64 autograd through the
        reference, the gradients' memory NaN-poisoned first."""
        from ssmc.run import relative_error

        want = self._reference_grads()
        self._poison(4 * sum(t.numel() for t in self.tensors.values()))
        grads, d_init = self.backward_call(c, forward)()
        if self.device == "cuda":
            torch.cuda.synchronize()
        got = dict(zip(self.module.TENSORS, grads, strict=True))
        if d_init is not None:
            got["initial_state"] = d_init
        errors = [relative_error(got[k], ref) for k, ref in want.items() if k in got]
        if len(errors) != len(want):
            missing = sorted(set(want) - set(got))
            raise SsmcError(f"the backward returned no gradient for {', '.join(missing)}")
        return max(errors)

    def _output_grads(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fixed random gradients of y (in the input dtype) and of the final state (fp32)."""
        if self._dout is None:
            generator = torch.Generator().manual_seed(self.seed + 1)
            y, state = self.ref
            dy = torch.randn(y.shape, generator=generator, dtype=torch.float64)
            dstate = None
            if state is not None:
                dstate = torch.randn(state.shape, generator=generator, dtype=torch.float64)
            self._dout = (
                dy.to(self.device, DTYPES[self.dtype]),
                None if dstate is None else dstate.to(self.device, torch.float32),
            )
        return self._dout

    def _reference_grads(self) -> dict[str, torch.Tensor]:
        """Every input's gradient (and initial_state's) by fp64 autograd through the
        reference (its chunked form where the spec allows one), once."""
        from ssmc.reference import reference

        if self._ref_grads is None:
            leaves = {k: v.double().requires_grad_() for k, v in self.tensors.items()}
            y, state = reference(self.checked)(**leaves, cu_seqlens=self.cu_seqlens)
            dy, dstate = self._output_grads()
            outs, seeds = [y], [dy.double()]
            if state is not None and dstate is not None:
                outs.append(state)
                seeds.append(dstate.double())
            grads = torch.autograd.grad(outs, list(leaves.values()), seeds, allow_unused=True)
            self._ref_grads = {
                k: g.detach() for k, g in zip(leaves, grads, strict=True) if g is not None
            }
        return self._ref_grads

    def _poison(self, numel: int = 0) -> None:
        """Fill freed memory with NaN, so that an output the kernels never write is NaN
        (the caching allocator hands the same blocks back to the next allocations)."""
        if self.device == "cuda":
            size = max(numel, 4 * self.out_numel) + (1 << 20)
            torch.empty(size, device="cuda").fill_(float("nan"))


def timer(device: str) -> Timer:
    """CUDA events around each call after warm-up (median); perf_counter on the CPU."""
    if device != "cuda":

        def cpu(_: Candidate, call: Callable[[], object]) -> float:
            started = time.perf_counter()
            call()
            return time.perf_counter() - started

        return cpu

    def cuda(_: Candidate, call: Callable[[], object]) -> float:
        for _i in range(3):
            call()
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        end.synchronize()
        once = max(start.elapsed_time(end) / 1e3, 1e-6)
        reps = max(5, min(100, int(0.05 / once)))
        times = []
        for _i in range(reps):
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    return cuda


def _dtype_of(kind: ir.TensorKind | None, dtype: str) -> torch.dtype:
    """Per-token inputs in `dtype`; parameters and the initial state in fp32."""
    return DTYPES[dtype] if kind is ir.TensorKind.INPUT else torch.float32


def _uneven_offsets(shape: Shape, device: str) -> torch.Tensor:
    """cu_seqlens of num_seqs sequences of lengths ∝ 1, 2, 3, ... filling seqlen tokens."""
    n = shape.num_seqs
    weights = list(range(1, n + 1))
    lengths = [max(1, shape.seqlen * w // sum(weights)) for w in weights]
    lengths[-1] += shape.seqlen - sum(lengths)
    if lengths[-1] < 1:
        raise SsmcError(f"{n} sequences do not fit in {shape.seqlen} tokens")
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def _dim(checked: ir.CheckedSpec, shape: Shape, name: str) -> int:
    size = checked.state_size
    if isinstance(size, int):
        return size
    if size is None:
        return 16
    bound = checked.spec.dim(size).value
    return bound if bound is not None else shape.dims.get(size, 16)
