"""The one-token decode step in one launch (ssmc.decode_fusion): consecutive fused steps equal
the fp64 reference for every example with a recurrent form, every output element is written,
a step is exactly one `decode_fwd_kernel` launch, and the separate-launch path stays."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ssmc import ir
from ssmc.decode_fusion import decode_fusion
from ssmc.load import load, load_source
from ssmc.pipeline import parse, parse_file, with_dims
from ssmc.reference import random_inputs, reference
from ssmc.render import render_module

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.interpret

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3
# small dims; N and P not powers of two where the spec allows (masked lanes of the tile)
SMALL = {
    "mamba1": {"H": 4, "N": 6},
    "mamba2": {"H": 4, "G": 2, "N": 6, "P": 3},
    "mamba2_mha": {"H": 2, "N": 8, "P": 4},
    "gla": {"H": 2, "N": 5, "P": 4},
    "retnet": {"H": 2, "N": 8, "P": 3},
    "mqa": {"H": 4, "G": 2, "N": 8, "P": 4},
    "mka": {"H": 4, "G": 2, "N": 8, "P": 4},
    "linear_attention": {"H": 2, "N": 8, "P": 5},
}
CALL_TIME_DIMS = """ssm scaled
dim H, G, N, P
input q : [batch, seq, G, N]
input k : [batch, seq, G, N]
input v : [batch, seq, H, P]
input g : [batch, seq, H]
output o : [batch, seq, H, P]
mask semiseparable(log_a = logsigmoid(g) * 2 / P)
query q / sqrt(N)
key k
value v
initial_state
final_state
"""


def _checked(name: str) -> ir.CheckedSpec:
    if name == "scaled":
        return parse(CALL_TIME_DIMS)
    return with_dims(parse_file(ROOT / "examples" / f"{name}.ssm"), SMALL[name])


def _random(checked: ir.CheckedSpec, **kw: Any) -> dict[str, torch.Tensor]:
    """random_inputs on the GPU where there is one (the interpreter runs CPU tensors)."""
    return {k: v.to(DEVICE) for k, v in random_inputs(checked, **kw).items()}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def _token(checked: ir.CheckedSpec, inputs: dict[str, torch.Tensor], t: int) -> tuple[torch.Tensor, ...]:
    """The spec's tensors of token t (per-token inputs sliced to [b, 1, ...], a strided view)."""
    return tuple(
        inputs[d.name][:, t : t + 1] if d.shape[:2] == (ir.BATCH, ir.SEQ) else inputs[d.name]
        for d in checked.spec.tensors
    )


@pytest.mark.parametrize("name", [*SMALL, "scaled"])
def test_fused_steps_equal_the_reference(name: str, gen: torch.Generator) -> None:
    checked = _checked(name)
    assert decode_fusion(checked) is not None
    op = load(checked)
    dims = {"H": 4, "G": 2, "N": 6, "P": 3} if name == "scaled" else None
    inputs = _random(checked, batch=2, seqlen=STEPS, dims=dims, generator=gen)
    y_ref, state_ref = reference(checked)(**inputs)
    inputs32 = {k: v.float() for k, v in inputs.items()}
    batch, _, H, P = y_ref.shape
    N = op.module._bind(_token(checked, inputs32, 0))[checked.state_size]
    state = inputs32.get("initial_state")
    if state is None:
        state = torch.zeros(batch, H, N, P, device=DEVICE)
    for t in range(STEPS):
        tensors = _token(checked, inputs32, t)
        sizes = op.module._bind(tensors)
        out = torch.full((batch, 1, H, P), float("nan"), device=DEVICE)  # every element must be written
        state = state.clone()
        op.module.decode_fused_fwd(tensors, sizes, heads=H, state=state, out=out, state_in=state)
        assert not out.isnan().any(), f"step {t}: out not written everywhere"
        assert _rel(out, y_ref[:, t : t + 1]) < 1e-5, f"step {t}"
    if state_ref is not None:
        assert _rel(state, state_ref) < 1e-5
    # the op's own one-token path is the fused one and agrees too (last token, carried state)
    step = {d.name: v for d, v in zip(checked.spec.tensors, _token(checked, inputs32, STEPS - 1), strict=True)}
    if checked.spec.initial_state and checked.spec.final_state:
        _, h_prev = reference(checked)(**_first(checked, inputs, STEPS - 1))
        y, h = op(**step, initial_state=h_prev.float())
        assert op.last_form == "decode"
        assert _rel(y, y_ref[:, STEPS - 1 :]) < 1e-5
        assert _rel(h, state_ref) < 1e-5


