"""The chunked scan's fused output roles, out = (y + skip) · gate written in the scan's store,
against the fp64 reference of the whole op, under TRITON_INTERPRET=1."""



import math
import types
from pathlib import Path

import pytest
import torch

from ssmc import ir
from ssmc.load import load_source
from ssmc.pipeline import parse_file, with_dims
from ssmc.reference import random_inputs, reference
from ssmc.render import render_module
from ssmc.roles import fused_epilogue, output_inputs

pytestmark = pytest.mark.interpret

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = {"mamba2": {"H": 4, "G": 2, "N": 8, "P": 4}, "mamba2_mha": {"H": 2, "N": 8, "P": 4}}
ACTIVATIONS = ("x", "z", "B", "C")


class PoisonTorch(types.SimpleNamespace):
    """torch, except that every float buffer the module allocates starts as NaN."""

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


def small(name: str) -> ir.CheckedSpec:
    return with_dims(parse_file(ROOT / "examples" / f"{name}.ssm"), SMALL[name])


def module_of(checked: ir.CheckedSpec) -> types.ModuleType:
    """The generated module, allocating NaN buffers, whose separate epilogue must not run."""
    module = load_source(render_module(checked), f"fused_{checked.spec.name}")
    module.torch = PoisonTorch()

    def forbidden(*args: object) -> None:
        raise AssertionError("the chunked form ran the separate epilogue")

    module.epilogue_fwd = forbidden
    return module


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_output_roles_match_reference(name: str, dtype: torch.dtype) -> None:
    """16-bit activations with fp32 dt and parameters (the Mamba-2 recipe): y is 16-bit."""
    checked = small(name)
    gen = torch.Generator().manual_seed(len(name) + (dtype == torch.float16))
    drawn = random_inputs(checked, batch=2, seqlen=45, generator=gen)
    init = drawn.pop("initial_state").float()
    inputs = {k: v.to(dtype) if k in ACTIVATIONS else v.float() for k, v in drawn.items()}
    want, want_state = reference(checked)(
        **{k: v.double() for k, v in inputs.items()}, initial_state=init.double()
    )
    # on the GPU where there is one (the interpreter runs CPU tensors)
    inputs, init = {k: v.to(DEVICE) for k, v in inputs.items()}, init.to(DEVICE)
    want, want_state = want.to(DEVICE), want_state.to(DEVICE)
    module = module_of(checked)
    y, state = module.forward(**inputs, initial_state=init, form="chunked", chunk_size=16)
    assert module.LAST_FORM == "chunked"
    assert y.dtype == dtype and state.dtype == torch.float32
    assert not y.isnan().any(), "an output element was never written"
    bound = 1e-5 if dtype == torch.float32 else 3e-3
    assert ((y.double() - want).norm() / want.norm()).item() <= bound
    assert ((state.double() - want_state).norm() / want_state.norm()).item() <= bound


def test_the_scan_takes_the_output_roles_of_mamba2_only_where_it_has_them() -> None:
    mamba2 = small("mamba2")
    fused = fused_epilogue(mamba2)
    assert fused is not None and fused.text == "(y + (D * x)) * silu(z)"
    assert all(p.startswith("e") for p in fused.params)  # no clash with a kernel local
    source = render_module(mamba2)
    assert "EPILOGUE: tl.constexpr" in source and "def chunked_scan_epilogue_args(" in source
    retnet = parse_file(ROOT / "examples" / "retnet.ssm")
    assert fused_epilogue(retnet) is None
    assert "EPILOGUE" not in render_module(retnet)


def test_y_takes_the_dtype_of_the_inputs_carrying_its_feature_axis() -> None:
    spec = small("mamba2").spec
    names = [spec.tensors[i].name for i in output_inputs(spec)]
    assert names == ["x", "z"]  # not dt (fp32 in Mamba-2), B or C
