"""render: golden module text, stable hashes, hostile names rejected, and the prologue and
epilogue stages against the fp64 reference on every example (NaN-poisoned outputs)."""

from __future__ import annotations

import dataclasses
import math
import types
from pathlib import Path

import jinja2
import pytest
import torch

from ssmc import ir, render
from ssmc.errors import SsmcError
from ssmc.expr_triton import UnsafeNameError
from ssmc.load import load_source
from ssmc.pipeline import parse, parse_file, with_dims
from ssmc.reference import canonical_roles, random_inputs

ROOT = Path(__file__).resolve().parent.parent
COMPOSITE = ("decay_window", "hydra", "mamba2_2ss")
"""Composite masks (mask algebra, docs/variants.md): one module per piece, rendered by
tests/test_algebra.py."""
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.ssm") if p.stem not in COMPOSITE)
GOLDEN = Path(__file__).parent / "golden" / "mamba2_module.py"
VERSIONS = {"ssmc": "0.0.0", "triton": "0.0.0", "torch": "0.0.0"}
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
}


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def small(name: str) -> ir.CheckedSpec:
    return with_dims(parse_file(ROOT / "examples" / f"{name}.ssm"), SMALL[name])


def test_every_example_has_a_small_size() -> None:
    assert set(SMALL) == set(EXAMPLES)


