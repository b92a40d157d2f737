"""nn: SequenceMixer on every example (shapes, gradients to every parameter), parameter
initialisation by role, dims binding, packed sequences, and Mamba2Block.step token by
token against the full-sequence forward (fp64 reference path; fp32 through the op)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ssmc.nn import MAMBA2_SPEC, Mamba2Block, SequenceMixer, bind_dims
from ssmc.pipeline import parse, parse_file
from ssmc.render import stable_repr

ROOT = Path(__file__).resolve().parent.parent
SMALL = {
    "mamba2": {"H": 4, "G": 2, "N": 8, "P": 4},
    "mamba2_mha": {"H": 2, "N": 8, "P": 4},
    "mka": {"H": 4, "G": 2, "N": 8, "P": 4},
    "mqa": {"H": 4, "G": 2, "N": 8, "P": 4},
    "retnet": {"H": 2, "N": 8, "P": 4},
    "linear_attention": {"H": 2, "N": 8, "P": 4},
    "gla": {"H": 2, "N": 8, "P": 4},
    "mamba1": {"H": 8, "N": 4},
    "s4d": {"H": 4, "N": 8},
    "lssl_hippo": {"H": 4, "N": 8},
    "toeplitz": {"H": 2, "L": 8, "P": 4},
    "mamba2_2ss": {"H": 2, "N": 8, "P": 4},
}
D_MODEL = 16


def mixer(name: str, **kwargs: object) -> SequenceMixer:
    return SequenceMixer(ROOT / "examples" / f"{name}.ssm", D_MODEL, dims=SMALL[name], **kwargs)


@torch.no_grad()
def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.interpret
@pytest.mark.parametrize("name", sorted(SMALL))
def test_shapes_and_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    m = mixer(name)
    u = torch.randn(2, 7, D_MODEL, requires_grad=True)
    y = m(u)
    assert y.shape == u.shape and torch.isfinite(y).all()
    y.square().sum().backward()
    assert u.grad is not None and torch.isfinite(u.grad).all()
    for pname, p in m.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def _reach(m: SequenceMixer, u: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """|d⟨w, y[b, t]⟩ / d u| summed over features, [batch, T]: which tokens y[b, t] reads."""
    u = u.clone().requires_grad_(True)
    w = torch.randn(u.shape[-1], dtype=u.dtype, generator=torch.Generator().manual_seed(t))
    (m(u)[b, t] * w).sum().backward()
    assert u.grad is not None
    return u.grad.abs().sum(-1)


def _assert_mixes_causally_along_seq(m: SequenceMixer, u: torch.Tensor) -> None:
    """y[b, t] reads u[b, s] for s ≤ t only, some s beyond the conv's reach, never another row."""
    T = u.shape[1]
    for b, t in ((1, T - 2), (0, T - 1), (2, 5)):
        reach = _reach(m, u, b, t)
        others = torch.cat([reach[:b], reach[b + 1 :]])
        assert (others == 0).all(), "mixes across the batch"
        assert (reach[b, t + 1 :] == 0).all(), "reads later tokens"
        assert (reach[b, : t + 1] > 0).all(), "misses earlier tokens"
        # Past the causal conv's window only the op carries information.
        assert reach[b, : t - m.d_conv].sum() > 1e-6 * reach[b].sum()


@pytest.mark.parametrize("name", ["mamba2", "gla", "retnet", "toeplitz"])
def test_mixes_causally_along_seq_never_across_batch(name: str) -> None:
    torch.manual_seed(0)
    m = mixer(name, use_reference=True).double()
    _assert_mixes_causally_along_seq(m, torch.randn(3, 9, D_MODEL, dtype=torch.float64))


@pytest.mark.interpret
def test_op_mixes_causally_along_seq_never_across_batch() -> None:
    torch.manual_seed(0)
    m = mixer("mamba2", form="chunked", chunk_size=4)
    _assert_mixes_causally_along_seq(m, torch.randn(3, 9, D_MODEL))


