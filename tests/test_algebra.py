"""Mask algebra: products and scales rewritten to basic masks, sums run as one op per term,
a decayed Toeplitz window; each checked, proved (and the proof able to fail), and run under
the interpreter against the fp64 reference."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
import torch

from ssmc import algebra, ir, render
from ssmc.errors import SpecError
from ssmc.load import load
from ssmc.pipeline import parse, parse_file, with_dims
from ssmc.summary import dump, summary
from ssmc.symbolic import ProofError, prove

ref = importlib.import_module("ssmc.reference")
ROOT = Path(__file__).resolve().parent.parent
COMPOSITE = ("mamba2_2ss", "hydra", "decay_window")
BASE = """ssm t
dim H = 2, N = 4, P = 4
input x  : [batch, seq, H, P]
input dt : [batch, seq, H]
input B  : [batch, seq, 1, N]
input C  : [batch, seq, 1, N]
param A  : [H]
param A2 : [H]
param c  : [H]
param D  : [H, N]
output y : [batch, seq, H, P]
MASK
query C
key   B
value x * softplus(dt)
"""
SS = "semiseparable(log_a = softplus(dt) * A)"
SS2 = "semiseparable(log_a = softplus(dt) * A2)"


def spec(mask: str, *, used: str = "", extra: str = "") -> ir.CheckedSpec:
    """BASE with `mask`; params that neither `mask` nor `used` names are dropped."""
    import re

    text = BASE.replace("MASK", mask + "\n" + extra)
    keep = set(re.findall(r"\w+", mask)) | {n.strip() for n in used.split(",")}
    lines = [ln for ln in text.splitlines()
             if not (ln.startswith("param ") and ln.split()[1] not in keep)]
    return parse("\n".join(lines) + "\n")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert not a.isnan().any()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize(("mask", "used", "kind", "decay"), [
    (f"{SS} * {SS2}", "A2", ir.ScalarSemiseparable, "(softplus(dt) * A) + (softplus(dt) * A2)"),
    (f"causal * {SS}", "", ir.ScalarSemiseparable, "softplus(dt) * A"),
    (f"{SS} * const_decay(gamma = 0.5)", "", ir.ScalarSemiseparable,
     "(softplus(dt) * A) + log(0.5)"),
    ("const_decay(gamma = 0.5) * const_decay(log_gamma = -c)", "c", ir.ConstDecay,
     "log(0.5) + (-c)"),
    (f"diagonal(log_a = -softplus(dt) * exp(D)) * {SS}", "D", ir.DiagonalSemiseparable,
     "((-softplus(dt)) * exp(D)) + (softplus(dt) * A)"),
    ("causal * quasiseparable(log_a = softplus(dt) * A, log_a_backward = dt)", "",
     ir.ScalarSemiseparable, "softplus(dt) * A"),
])
def test_products_are_rewritten_to_a_basic_mask(mask: str, used: str, kind: type,
                                                decay: str) -> None:
    checked = spec(f"mask {mask}", used=used)
    assert type(checked.spec.mask) is kind and not checked.pieces
    log = getattr(checked.spec.mask, "log_a", None) or checked.spec.mask.log_gamma
    from ssmc.expr import show

    assert show(log) == decay
    assert checked.spec.composition is not None and "written" in summary(checked)
    assert all(c.equal for c in prove(checked, T=4).checks)


def test_a_scale_goes_into_the_value_once() -> None:
    checked = spec(f"mask c * {SS}", used="c")
    from ssmc.expr import show

    assert show(checked.spec.value) == "(x * softplus(dt)) * c"
    assert any("value scaled" in line for line in checked.derivation)
    again = with_dims(checked, {"P": 2})  # re-checked: the scale is not applied twice
    assert show(again.spec.value) == "(x * softplus(dt)) * c" and again.derivation
    assert all(c.equal for c in prove(checked, T=4).checks)


@pytest.mark.parametrize(("mask", "message"), [
    (f"{SS} * toeplitz(kernel = c)", "no known structure for semiseparable"),
    ("0.5 * c", "a constant alone is not a mask"),
    (f"{SS} + quasiseparable(log_a = dt)", "a sum's terms are basic masks"),
    (f"{SS} + {SS2}", "`c` is declared but never used"),
])
def test_bad_compositions_are_located_errors(mask: str, message: str) -> None:
    with pytest.raises(SpecError) as info:
        spec(f"mask {mask}", used="c")
    text = info.value.render()
    import re

    assert message in text and re.match(r"<string>:\d+:\d+: error: ", text), text


def test_a_wrong_rewrite_is_caught_by_the_proof(monkeypatch: pytest.MonkeyPatch) -> None:
    """semiseparable(a) ∘ semiseparable(b) rewritten with a − b instead of a + b fails."""
    from ssmc import expr as E

    def wrong(a: E.Expr, b: E.Expr, span: object) -> E.Expr:
        return E.BinOp(op=E.Op.SUB, lhs=a, rhs=b)

    monkeypatch.setattr(algebra, "_add", wrong)
    checked = spec(f"mask {SS} * {SS2}", used="A2")
    with pytest.raises(ProofError, match="differs"):
        prove(checked, T=4)


def test_a_wrong_sum_is_caught_by_the_proof() -> None:
    """A sum whose second piece lost its scale c does not prove."""
    checked = spec(f"mask {SS} + c * {SS2}", used="c, A2")
    first, second = checked.pieces
    unscaled = dataclasses.replace(second, spec=dataclasses.replace(
        second.spec, value=first.spec.value))
    with pytest.raises(ProofError):
        prove(dataclasses.replace(checked, pieces=(first, unscaled)), T=4)


def test_sum_pieces_states_and_derivation() -> None:
    checked = spec(f"mask {SS} + c * {SS2}", used="c, A2", extra="final_state\ninitial_state")
    assert isinstance(checked.spec.mask, ir.MaskSum) and len(checked.pieces) == 2
    assert [p.spec.name for p in checked.pieces] == ["t_term0", "t_term1"]
    assert {t.name for t in checked.pieces[0].spec.tensors} == {"x", "dt", "B", "C", "A"}
    assert "2·N=4" in summary(checked) and "piece    t_term1" in dump(checked)
    with pytest.raises(Exception, match="composite mask"):
        render.render_module(checked)
    inputs = ref.random_inputs(checked, batch=1, seqlen=3)
    assert inputs["initial_state"].shape == (1, 2, 8, 4)


@pytest.mark.interpret
def test_sum_state_carries_across_calls(gen) -> None:  # type: ignore[no-untyped-def]
    """Running the first half, then the second from its final state, equals one run."""
    checked = spec(f"mask {SS} + c * {SS2}", used="c, A2", extra="final_state\ninitial_state")
    op = load(checked)
    inputs = ref.random_inputs(checked, batch=2, seqlen=12, generator=gen)
    init = inputs.pop("initial_state").float()
    t = {k: v.float() for k, v in inputs.items()}
    y, state = op(**t, initial_state=init)
    want, want_state = ref.reference(checked)(**inputs, initial_state=init.double())
    assert rel(y, want) <= 1e-5 and rel(state, want_state) <= 1e-5
    first = {k: v[:, :5] if v.dim() > 2 else v for k, v in t.items()}
    rest = {k: v[:, 5:] if v.dim() > 2 else v for k, v in t.items()}
    y1, s1 = op(**first, initial_state=init, form="recurrent")
    y2, s2 = op(**rest, initial_state=s1, form="chunked")
    assert rel(torch.cat([y1, y2], 1), want) <= 1e-5 and rel(s2, want_state) <= 1e-5
    with pytest.raises(Exception, match="stacked along N"):
        op(**t, initial_state=init[:, :, :4])


@pytest.mark.parametrize("name", COMPOSITE)
def test_composite_examples_render_their_pieces(name: str) -> None:
    checked = parse_file(ROOT / "examples" / f"{name}.ssm")
    assert checked.pieces and checked.spec.composition is not None
    for piece in checked.pieces:
        assert not piece.pieces and piece.spec.skip is None and piece.spec.gate is None
        compile(render.render_module(piece), piece.spec.name, "exec")


def test_decayed_window_taps_piece() -> None:
    checked = parse_file(ROOT / "examples" / "decay_window.ssm")
    (piece,) = checked.pieces
    taps = piece.spec.tensors[-1]
    assert taps.name == "taps" and taps.shape == ("H", "L")
    assert isinstance(checked.spec.mask, ir.Toeplitz)
    assert checked.spec.mask.kernel.log_decay is not None  # type: ignore[union-attr]
    assert [f.value for f in checked.forms] == ["quadratic", "convolution"]


@pytest.mark.interpret
def test_sequence_mixer_runs_a_sum_mask(gen) -> None:  # type: ignore[no-untyped-def]
    """ssmc.nn.SequenceMixer takes a composite spec: forward and backward run."""
    from ssmc.nn import SequenceMixer

    mixer = SequenceMixer(ROOT / "examples" / "mamba2_2ss.ssm", 16, headdim=4,
                          dims={"H": 2, "N": 4, "P": 4})
    u = torch.randn(1, 6, 16, generator=gen)
    out = mixer(u)
    out.square().sum().backward()
    assert out.shape == u.shape and torch.isfinite(out).all()
    assert all(p.grad is not None for p in mixer.parameters() if p.requires_grad)


@pytest.mark.interpret
def test_sum_with_packed_sequences(gen) -> None:  # type: ignore[no-untyped-def]
    """varlen: each term resets at the boundaries; states are [num_seqs, H, 2·N, P]."""
    checked = spec(f"mask {SS} + {SS2}", extra="varlen\ninitial_state\nfinal_state")
    op = load(checked)
    lengths = [5, 1, 7]
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    inputs = ref.random_inputs(checked, batch=1, seqlen=sum(lengths), generator=gen)
    inputs.pop("initial_state")
    init = torch.randn(len(lengths), 2, 8, 4, generator=gen, dtype=torch.float64)
    want, want_state = ref.reference(checked)(**inputs, initial_state=init, cu_seqlens=cu)
    y, state = op(**{k: v.float() for k, v in inputs.items()}, initial_state=init.float(),
                  cu_seqlens=cu)
    assert state.shape == (3, 2, 8, 4)
    assert rel(y, want) <= 1e-5 and rel(state, want_state) <= 1e-5
