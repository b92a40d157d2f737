"""The generated backward: every example, every form its structure allows, against autograd
of the fp64 reference (under TRITON_INTERPRET=1 on a CPU, compiled on a GPU).

Each case draws fresh inputs (seeded by the test id), an initial state where the spec takes
one, and random upstream gradients of y and of the final state, so every path to every
input is exercised; the generated module allocates every buffer NaN-poisoned. The bound is
DESIGN §5's fp32 1e-5 per gradient, times a factor for the gradients that reach a tensor
through the decay (see DECAY_FACTOR).
"""

from __future__ import annotations

import math
import os
import types
from pathlib import Path

import pytest
import torch

from ssmc import ir
from ssmc.load import load
from ssmc.ops import SsmcOp
from ssmc.pipeline import parse_file, with_dims
from ssmc.reference import random_inputs, reference

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.ssm"))
# H ≤ 4, N, P ≤ 16, small enough for the interpreter; diagonal decays keep N small too
# (their backward loops over N inside the kernels).
SMALL = {
    "mamba2": {"H": 4, "G": 2, "N": 8, "P": 4},
    "mamba2_mha": {"H": 2, "N": 8, "P": 4},
    "mka": {"H": 4, "G": 2, "N": 8, "P": 4},
    "mqa": {"H": 4, "G": 2, "N": 8, "P": 4},
    "retnet": {"H": 2, "N": 8, "P": 4},
    "linear_attention": {"H": 2, "N": 8, "P": 4},
    "gla": {"H": 2, "N": 4, "P": 4},
    "mamba1": {"H": 2, "N": 4},
    "s4d": {"H": 4, "N": 8},
    "lssl_hippo": {"H": 4, "N": 8},
    "toeplitz": {"H": 2, "L": 8, "P": 4},
    # mask algebra (docs/variants.md): composite ops of the pieces above
    "mamba2_2ss": {"H": 2, "G": 1, "N": 8, "P": 4},
    "hydra": {"H": 2, "G": 1, "N": 8, "P": 4},
    "decay_window": {"H": 2, "L": 8, "P": 4},
}
BOUND = 1e-5
DECAY_FACTOR = 10
"""Gradients through log a are differences: dcs = C ⊙ dC − B ⊙ dB (+ dh_T ⊙ h_T) cancels where
the decay barely matters (docs/backward.md: ~1e-6 in fp32 at these sizes), and a decay
parameter's gradient (A [H], dt_bias [H]) is a signed sum of these over batch · seq tokens,
which cancels again. Each cancellation costs digits that fp32 kernels cannot have, so those
gradients get 10 × the fp32 bound (the cases land at ≲ 1e-6)."""
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def small(name: str) -> ir.CheckedSpec:
    return with_dims(parse_file(ROOT / "examples" / f"{name}.ssm"), SMALL[name])


class PoisonTorch(types.SimpleNamespace):
    """torch, except that every float buffer a generated module allocates starts as NaN."""

    def __getattr__(self, name: str) -> object:
        return getattr(torch, name)

    @staticmethod
    def empty(*args: object, **kwargs: object) -> torch.Tensor:
        out = torch.empty(*args, **kwargs)  # type: ignore[call-overload]
        return out.fill_(math.nan) if out.is_floating_point() else out

    @staticmethod
    def empty_like(*args: object, **kwargs: object) -> torch.Tensor:
        out = torch.empty_like(*args, **kwargs)  # type: ignore[arg-type]
        return out.fill_(math.nan) if out.is_floating_point() else out


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def make(checked: ir.CheckedSpec) -> SsmcOp:
        op = load(checked)
        monkeypatch.setattr(op.module, "torch", PoisonTorch())
        return op

    return make


def decay_inputs(checked: ir.CheckedSpec) -> set[str]:
    """The tensors the decay (or a Toeplitz kernel) reads: their gradients pass through log a."""
    from ssmc.expr import refs

    mask = checked.spec.mask
    exprs = [getattr(mask, f, None) for f in ("log_a", "log_gamma")]
    if isinstance(mask, ir.Toeplitz) and isinstance(mask.kernel, ir.LtiKernel):
        exprs += [mask.kernel.A, mask.kernel.B, mask.kernel.C, mask.kernel.dt]
    return set().union(*(refs(e) for e in exprs if e is not None))


def error(got: torch.Tensor, want: torch.Tensor) -> float:
    """‖got − want‖ / ‖want‖; ‖got − want‖ where the exact gradient is 0 (a decay at T = 1
    without an initial state: the terms cancel only up to rounding)."""
    got = got.cpu()
    assert got.shape == want.shape and not got.isnan().any(), "every element is written"
    diff = (got.double() - want).norm().item()
    scale = want.norm().item()
    return diff / scale if scale > 0 else diff