def test_mamba2_init_ranges_and_signs_survive_training() -> None:
    torch.manual_seed(0)
    m = Mamba2Block(64, d_state=16, headdim=8, use_reference=True)
    values = m.spec_params()
    assert m.H == 16 and m.P == 8 and m.N == 16
    A, dt_bias, D = values["A"], values["dt_bias"], values["D"]
    assert ((A >= -16) & (A <= -1)).all() and A.std() > 1  # -uniform(1, 16)
    assert torch.allclose(m.params["A"], (-A).log())  # stored as A_log
    delta = torch.nn.functional.softplus(dt_bias)
    assert ((delta >= 1e-3 - 1e-9) & (delta <= 0.1 + 1e-9)).all()
    assert (D == 1).all()
    with torch.no_grad():
        m.params["A"].add_(torch.randn(16) * 5)
    assert (m.spec_params()["A"] < 0).all()


def test_role_inits_of_the_other_examples() -> None:
    retnet = mixer("retnet", use_reference=True).spec_params()["gamma"]
    want = 1 - 2.0 ** (-5 - torch.arange(2.0))
    assert torch.allclose(retnet, want, rtol=0, atol=1e-6)
    m1 = mixer("mamba1", use_reference=True).spec_params()
    assert torch.allclose(m1["A"], -(torch.arange(4.0) + 1).expand(8, 4))  # S4D-real
    s4d = mixer("s4d", use_reference=True).spec_params()
    assert torch.allclose(s4d["A"], -(torch.arange(8.0) + 1).expand(4, 8))
    dt = s4d["log_dt"].exp()
    assert ((dt >= 1e-3 - 1e-9) & (dt <= 0.1 + 1e-9)).all()
    assert (s4d["D"] == 1).all() and (s4d["Bp"] == 1).all()


def test_mamba2_spec_is_the_example() -> None:
    assert stable_repr(parse(MAMBA2_SPEC)) == stable_repr(parse_file(ROOT / "examples/mamba2.ssm"))


def test_open_dims_are_bound_from_d_model_and_expand() -> None:
    text = MAMBA2_SPEC.replace("dim H = 80, G = 1, N = 128, P = 64", "dim H, G = 1, N = 16, P")
    checked = bind_dims(text, 32, expand=2, headdim=16)
    assert {d.name: d.value for d in checked.spec.dims} == {"H": 4, "G": 1, "N": 16, "P": 16}
    checked = bind_dims(text, 32, expand=2, dims={"H": 2})
    assert {d.name: d.value for d in checked.spec.dims}["P"] == 32
    with pytest.raises(ValueError, match="bind the dims N"):
        bind_dims(text.replace("N = 16", "N"), 32)


def test_packed_sequences_match_separate_ones() -> None:
    torch.manual_seed(0)
    m = mixer("mamba2", use_reference=True).double()
    a, b = (
        torch.randn(1, 5, D_MODEL, dtype=torch.float64),
        torch.randn(1, 4, D_MODEL, dtype=torch.float64),
    )
    cu = torch.tensor([0, 5, 9])
    packed = m(torch.cat([a, b], 1), cu_seqlens=cu)
    assert rel(packed, torch.cat([m(a), m(b)], 1)) < 1e-12


@pytest.mark.interpret
def test_forms_agree_through_the_op() -> None:
    torch.manual_seed(0)
    m = mixer("mamba2")
    u = torch.randn(2, 9, D_MODEL)
    y = m(u, form="chunked", chunk_size=4)
    assert rel(m(u, form="recurrent"), y) < 1e-5
    assert rel(m(u, form="quadratic"), y) < 1e-5