def _first(checked: ir.CheckedSpec, inputs: dict[str, torch.Tensor], T: int) -> dict[str, torch.Tensor]:
    """The reference's inputs for the first T tokens."""
    return {
        k: v[:, :T] if k in {d.name for d in checked.spec.tensors if d.shape[:2] == (ir.BATCH, ir.SEQ)} else v
        for k, v in inputs.items()
    }


def test_bf16_inputs_give_a_bf16_out_within_its_rounding(gen: torch.Generator) -> None:
    checked = _checked("mamba2")
    op = load(checked)
    inputs = _random(checked, batch=3, seqlen=1, generator=gen)
    low = {k: v.to(torch.bfloat16) if k in ("x", "B", "C", "z") else v.float() for k, v in inputs.items()}
    y_ref, state_ref = reference(checked)(**{k: v.double() for k, v in low.items()})
    y, state = op(**low)
    assert op.last_form == "decode" and y.dtype == torch.bfloat16
    assert _rel(y, y_ref) < 1e-2
    assert _rel(state, state_ref) < 1e-5


def _counting(module: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every Triton kernel of `module` wrapped so that each launch is recorded (and still runs)."""
    from triton.runtime.jit import KernelInterface

    launched: list[str] = []

    class Counter:
        def __init__(self, name: str, kernel: Any) -> None:
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid: Any) -> Callable[..., Any]:
            def launch(*args: Any, **kwargs: Any) -> Any:
                launched.append(self.name)
                return self.kernel[grid](*args, **kwargs)

            return launch

    for name, value in list(vars(module).items()):
        if isinstance(value, KernelInterface) and name.endswith("kernel"):
            monkeypatch.setattr(module, name, Counter(name, value))
    return launched


@pytest.mark.parametrize("name", ["mamba1", "mamba2", "gla"])
def test_a_decode_step_is_one_launch(name: str, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    checked = _checked(name)
    op = load(checked)
    inputs = {k: v.float() for k, v in _random(checked, batch=2, seqlen=1, generator=gen).items()}
    op(**inputs)  # the first call of a kind on a GPU also compiles its kernels (no launch)
    launched = _counting(op.module, monkeypatch)
    y, _ = op(**inputs)
    assert op.last_form == "decode"
    assert launched == ["decode_fwd_kernel"]
    y_ref, _ = reference(checked)(**inputs)
    assert _rel(y, y_ref.double()) < 1e-5


def test_the_separate_launch_path_is_kept_where_fusion_is_not_rendered(
    gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    checked = _checked("mamba2")
    monkeypatch.setattr("ssmc.render.decode_fusion", lambda c: None)
    module = load_source(render_module(checked), "decode_unfused_mamba2")
    assert not hasattr(module, "decode_fused_fwd") and hasattr(module, "decode_tokens_fwd")
    inputs = {k: v.float() for k, v in _random(checked, batch=2, seqlen=1, generator=gen).items()}
    launched = _counting(module, monkeypatch)
    y, state = module.forward(**inputs)
    assert module.LAST_FORM == "decode"
    assert "decode_fwd_kernel" in launched and len(launched) > 1
    y_ref, state_ref = reference(checked)(**inputs)
    assert _rel(y, y_ref) < 1e-5 and _rel(state, state_ref) < 1e-5


def test_specs_without_a_one_token_recurrence_are_not_fused() -> None:
    for name in ("s4d", "toeplitz", "lssl_hippo"):
        assert decode_fusion(parse_file(ROOT / "examples" / f"{name}.ssm")) is None


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
def test_a_step_reads_initial_state_and_writes_a_fresh_state(
    fused: bool, with_state: bool, gen: torch.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The op is functional: initial_state is read, never written (no copy of it is made
    first either: the kernel writes the next state to a new tensor); without one the step
    starts from zero without reading anything."""
    checked = _checked("mamba2")
    if not fused:
        monkeypatch.setattr("ssmc.render.decode_fusion", lambda c: None)
    module = load_source(render_module(checked), f"decode_functional_{fused}")
    inputs = {k: v.float() for k, v in _random(checked, batch=3, seqlen=1, generator=gen).items()}
    if not with_state:
        inputs.pop("initial_state")
    kept = {k: v.clone() for k, v in inputs.items()}
    y_ref, state_ref = reference(checked)(**{k: v.double() for k, v in inputs.items()})
    y, state = module.forward(**inputs)
    assert module.LAST_FORM == "decode"
    for k, v in inputs.items():
        assert torch.equal(v, kept[k]), f"{k} was written"
    if with_state:
        assert state.data_ptr() != inputs["initial_state"].data_ptr()
    assert _rel(y, y_ref) < 1e-5 and _rel(state, state_ref) < 1e-5