def check_gradients(
    op: SsmcOp,
    checked: ir.CheckedSpec,
    inputs: dict[str, torch.Tensor],
    gen: torch.Generator,
    *,
    form: str | None,
    cu_seqlens: torch.Tensor | None = None,
) -> None:
    """Backward of `op` against autograd of the fp64 reference, every gradient, one bound each."""
    init = inputs.pop("initial_state", None)
    want_leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    want_init = None if init is None else init.clone().requires_grad_()
    y64, state64 = reference(checked)(**want_leaves, initial_state=want_init, cu_seqlens=cu_seqlens)
    dy = torch.randn(y64.shape, generator=gen, dtype=torch.float64)
    dstate = None if state64 is None else torch.randn(state64.shape, generator=gen).double()
    loss64 = (y64 * dy).sum() + (0.0 if dstate is None else (state64 * dstate).sum())
    loss64.backward()

    leaves = {k: v.float().to(DEVICE).requires_grad_() for k, v in inputs.items()}
    leaf_init = None if init is None else init.float().to(DEVICE).requires_grad_()
    cu = None if cu_seqlens is None else cu_seqlens.to(DEVICE)
    y, state = op(**leaves, initial_state=leaf_init, cu_seqlens=cu, form=form)
    loss = (y * dy.float().to(DEVICE)).sum()
    if dstate is not None:
        loss = loss + (state * dstate.float().to(DEVICE)).sum()
    loss.backward()

    through_decay = decay_inputs(checked)
    got = {k: v.grad for k, v in leaves.items()}
    want = {k: v.grad for k, v in want_leaves.items()}
    if init is not None:
        got["initial_state"], want["initial_state"] = leaf_init.grad, want_init.grad
    for name, g in got.items():
        assert g is not None and g.dtype == torch.float32, name
        bound = BOUND * (DECAY_FACTOR if name in through_decay else 1)
        assert error(g, want[name]) <= bound, (name, error(g, want[name]))


def _cases() -> list[object]:
    cases = []
    for name in EXAMPLES:
        forms = [f.value for f in load(small(name)).forms]
        cases += [
            pytest.param(name, form, T, id=f"{name}-{form}-T{T}") for form in forms for T in (1, 17)
        ]
        # the planner's form: the one-token forward is the decode step, its backward is not
        cases.append(pytest.param(name, None, 1, id=f"{name}-auto-T1"))
    return cases


@pytest.mark.interpret
@pytest.mark.parametrize(("name", "form", "T"), _cases())
def test_gradients_match_reference(name: str, form: str | None, T: int, poisoned, gen) -> None:  # type: ignore[no-untyped-def]
    checked = small(name)
    inputs = random_inputs(checked, batch=2, seqlen=T, dtype=torch.float64, generator=gen)
    check_gradients(poisoned(checked), checked, inputs, gen, form=form)


VARLEN = [
    pytest.param(name, form, id=f"{name}-{form}")
    for name in ("gla", "mamba2")
    for form in ("recurrent", "chunked")
]


@pytest.mark.interpret
@pytest.mark.parametrize(("name", "form"), VARLEN)
def test_varlen_gradients(name: str, form: str, poisoned, gen) -> None:  # type: ignore[no-untyped-def]
    """Packed sequences (one empty) with an initial state each: nothing leaks across them."""
    checked = small(name)
    lengths = [5, 0, 11, 1]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    inputs = random_inputs(
        checked, batch=1, seqlen=sum(lengths), dtype=torch.float64, generator=gen
    )
    dims = SMALL[name]
    state = (len(lengths), dims["H"], dims["N"], dims["P"])
    inputs["initial_state"] = torch.randn(state, generator=gen, dtype=torch.float64)
    check_gradients(poisoned(checked), checked, inputs, gen, form=form, cu_seqlens=cu)


@pytest.mark.interpret
def test_bare_log_gamma_parameter(poisoned, gen) -> None:  # type: ignore[no-untyped-def]
    """const_decay(log_gamma = g) with a bare [H] parameter: passed through, gradient summed
    over batch and seq."""
    from ssmc.pipeline import parse

    text = (ROOT / "examples" / "retnet.ssm").read_text()
    text = text.replace("const_decay(gamma = gamma)", "const_decay(log_gamma = gamma)")
    checked = with_dims(parse(text), SMALL["retnet"])
    inputs = random_inputs(checked, batch=2, seqlen=17, dtype=torch.float64, generator=gen)
    inputs["gamma"] = -inputs["gamma"].abs() - 0.05
    check_gradients(poisoned(checked), checked, inputs, gen, form="chunked")