def _step_all(m: SequenceMixer, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    conv_state, ssm_state = m.allocate_inference_state(u.shape[0])
    outs = []
    for t in range(u.shape[1]):
        out, conv_state, ssm_state = m.step(u[:, t], conv_state, ssm_state)
        outs.append(out)
    return torch.stack(outs, 1), ssm_state


@pytest.mark.parametrize("ngroups", [1, 2])
def test_step_equals_forward_fp64_reference(ngroups: int) -> None:
    torch.manual_seed(ngroups)
    m = Mamba2Block(32, d_state=8, headdim=8, ngroups=ngroups, use_reference=True).double()
    u = torch.randn(2, 11, 32, dtype=torch.float64)
    y, state = m(u, return_state=True)
    stepped, stepped_state = _step_all(m, u)
    assert rel(stepped, y) < 1e-12 and rel(stepped_state, state) < 1e-12


def test_step_of_a_generic_spec_fp64_reference() -> None:
    torch.manual_seed(1)
    m = mixer("retnet", use_reference=True).double()
    u = torch.randn(2, 6, D_MODEL, dtype=torch.float64)
    stepped, _ = _step_all(m, u)
    assert rel(stepped, m(u)) < 1e-12


@pytest.mark.interpret
def test_step_equals_forward_through_the_op() -> None:
    torch.manual_seed(2)
    m = Mamba2Block(32, d_state=8, headdim=8, chunk_size=4)
    u = torch.randn(2, 6, 32)
    y, state = m(u, return_state=True)
    stepped, stepped_state = _step_all(m, u)
    assert stepped_state.dtype == torch.float32
    assert rel(stepped, y) < 1e-5 and rel(stepped_state, state) < 1e-5


def test_step_needs_state_flags() -> None:
    with pytest.raises(ValueError, match="initial_state and final_state"):
        m = mixer("toeplitz", use_reference=True)
        m.step(torch.randn(1, D_MODEL), *m.allocate_inference_state(1))


def test_mamba2_block_refuses_a_foreign_spec() -> None:
    with pytest.raises(ValueError, match="Mamba2Block needs"):
        Mamba2Block(32, spec=ROOT / "examples" / "retnet.ssm")
    assert math.isclose(Mamba2Block(32, headdim=16, use_reference=True).H, 4)


def test_composite_masks_init_each_atom_as_if_alone() -> None:
    """Each decay of a sum, of a quasiseparable mask and of a decayed window gets the init
    its atom would get alone: Mamba-2's A = −exp(A_log) with |A| ∈ [1, 16] and Δ ∈ [1e-3,
    0.1] (the sign on Δ's side: −Δ·exp(A_log)), RetNet's γ_h = 1 − 2^(−5−h)."""
    dims = {"H": 8, "N": 4, "P": 4}
    for name, decays in (("mamba2_2ss", ("A_log", "A_log_slow")), ("hydra", ("A_log", "A_log_back"))):
        m = SequenceMixer(ROOT / "examples" / f"{name}.ssm", D_MODEL, dims=dims,
                          use_reference=True)
        values = m.spec_params()
        for decay in decays:
            magnitude = values[decay].exp()
            assert ((magnitude >= 1 - 1e-5) & (magnitude <= 16 + 1e-4)).all(), (name, decay)
            assert magnitude.std() > 1, (name, decay)
        delta = torch.nn.functional.softplus(values["dt_bias"])
        assert ((delta >= 1e-3 - 1e-9) & (delta <= 0.1 + 1e-9)).all(), name
        assert "dt" not in m.conv_names, name  # the decay's input is not conv'd
    window = SequenceMixer(ROOT / "examples" / "decay_window.ssm", D_MODEL,
                           dims={"H": 4, "L": 8, "P": 4}, use_reference=True)
    gamma = torch.sigmoid(window.spec_params()["g"])
    assert torch.allclose(gamma, 1 - 2.0 ** (-5 - torch.arange(4.0)), rtol=0, atol=1e-6)


def test_step_of_a_sum_mask_equals_forward_fp64_reference() -> None:
    """Decoding a 2-semiseparable spec carries [batch, H, 2·N, P] (both terms' states)."""
    torch.manual_seed(3)
    m = mixer("mamba2_2ss", use_reference=True).double()
    u = torch.randn(2, 7, D_MODEL, dtype=torch.float64)
    y, state = m(u, return_state=True)
    assert m.allocate_inference_state(2)[1].shape == (2, 2, 16, 4) == state.shape
    stepped, stepped_state = _step_all(m, u)
    assert rel(stepped, y) < 1e-12 and rel(stepped_state, state) < 1e-12


@pytest.mark.interpret
def test_step_of_a_sum_mask_through_the_op() -> None:
    torch.manual_seed(4)
    m = mixer("mamba2_2ss", chunk_size=4)
    assert m.op is not None and m.op.fused is not None  # one op with 2·H heads
    u = torch.randn(2, 6, D_MODEL)
    y, state = m(u, return_state=True)
    stepped, stepped_state = _step_all(m, u)
    assert stepped_state.dtype == torch.float32
    assert rel(stepped, y) < 1e-5 and rel(stepped_state, state) < 1e-5
