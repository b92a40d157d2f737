"""ops: every example end to end under the interpreter (every form, T ∈ {1, 33}, varlen,
NaN-poisoned buffers) against the fp64 reference; the op schema, opcheck and torch.compile
(forward, and forward + backward), tensor validation and the CPU reference fallback (with
its gradients). The generated backward's numerics are tests/test_backward.py's."""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from ssmc import ir
from ssmc.errors import TensorError
from ssmc.expr_triton import UnsafeNameError
from ssmc.load import load
from ssmc.ops import SsmcOp, op_name, schema, schema_names
from ssmc.pipeline import parse, parse_file, with_dims
from ssmc.reference import random_inputs, reference

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.ssm"))
SMALL = {
    "mamba2": {"H": 4, "G": 2, "N": 8, "P": 4},
    "mamba2_mha": {"H": 2, "N": 8, "P": 4},
    "mka": {"H": 4, "G": 2, "N": 8, "P": 4},
    "mqa": {"H": 4, "G": 2, "N": 8, "P": 4},
    "retnet": {"H": 2, "N": 8, "P": 4},
    "linear_attention": {"H": 2, "N": 8, "P": 4},
    "gla": {"H": 2, "N": 8, "P": 4},
    "mamba1": {"H": 4, "N": 8},
    "s4d": {"H": 4, "N": 8},
    "lssl_hippo": {"H": 4, "N": 8},
    "toeplitz": {"H": 2, "L": 8, "P": 4},
    # mask algebra (docs/variants.md): composite ops of the pieces above
    "mamba2_2ss": {"H": 2, "G": 1, "N": 8, "P": 4},
    "hydra": {"H": 2, "G": 1, "N": 8, "P": 4},
    "decay_window": {"H": 2, "L": 8, "P": 4},
}
BOUND = {torch.float32: 1e-5, torch.float16: 5e-3}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Kernels run compiled on a GPU, else under the interpreter (conftest sets it)."""


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
    """Load a spec's op with NaN-filled allocations in its generated module."""

    def make(checked: ir.CheckedSpec) -> SsmcOp:
        op = load(checked)
        monkeypatch.setattr(op.module, "torch", PoisonTorch())
        return op

    return make


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got = got.cpu()
    assert got.shape == want.shape
    assert not got.isnan().any(), "an element was never written"
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _cases() -> list[tuple[str, str, int]]:
    cases = []
    for name in EXAMPLES:
        forms = ["auto", *(f.value for f in load(small(name)).forms)]
        cases += [(name, form, T) for form in forms for T in (1, 33)]
    return cases


@pytest.mark.interpret
@pytest.mark.parametrize(("name", "form", "T"), _cases())
def test_example_matches_reference(name: str, form: str, T: int, poisoned, gen) -> None:  # type: ignore[no-untyped-def]
    checked = small(name)
    op = poisoned(checked)
    inputs = random_inputs(checked, batch=2, seqlen=T, dtype=torch.float64, generator=gen)
    init = inputs.pop("initial_state", None)
    want, want_state = reference(checked)(**inputs, initial_state=init)
    y, state = op(
        **{k: v.float().to(DEVICE) for k, v in inputs.items()},
        initial_state=None if init is None else init.float().to(DEVICE),
        form=None if form == "auto" else form,
    )
    assert y.dtype == torch.float32
    assert rel(y, want) <= 1e-5
    assert (state is None) == (not checked.spec.final_state)
    if state is not None:
        assert state.dtype == torch.float32 and rel(state, want_state) <= 1e-5


@pytest.mark.interpret
@pytest.mark.parametrize("name", [n for n in EXAMPLES if small(n).spec.varlen])
def test_varlen_matches_reference(name: str, poisoned, gen) -> None:  # type: ignore[no-untyped-def]
    checked = small(name)
    op = poisoned(checked)
    lengths = [5, 1, 11, 16]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    inputs = random_inputs(
        checked, batch=1, seqlen=sum(lengths), dtype=torch.float64, generator=gen
    )
    inputs.pop("initial_state", None)
    state_shape = (len(lengths), *(SMALL[name][d] for d in ("H", "N", "P")))
    init = (
        torch.randn(state_shape, generator=gen, dtype=torch.float64)
        if checked.spec.initial_state
        else None
    )
    want, want_state = reference(checked)(**inputs, initial_state=init, cu_seqlens=cu)
    for form in op.forms:
        y, state = op(
            **{k: v.float().to(DEVICE) for k, v in inputs.items()},
            initial_state=None if init is None else init.float().to(DEVICE),
            cu_seqlens=cu.to(DEVICE),
            form=form,
        )
        assert rel(y, want) <= 1e-5, form
        assert rel(state, want_state) <= 1e-5, form