@pytest.mark.interpret
def test_half_precision_gradients(poisoned, gen) -> None:  # type: ignore[no-untyped-def]
    """fp16 inputs: gradients come back in fp16, computed in fp32 (bound of DESIGN §5's fp16)."""
    checked = small("mamba2")
    op = poisoned(checked)
    inputs = random_inputs(checked, batch=2, seqlen=17, dtype=torch.float16, generator=gen)
    init = inputs.pop("initial_state").float()
    leaves = {k: v.to(DEVICE).requires_grad_() for k, v in inputs.items()}
    y, state = op(**leaves, initial_state=init.to(DEVICE), form="chunked")
    (y.float().square().sum() + state.sum()).backward()
    ref = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    y64, state64 = reference(checked)(**ref, initial_state=init.double())
    (y64.square().sum() + state64.sum()).backward()
    for name, leaf in leaves.items():
        assert leaf.grad is not None and leaf.grad.dtype == torch.float16, name
        assert error(leaf.grad.float(), ref[name].grad) <= 1e-2, name


# ---------------------------------------------------------------------------------------
# The LTI kernel's vector-Jacobian product (written out: no autograd inside the op).
# ---------------------------------------------------------------------------------------

LTI = {
    "diag-zoh": "A = A, B = Bp, C = Cp, dt = exp(log_dt), discretize = zoh",
    "diag-bilinear": "A = A, B = Bp, C = Cp, dt = exp(log_dt), discretize = bilinear",
    "legs-bilinear": "hippo = legs, C = Cp, dt = exp(log_dt), discretize = bilinear",
    "legt-zoh": "hippo = legt, C = Cp, dt = exp(log_dt), discretize = zoh",
    "lagt-zoh": "hippo = lagt, C = Cp, dt = exp(log_dt), discretize = zoh",
}


@pytest.mark.parametrize("case", sorted(LTI))
@pytest.mark.parametrize("T", [1, 6, 37])
def test_lti_kernel_vjp_matches_autograd(case: str, T: int) -> None:
    """Against torch autograd of the module's own `_lti_kernel`, in fp64; B [N] is shared
    by every head (its gradient sums over them)."""
    from ssmc.load import load_source
    from ssmc.pipeline import parse
    from ssmc.render import render_module

    text = (
        "ssm lti_probe\ndim H = 3, N = 5\ninput x : [batch, seq, H, 1]\n"
        "param A : [H, N]\nparam Bp : [N]\nparam Cp : [H, N]\nparam log_dt : [H]\n"
        f"output y : [batch, seq, H, 1]\nmask lti({LTI[case]})\nvalue x\n"
    )
    if case.startswith(("legs", "legt", "lagt")):
        text = text.replace("param A : [H, N]\nparam Bp : [N]\n", "")
    module = load_source(render_module(parse(text)), f"lti_{case.replace('-', '_')}")
    g = torch.Generator().manual_seed(T)
    hippo = not case.startswith("diag")
    A = None if hippo else -(0.2 + torch.rand(3, 5, generator=g, dtype=torch.float64))
    B = None if hippo else torch.randn(1, 5, generator=g, dtype=torch.float64)
    C = torch.randn(3, 5, generator=g, dtype=torch.float64)
    dt = 0.05 + 0.2 * torch.rand(3, generator=g, dtype=torch.float64)
    leaves = [None if t is None else t.clone().requires_grad_() for t in (A, B, C, dt)]
    kernel = module._lti_kernel(*leaves, T)
    dK = torch.randn(kernel.shape, generator=g).to(kernel.dtype)
    wanted = [t for t in leaves if t is not None]
    want = iter(torch.autograd.grad(kernel, wanted, dK))
    got = module._lti_kernel_vjp(A, B, C, dt, T, dK)
    for name, leaf, grad in zip(("A", "B", "C", "dt"), leaves, got, strict=True):
        assert (leaf is None) == (grad is None), name
        if leaf is not None:
            w = next(want)
            assert grad.shape == leaf.shape and grad.dtype == torch.float64, name
            assert ((grad - w).norm() / w.norm()).item() <= 1e-10, name