def test_mamba2_module_matches_golden(request: pytest.FixtureRequest) -> None:
    text = render.render_module(parse_file(ROOT / "examples" / "mamba2.ssm"), versions=VERSIONS)
    if request.config.getoption("--update-golden"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
    assert GOLDEN.exists(), "run pytest --update-golden once to create the golden file"
    assert text == GOLDEN.read_text(encoding="utf-8"), (
        "the rendered mamba2 module changed; if intended, rerun with --update-golden"
    )


@pytest.mark.parametrize("name", EXAMPLES)
def test_render_is_deterministic_and_compiles(name: str) -> None:
    checked = parse_file(ROOT / "examples" / f"{name}.ssm")
    first = render.render_module(checked, versions=VERSIONS)
    assert first == render.render_module(checked, versions=VERSIONS)
    assert first.startswith(render.MARKER)
    compile(first, f"<{name}>", "exec")
    # every example trains: the backward is rendered into the module
    assert "\ndef backward(*, " in first and "\ndef prologue_bwd(" in first


def test_a_diagonal_decay_also_renders_a_scalar_decay_forward() -> None:
    """SMAs 2 and 3 of a diagonal decay's backward run a head per (h, n) with a scalar decay:
    the scalar chunked stage is rendered beside chunked_diag (different names)."""
    text = render.render_module(parse_file(ROOT / "examples" / "mamba1.ssm"), versions=VERSIONS)
    assert "\ndef chunked_diag_fwd(" in text and "\ndef chunked_fwd(" in text
    assert text.count("\ndef recurrent_fwd(") == 1
    scalar = render.render_module(parse_file(ROOT / "examples" / "mamba2.ssm"), versions=VERSIONS)
    assert scalar.count("\ndef chunked_fwd(") == 1


def test_without_a_scalar_forward_a_diagonal_spec_does_not_train(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exists = render.stage_exists
    monkeypatch.setattr(render, "stage_exists", lambda name: name != "chunked" and exists(name))
    text = render.render_module(parse_file(ROOT / "examples" / "gla.ssm"), versions=VERSIONS)
    assert "\ndef forward(*, " in text and "def backward(" not in text
    compile(text, "<gla>", "exec")


def test_prologue_passes_bare_tensors_through() -> None:
    pro = render.prologue(parse_file(ROOT / "examples" / "mamba2.ssm"))
    assert pro.passthrough == {"x": 0, "B": 2, "C": 3}
    assert [t.role for t in pro.targets] == ["log_a", "s"]
    gla = render.prologue(parse_file(ROOT / "examples" / "gla.ssm"))
    assert gla.passthrough == {"x": 2, "B": 1} and {t.role for t in gla.targets} == {"log_a", "C"}


def test_a_bare_log_gamma_parameter_is_passed_through() -> None:
    text = (ROOT / "examples" / "retnet.ssm").read_text()
    checked = parse(text.replace("const_decay(gamma = gamma)", "const_decay(log_gamma = gamma)"))
    pro = render.prologue(checked)
    assert pro.passthrough["log_gamma"] == 3 and pro.core["log_a"].startswith("tensors[3].view(")
    compile(render.render_module(checked, versions=VERSIONS), "<retnet>", "exec")


@pytest.mark.parametrize("name", ["grad_y", "grad_final_state"])
def test_backward_keywords_are_reserved(name: str) -> None:
    checked = _renamed_tensor(parse_file(ROOT / "examples" / "mamba2.ssm"), "z", name)
    with pytest.raises(UnsafeNameError):
        render.render_module(checked, versions=VERSIONS)


def test_hash_ignores_layout_but_not_meaning() -> None:
    text = (ROOT / "examples" / "mamba2.ssm").read_text()
    moved = "# a comment that shifts every span\n\n" + text.replace(
        "value x * delta", "value   x*delta"
    )
    a, b = parse(text, "one.ssm"), parse(moved, "two.ssm")
    assert a != b, "spans and source differ"
    assert render.spec_hash(a) == render.spec_hash(b)
    assert render.render_module(a, versions=VERSIONS) == render.render_module(b, versions=VERSIONS)
    changed = parse(text.replace("0.0, inf", "0.0, 100.0"))
    assert render.spec_hash(changed) != render.spec_hash(a)


def _renamed_tensor(checked: ir.CheckedSpec, old: str, new: str) -> ir.CheckedSpec:
    spec = checked.spec
    tensors = tuple(dataclasses.replace(t, name=new) if t.name == old else t for t in spec.tensors)
    return dataclasses.replace(checked, spec=dataclasses.replace(spec, tensors=tensors))


HOSTILE = [
    'x"); import os; os.system("echo pwned"); ("',
    "x\nimport os",
    "lambda",
    "x y",
    "initial_state",
    "form",
    "_ssmc_run",
    "a.b",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_tensor_names_never_reach_the_source(name: str) -> None:
    checked = _renamed_tensor(parse_file(ROOT / "examples" / "mamba2.ssm"), "z", name)
    with pytest.raises(UnsafeNameError):
        render.render_module(checked, versions=VERSIONS)


@pytest.mark.parametrize("where", ["spec", "dim", "used_tensor"])
def test_hostile_names_elsewhere_are_rejected(where: str) -> None:
    checked = parse_file(ROOT / "examples" / "mamba2.ssm")
    spec = checked.spec
    bad = 'H"]; import os #'
    if where == "spec":
        spec = dataclasses.replace(spec, name="mamba2; import os")
    elif where == "dim":
        tensors = tuple(
            dataclasses.replace(t, shape=tuple(bad if a == "H" else a for a in t.shape))
            for t in spec.tensors
        )
        spec = dataclasses.replace(spec, tensors=tensors)
    else:
        checked = _renamed_tensor(checked, "dt_bias", "dt_bias + 1")
        spec = checked.spec
    with pytest.raises(UnsafeNameError):
        render.render_module(dataclasses.replace(checked, spec=spec), versions=VERSIONS)


def test_a_form_without_its_stage_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    exists = render.stage_exists
    monkeypatch.setattr(render, "stage_exists", lambda name: name != "quadratic" and exists(name))
    checked = parse_file(ROOT / "examples" / "mamba2.ssm")
    assert ir.Form.QUADRATIC not in render.available_forms(checked)
    text = render.render_module(checked, versions=VERSIONS)
    assert "def quadratic_fwd(" not in text
    assert 'FORMS = ("recurrent", "chunked")' in text


def test_stage_rendering_is_strict() -> None:
    with pytest.raises(jinja2.UndefinedError):
        render.render_stage("epilogue", kernels=())
    with pytest.raises(SsmcError):
        render.render_stage("../module")


def test_python_literals() -> None:
    assert render.py_literal(("a",)) == '("a",)'
    assert render.py_literal({"H": 8, "x": None}) == '{"H": 8, "x": None}'
    assert render.py_shape(("batch", 1, "N")) == '(sizes["batch"], 1, sizes["N"])'
    with pytest.raises(UnsafeNameError):
        render.py_literal("a\nb")


# ---------------------------------------------------------------------------------------
# Prologue and epilogue numerics, through the generated module of each example.
# ---------------------------------------------------------------------------------------


class PoisonTorch(types.SimpleNamespace):
    """torch, except that every buffer a generated module allocates starts as NaN."""

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


def generated(checked: ir.CheckedSpec) -> types.ModuleType:
    module = load_source(render.render_module(checked), f"gen_{checked.spec.name}")
    module.torch = PoisonTorch()
    return module


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got = got.cpu()
    assert not got.isnan().any(), "an output element was never written"
    want = want.double().expand(got.shape)
    return ((got.double() - want).norm() / want.norm().clamp(min=1e-300)).item()


@pytest.mark.interpret
@pytest.mark.parametrize("name", EXAMPLES)
@pytest.mark.parametrize("T", [1, 33])
def test_prologue_matches_reference_roles(name: str, T: int, gen: torch.Generator) -> None:
    checked = small(name)
    inputs = random_inputs(checked, batch=2, seqlen=T, dtype=torch.float64, generator=gen)
    inputs.pop("initial_state", None)
    module = generated(checked)
    tensors = tuple(inputs[t.name].float().to(DEVICE) for t in checked.spec.tensors)
    sizes = module._bind(tensors)
    roles = canonical_roles(checked, inputs, sizes)
    core = dict(
        zip(render.prologue(checked).core, module.prologue_fwd(tensors, sizes), strict=True)
    )
    xbar = core["x"] if core["s"] is None else core["x"] * core["s"][..., None]
    assert rel(xbar, roles.x) <= 1e-5
    if roles.kernel is not None:
        assert core["kernel"].dtype == torch.float32
        assert rel(core["kernel"], roles.kernel) <= 1e-5
        return
    assert rel(core["B"], roles.B) <= 1e-5 and rel(core["C"], roles.C) <= 1e-5
    if roles.log_a is None:
        assert core["log_a"] is None
    else:
        assert core["log_a"].dtype == torch.float32
        assert rel(core["log_a"], roles.log_a) <= 1e-5


@pytest.mark.interpret
@pytest.mark.parametrize("name", [n for n in EXAMPLES if n in ("mamba2", "mamba1", "s4d")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_epilogue_matches_reference(name: str, dtype: torch.dtype, gen: torch.Generator) -> None:
    checked = small(name)
    inputs = random_inputs(checked, batch=2, seqlen=17, dtype=torch.float64, generator=gen)
    inputs.pop("initial_state", None)
    module = generated(checked)
    tensors = tuple(inputs[t.name].to(dtype).to(DEVICE) for t in checked.spec.tensors)
    sizes = module._bind(tensors)
    roles = canonical_roles(checked, {k: v.to(dtype).double() for k, v in inputs.items()}, sizes)
    y = torch.randn(tuple(roles.x.shape[:2]) + (sizes["H"], roles.x.shape[3]), generator=gen)
    out = torch.full(y.shape, math.nan, dtype=dtype, device=DEVICE)
    module.epilogue_fwd(tensors, sizes, y.to(DEVICE), out)
    want = y.double()
    if roles.skip is not None:
        want = want + roles.skip
    if roles.gate is not None:
        want = want * roles.gate
    assert rel(out, want) <= (1e-5 if dtype == torch.float32 else 1e-3)


def test_specs_without_skip_or_gate_have_no_epilogue() -> None:
    for name in EXAMPLES:
        checked = parse_file(ROOT / "examples" / f"{name}.ssm")
        has = checked.spec.skip is not None or checked.spec.gate is not None
        assert (render.epilogue(checked) is not None) == has
        assert ("def epilogue_fwd(" in render.render_module(checked, versions=VERSIONS)) == has


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.ssm")), ids=lambda p: p.stem)
def test_a_module_renders_the_tile_helpers_once(path: Path) -> None:
    """seq_tiles (the tile table, the split walks' helpers) is included by every tiled stage
    rendered alone, and rendered once in a module however many of them it has."""
    checked = parse_file(path)
    for module in checked.pieces or (checked,):
        source = render.render_module(module)
        assert source.count("\ndef seq_tiles(") <= 1
        assert source.count("\ndef walk_combine_kernel(") == source.count("\ndef seq_tiles(")
    alone = render.render_stage("chunked", decay="scalar")
    assert alone.count("\ndef seq_tiles(") == 1