@pytest.mark.interpret
@pytest.mark.parametrize("name", ["mamba2", "gla"])
def test_half_precision_inputs(name: str, poisoned, gen) -> None:  # type: ignore[no-untyped-def]
    """16-bit inputs in every form (the diagonal chunked form keeps its A block 16-bit)."""
    checked = small(name)
    op = poisoned(checked)
    inputs = random_inputs(checked, batch=2, seqlen=33, dtype=torch.float16, generator=gen)
    init = inputs.pop("initial_state").float()
    want, _ = reference(checked)(
        **{k: v.double() for k, v in inputs.items()}, initial_state=init.double()
    )
    for form in op.forms:
        y, state = op(
            **{k: v.to(DEVICE) for k, v in inputs.items()}, initial_state=init.to(DEVICE), form=form
        )
        assert y.dtype == torch.float16 and state.dtype == torch.float32
        assert rel(y, want) <= BOUND[torch.float16], form


def test_op_names_and_schema_come_from_identifiers() -> None:
    checked = parse_file(ROOT / "examples" / "mamba2.ssm")
    assert op_name(checked).startswith("mamba2_") and len(op_name(checked)) == len("mamba2_") + 8
    assert schema(checked).startswith("(Tensor x, Tensor dt, Tensor B, Tensor C, Tensor z, ")
    # y, the final state, the core kept for the backward ([0] unless asked)
    assert schema(checked).endswith("bool keep_core=False) -> (Tensor, Tensor, Tensor)")
    assert schema(parse_file(ROOT / "examples" / "s4d.ssm")).endswith("-> (Tensor, Tensor)")
    spec = checked.spec
    bad = tuple(
        ir.Tensor(name="x) -> Tensor; (" if t.name == "z" else t.name, kind=t.kind, shape=t.shape)
        for t in spec.tensors
    )
    hostile = ir.CheckedSpec(
        **{f: getattr(checked, f) for f in checked.__dataclass_fields__}
        | {
            "spec": ir.Spec(
                **{f: getattr(spec, f) for f in spec.__dataclass_fields__} | {"tensors": bad}
            )
        }
    )
    with pytest.raises(UnsafeNameError):
        schema(hostile)


def _renamed(checked: ir.CheckedSpec, names: dict[str, str]) -> ir.CheckedSpec:
    """`checked` with its tensors renamed (the IR only: what schema_names sees)."""
    spec = checked.spec
    tensors = tuple(
        ir.Tensor(name=names.get(t.name, t.name), kind=t.kind, shape=t.shape) for t in spec.tensors
    )
    fields = {f: getattr(spec, f) for f in spec.__dataclass_fields__} | {"tensors": tensors}
    return ir.CheckedSpec(
        **{f: getattr(checked, f) for f in checked.__dataclass_fields__}
        | {"spec": ir.Spec(**fields)}
    )


def test_schema_renames_never_collide() -> None:
    """A name the schema reserves takes `arg_` prefixes until it is free (`out` beside a
    tensor `arg_out` was a collision, UnsafeNameError at load)."""
    checked = parse_file(ROOT / "examples" / "mamba2.ssm")
    names = {"x": "out", "dt": "arg_out", "B": "self", "C": "arg_self", "z": "arg_arg_out"}
    renamed = schema_names(_renamed(checked, names))
    assert renamed[:5] == ("arg_arg_arg_out", "arg_out", "arg_arg_self", "arg_self", "arg_arg_out")
    assert len(set(renamed)) == len(renamed)
    assert schema(_renamed(checked, names)).startswith("(Tensor arg_arg_arg_out, Tensor arg_out")