@pytest.mark.interpret
def test_gpu_backward_script_cpu_path(tmp_path: Path) -> None:
    """scripts/gpu_backward.py --cpu (the GPU script's code at tiny sizes) runs and passes:
    the gradient rows of one example and the memory rows, written as JSON."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("--cpu runs the generated kernels under the interpreter only")
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(
        "gpu_backward", ROOT / "scripts" / "gpu_backward.py"
    )
    assert spec is not None and spec.loader is not None
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "backward.json"
    assert script.main(["--cpu", "--specs", "mqa", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert {r["form"] for r in report["gradients"]} == {"recurrent", "quadratic", "chunked"}
    assert all(r["ok"] and r["errors"] for r in report["gradients"])
    (row,) = report["memory"]
    # forward + backward at least holds y, dx and dz (each |x|): the tracker sees allocations
    assert row["impl"] == "ssmc" and row["fwd_bwd_peak_mib"] >= 3 * row["x_mib"]


@pytest.mark.interpret
def test_backward_in_slices(poisoned, gen) -> None:  # type: ignore[no-untyped-def]
    """A backward cut into one-row batch slices (per-row gradients written into their rows,
    parameters' summed), whose epilogue makes D's gradient 5 tokens at a time: the same
    gradients as the reference."""
    checked = small("mamba2")
    op = poisoned(checked)
    op.module._BACKWARD_SLICE = 17 * SMALL["mamba2"]["H"] * SMALL["mamba2"]["P"]
    op.module._EPILOGUE_BWD_ELEMENTS = 5 * SMALL["mamba2"]["H"] * SMALL["mamba2"]["P"]
    inputs = random_inputs(checked, batch=3, seqlen=17, dtype=torch.float64, generator=gen)
    check_gradients(op, checked, inputs, gen, form="chunked")


@pytest.mark.interpret
@pytest.mark.parametrize("strided", [False, True], ids=["flat", "strided"])
def test_epilogue_sums_the_skip_parameter_over_groups_of_rows(strided: bool, gen) -> None:  # type: ignore[no-untyped-def]
    """out = (y + D x) silu(z) at 1024 columns (H·P) and T = 150: the kernel sums dD over groups
    of 64 rows (the last one short) and torch sums the groups; every gradient matches autograd
    on the same expression in fp64 (x's as D ⊙ dy, which the core's backward adds). Strided: x's H and P axes swapped in memory, so the kernel
    indexes every column axis (FLAT off) instead of the flat column offset."""
    checked = with_dims(parse_file(ROOT / "examples" / "mamba2.ssm"), {"H": 8, "N": 4, "P": 128})
    module = load(checked).module
    batch, T = 2, 150
    inputs = random_inputs(checked, batch=batch, seqlen=T, dtype=torch.float32, generator=gen)
    if strided:
        inputs["x"] = inputs["x"].transpose(2, 3).contiguous().transpose(2, 3)
    names = [t.name for t in checked.spec.tensors]
    tensors = tuple(inputs[n].to(DEVICE) for n in names)  # .to keeps x's strides
    sizes = {"batch": batch, "seq": T, "H": 8, "G": 1, "N": 4, "P": 128}
    y = torch.randn(batch, T, 8, 128, generator=gen)
    dout = torch.randn(batch, T, 8, 128, generator=gen)
    grads: list[torch.Tensor | None] = [None] * len(tensors)
    d_y = module.epilogue_bwd(tensors, sizes, grads, y.to(DEVICE), dout.to(DEVICE)).cpu()
    grads = [None if g is None else g.cpu() for g in grads]
    x, z, D = (inputs[n].double().requires_grad_() for n in ("x", "z", "D"))
    y64 = y.double().requires_grad_()
    out = (y64 + D[:, None] * x) * torch.nn.functional.silu(z)
    want = torch.autograd.grad(out, (y64, x, z, D), dout.double())
    # x's part through the skip D ⊙ x is the core backward's (ssmc.roles.skip_fold): the
    # epilogue writes none, and D ⊙ dy (module._skip_dx) is x's gradient
    assert grads[names.index("x")] is None
    d_x = module._skip_dx(tensors, d_y.to(DEVICE), torch.zeros_like(d_y, device=DEVICE)).cpu()
    got = (d_y, d_x, grads[names.index("z")], grads[names.index("D")])
    for name, g, w in zip(("y", "x", "z", "D"), got, want, strict=True):
        assert g is not None and g.shape == w.shape, name
        assert error(g.double(), w) <= 1e-5, (name, error(g.double(), w))


@pytest.mark.interpret
def test_epilogue_with_no_tokens_gives_zero_parameter_gradients(gen) -> None:  # type: ignore[no-untyped-def]
    """T = 0: no group of rows, D's gradient is zero and shaped like D (no launch)."""
    checked = with_dims(parse_file(ROOT / "examples" / "mamba2.ssm"), {"H": 8, "N": 4, "P": 128})
    module = load(checked).module
    inputs = random_inputs(checked, batch=2, seqlen=0, dtype=torch.float32, generator=gen)
    names = [t.name for t in checked.spec.tensors]
    tensors = tuple(inputs[n] for n in names)
    sizes = {"batch": 2, "seq": 0, "H": 8, "G": 1, "N": 4, "P": 128}
    grads: list[torch.Tensor | None] = [None] * len(tensors)
    empty = torch.empty(2, 0, 8, 128)
    d_y = module.epilogue_bwd(tensors, sizes, grads, empty, empty)
    d_D = grads[names.index("D")]
    assert d_y.shape == (2, 0, 8, 128)
    assert d_D is not None and d_D.shape == (8,) and torch.equal(d_D, torch.zeros(8))