CALL_TIME_GROUP = """\
ssm call_time_group
dim H = 4, G, N = 8, P = 8
input x : [batch, seq, H, P]
input B : [batch, seq, G, N]
input C : [batch, seq, G, N]
output y : [batch, seq, H, P]
mask causal
query C
key   B
value x
"""
"""The fuzzer's reproducer of bug 11: H bound below 64, the group count G at call time (the
form rule was planned with G = 64: division by zero, the spec could not be rendered)."""


@pytest.mark.interpret
@pytest.mark.parametrize("G", [1, 2, 4])
def test_call_time_group_count_below_64_heads(G: int, poisoned, gen) -> None:  # type: ignore[no-untyped-def]
    checked = parse(CALL_TIME_GROUP)
    op = poisoned(checked)
    inputs = random_inputs(
        checked, batch=2, seqlen=9, dims={"G": G}, dtype=torch.float64, generator=gen
    )
    want, _ = reference(checked)(**inputs)
    for form in ("auto", *(f.value for f in op.forms)):
        y, _ = op(
            **{k: v.float().to(DEVICE) for k, v in inputs.items()},
            form=None if form == "auto" else form,
        )
        assert rel(y, want) <= 1e-5, form


@pytest.mark.interpret
def test_opcheck_and_compile_fullgraph(gen: torch.Generator) -> None:
    checked = small("mamba2")
    op = load(checked)
    inputs = random_inputs(checked, batch=2, seqlen=5, dtype=torch.float32, generator=gen)
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}
    init = inputs.pop("initial_state")
    args = (*(inputs[t.name] for t in checked.spec.tensors), init, None, "chunked", None)
    results = torch.library.opcheck(op.op, args)
    assert set(results.values()) == {"SUCCESS"}, results

    def f(**tensors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return op(**tensors, initial_state=init, form="chunked")

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    y, state = compiled(**inputs)
    y0, state0 = f(**inputs)
    assert torch.equal(y, y0) and state is not None and torch.equal(state, state0)


BACKWARD_OPCHECK = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)
TOEPLITZ_OPCHECK = BACKWARD_OPCHECK[:3]
"""The backward op of a Toeplitz spec fails test_aot_dispatch_dynamic: see
test_toeplitz_backward_op_under_aot_dispatch."""


@pytest.mark.interpret
@pytest.mark.parametrize("name", ["mamba2", "s4d"])
def test_opcheck_and_compile_with_gradients(name: str, gen: torch.Generator) -> None:
    """opcheck with inputs that need gradients (autograd registration, AOT dispatch with
    dynamic shapes through the backward op's fake kernel), opcheck of the backward op, and
    a fullgraph compile of forward and backward whose gradients equal eager ones."""
    checked = small(name)
    op = load(checked)
    inputs = random_inputs(checked, batch=2, seqlen=5, dtype=torch.float32, generator=gen)
    leaves = {k: v.to(DEVICE).requires_grad_() for k, v in inputs.items()}
    init = leaves.pop("initial_state", None)
    form = "chunked" if ir.Form.CHUNKED in op.forms else "quadratic"
    args = (*(leaves[t.name] for t in checked.spec.tensors), init, None, form, None)
    results = torch.library.opcheck(op.op, args)
    assert set(results.values()) == {"SUCCESS"}, results

    y, state = op(**leaves, initial_state=init, form=form)
    dy = torch.randn(y.shape, generator=gen).to(DEVICE)
    dstate = None if state is None else torch.randn(state.shape, generator=gen).to(DEVICE)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    utils = TOEPLITZ_OPCHECK if isinstance(checked.spec.mask, ir.Toeplitz) else BACKWARD_OPCHECK
    results = torch.library.opcheck(
        op._registered.backward_op, (dy, dstate, *detached), test_utils=utils
    )
    assert set(results.values()) == {"SUCCESS"}, results

    def loss(**tensors: torch.Tensor) -> torch.Tensor:
        y, state = op(**tensors, initial_state=init, form=form)
        return (y * dy).sum() + (0.0 if state is None else (state * dstate).sum())

    wrt = [*leaves.values(), *([] if init is None else [init])]
    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(**leaves), wrt)
    want = torch.autograd.grad(loss(**leaves), wrt)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.mark.interpret
def test_toeplitz_backward_op_under_aot_dispatch(gen: torch.Generator) -> None:
    checked = small("toeplitz")
    op = load(checked)
    inputs = random_inputs(checked, batch=2, seqlen=5, dtype=torch.float32, generator=gen)
    args = (*(inputs[t.name].to(DEVICE) for t in checked.spec.tensors), None, None, "quadratic")
    dy = torch.randn(2, 5, *(SMALL["toeplitz"][d] for d in ("H", "P")), generator=gen)
    results = torch.library.opcheck(
        op._registered.backward_op,
        (dy.to(DEVICE), None, *args, None),
        test_utils="test_aot_dispatch_dynamic",
    )
    assert set(results.values()) == {"SUCCESS"}, results


def test_tensors_are_validated_before_anything_runs(gen: torch.Generator) -> None:
    checked = small("mamba2")
    op = load(checked)
    inputs = random_inputs(checked, batch=2, seqlen=4, dtype=torch.float32, generator=gen)
    inputs.pop("initial_state")
    with pytest.raises(TensorError, match="dt_bias"):
        op(**(inputs | {"dt_bias": torch.zeros(5)}))
    with pytest.raises(TensorError, match="z"):
        op(**{k: v for k, v in inputs.items() if k != "z"})
    with pytest.raises(TensorError, match="cu_seqlens"):
        op(**inputs, cu_seqlens=torch.tensor([0, 2, 4]))


def test_validation_is_cached_per_metadata(
    monkeypatch: pytest.MonkeyPatch, gen: torch.Generator
) -> None:
    import ssmc.ops as ops

    checked = small("mamba2")
    op = load(checked)
    calls = []
    real = ops.bind
    monkeypatch.setattr(ops, "bind", lambda *a, **k: calls.append(1) or real(*a, **k))
    inputs = random_inputs(checked, batch=1, seqlen=1, dtype=torch.float32, generator=gen)
    inputs.pop("initial_state")
    for _ in range(3):
        op._validate(inputs, None, None)
    assert len(calls) == 1


def test_cpu_without_interpreter_runs_the_reference(tmp_path: Path) -> None:
    code = (
        "import warnings, torch\n"
        "from ssmc.load import load\n"
        "from ssmc.pipeline import parse_file, with_dims\n"
        "from ssmc.reference import random_inputs, reference\n"
        f"c = with_dims(parse_file({str(ROOT / 'examples' / 'mamba2.ssm')!r}), {SMALL['mamba2']!r})\n"
        "op = load(c)\n"
        "x = random_inputs(c, batch=2, seqlen=7, dtype=torch.float32)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    y, s = op(**x)\n"
        "    op(**x)\n"
        "ref, _ = reference(c)(**x)\n"
        "assert torch.allclose(y, ref), 'the reference ran'\n"
        "# gradients: autograd of the reference\n"
        "leaves = {k: v.clone().requires_grad_() for k, v in x.items()}\n"
        "y, s = op(**leaves)\n"
        "(y.square().sum() + s.sum()).backward()\n"
        "ref_leaves = {k: v.clone().requires_grad_() for k, v in x.items()}\n"
        "ry, rs = reference(c)(**ref_leaves)\n"
        "(ry.square().sum() + rs.sum()).backward()\n"
        "for k in x:\n"
        "    assert torch.allclose(leaves[k].grad, ref_leaves[k].grad, atol=1e-5), k\n"
        "print(sum('PyTorch reference' in str(m.message) for m in w))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"SSMC_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, text=True, capture_output=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "1", "said once"


def test_a_value_scaled_by_a_dim_name(tmp_path: Path) -> None:
    """`value x * P` (a dim's name as the scale) renders, plans and matches the fp64
    reference (the prologue and the cost model took every bare name for a tensor)."""
    spec = parse(
        "ssm vp\ndim H = 2, N = 4, P = 4\ninput x : [batch, seq, H, P]\n"
        "input B : [batch, seq, H, N]\ninput C : [batch, seq, H, N]\n"
        "output y : [batch, seq, H, P]\nmask causal\nquery C\nkey B\nvalue x * P\n"
    )
    op = load(spec, cache_dir=tmp_path)
    g = torch.Generator().manual_seed(3)
    inputs = random_inputs(op.checked, batch=2, seqlen=9, dtype=torch.float32, generator=g)
    want, _ = reference(op.checked)(**{k: v.double() for k, v in inputs.items()})
    got, _ = op(**inputs)
    err = (got.double() - want).norm() / want.norm()
    assert torch.isfinite(got).all() and err < 1e-5, err


_DECAYS = {
    # decay shared by every head, read per state dim
    "shared": ("input g : [batch, seq, N]", "-softplus(g) / N"),
    # one decay per group of heads, scaled by a per-(group, n) parameter
    "grouped": ("input g : [batch, seq, G, N]\nparam w : [G, N]", "logsigmoid(g) * exp(w)"),
    # Mamba-1's layout: a per-head step times a per-(head, n) parameter
    "per_head": ("input g : [batch, seq, H]\nparam w : [H, N]", "-softplus(g) * exp(w)"),
}


@pytest.mark.interpret
@pytest.mark.parametrize("layout", sorted(_DECAYS))
def test_diagonal_decay_expression_is_evaluated_in_the_chunked_cumsum(
    layout: str, poisoned, gen  # type: ignore[no-untyped-def]
) -> None:
    """The chunked forward of a diagonal decay given by an expression never writes log a:
    its cumsum evaluates the expression (chunked_diag_decay) at every decay layout, with
    cu_seqlens too, and matches the fp64 reference; the recurrent form still reads the
    prologue's log a. The query, a tensor times a constant, is read unscaled by the chunked
    forward (its scan scales y), at a power of two and at a constant that is not one."""
    decl, log_a = _DECAYS[layout]
    query = "q / 3" if layout == "per_head" else "q * 0.5"
    spec = parse(
        "ssm fused\ndim H = 4, G = 2, N = 8, P = 4\n"
        "input q : [batch, seq, H, N]\ninput k : [batch, seq, H, N]\n"
        f"input v : [batch, seq, H, P]\n{decl}\noutput o : [batch, seq, H, P]\n"
        f"mask diagonal(log_a = {log_a})\nquery {query}\nkey k\nvalue v\n"
        "initial_state\nfinal_state\nvarlen\n"
    )
    op = poisoned(spec)
    module = op.module
    assert hasattr(module, "DecayInputs") and hasattr(module, "chunked_diag_decay_intra_fwd_kernel")
    assert '"C": tensors[0]' in inspect.getsource(module.prologue_roles)
    lengths = [5, 40, 19]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    for cu_seqlens, batch, T in ((None, 2, 37), (cu, 1, sum(lengths))):
        inputs = random_inputs(op.checked, batch=batch, seqlen=T, dtype=torch.float64,
                               generator=gen)
        states = batch if cu_seqlens is None else len(lengths)
        init = torch.randn((states, 4, 8, 4), generator=gen, dtype=torch.float64)
        inputs.pop("initial_state", None)
        want, want_state = reference(op.checked)(**inputs, initial_state=init,
                                                 cu_seqlens=cu_seqlens)
        # chunk 64: the fused decay + intra program takes the whole chunk at once, or (a
        # whole-chunk spread of 0 allowed) walks its 16-row sub-chunks; and the same with the
        # decay's own launch (FUSE_DECAY_INTRA off)
        runs = [("chunked", 16, True, None), ("chunked", 64, True, None),
                ("chunked", 64, True, 0.0), ("chunked", 64, False, None),
                ("chunked", 64, False, 0.0), ("recurrent", 16, True, None)]
        default = module.FUSE_DECAY_INTRA, module.WHOLE_SPREAD
        for form, chunk, fuse, spread in runs:
            module.FUSE_DECAY_INTRA = fuse
            module.WHOLE_SPREAD = default[1] if spread is None else spread
            try:
                y, state = op(
                    **{k: v.float().to(DEVICE) for k, v in inputs.items()},
                    initial_state=init.float().to(DEVICE),
                    cu_seqlens=None if cu_seqlens is None else cu_seqlens.to(DEVICE),
                    form=form, chunk_size=chunk,
                )
            finally:
                module.FUSE_DECAY_INTRA, module.WHOLE_SPREAD = default
            assert rel(y, want) <= 1e-5, (form, chunk, fuse, spread, cu_seqlens)
            assert rel(state, want_state) <= 1e-5, (form, chunk, fuse, spread, cu_seqlens)
