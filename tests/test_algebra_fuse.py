"""A sum of masks over one query, key and value runs as ONE op with K·H heads
(ssmc.algebra_fuse): the lowering, its proof, and the op (outputs, states and every
gradient, NaN-poisoned buffers) against the fp64 reference under the interpreter."""

from __future__ import annotations

import importlib
import math
import types
from pathlib import Path

import pytest
import torch

from ssmc import algebra_fuse, ir
from ssmc import expr as E
from ssmc.load import load
from ssmc.pipeline import parse, parse_file, with_dims
from ssmc.summary import summary
from ssmc.symbolic import ProofError, prove
from ssmc.symbolic_numeric import numeric_check

ref = importlib.import_module("ssmc.reference")
ROOT = Path(__file__).resolve().parent.parent
SMALL = {"H": 2, "G": 1, "N": 4, "P": 4}
THREE = """ssm three
dim H = 4, G = 2, N = 4, P = 4
input x  : [batch, seq, G, P]
input dt : [batch, seq, H]
input B  : [batch, seq, 1, N]
input C  : [batch, seq, H, N]
param A  : [H]
param c  : [H]
output y : [batch, seq, H, P]
mask causal + const_decay(log_gamma = -exp(c)) + semiseparable(log_a = softplus(dt) * A)
query C
key   B
value x
initial_state
final_state
"""
"""Three terms of three kinds; x has G = 2 value groups, C a query per head, B one group."""


def mamba2_2ss() -> ir.CheckedSpec:
    return with_dims(parse_file(ROOT / "examples" / "mamba2_2ss.ssm"), SMALL)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and not a.isnan().any(), "every element is written"
    scale = b.double().norm().item()
    diff = (a.double() - b.double()).norm().item()
    return diff / scale if scale > 0 else diff


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


def test_the_fused_spec_has_k_times_h_heads_sharing_x_b_c() -> None:
    checked = mamba2_2ss()
    fused = algebra_fuse.fused_checked(checked)
    assert fused is not None and fused.spec.name == "mamba2_2ss_sum"
    assert fused.heads.output == "H2" and fused.spec.dim("H2").value == 4
    assert (fused.heads.query, fused.heads.key, fused.heads.value) == ("G", "G", "H")
    assert [t.name for t in fused.spec.tensors] == ["x", "dt", "B", "C", "dt_bias", "log_a"]
    assert isinstance(fused.spec.mask, ir.ScalarSemiseparable)
    assert fused.spec.skip is None and fused.spec.gate is None
    assert fused.forms == checked.forms
    text = summary(checked)
    assert "one op `mamba2_2ss_sum` with H2 = 2·H heads" in text, text
    three = algebra_fuse.fused_checked(parse(THREE))
    assert three is not None and three.heads.output == "H3"
    assert (three.heads.query, three.heads.key, three.heads.value) == ("H", 1, "G")


OTHER = """ssm other
dim H = 2, N = 4, P = 4
input x  : [batch, seq, H, P]
input dt : [batch, seq, H]
input B  : [batch, seq, 1, N]
input C  : [batch, seq, 1, N]
param A  : [H]
param PARAM
output y : [batch, seq, H, P]
mask MASK
query C
key   B
value x
"""


def scaled(flags: str = "final_state", mask: str = "") -> ir.CheckedSpec:
    """c · A + B (the terms' values differ) with `flags`."""
    mask = mask or "c * semiseparable(log_a = softplus(dt) * A) + semiseparable(log_a = -dt * dt)"
    text = OTHER.replace("MASK", mask).replace("PARAM", "c : [H]")
    return parse(text.replace("value x\n", f"value x\n{flags}\n"))


def test_scaled_terms() -> None:
    """Different scales weight the op's heads (no initial state), or keep one op per term
    (with one: a carried state would be divided by c); a shared scale goes into the value."""
    apart = scaled("initial_state\nfinal_state")
    assert len(apart.pieces) == 2 and algebra_fuse.fused_checked(apart) is None
    assert not any("one op" in line for line in apart.derivation)
    assert len(load(apart).pieces) == 2
    weighted = scaled()
    assert algebra_fuse.fused_checked(weighted) is not None and algebra_fuse.weighted(weighted)
    shared = scaled("initial_state\nfinal_state", "c * (semiseparable(log_a = softplus(dt) * A)"
                    " + semiseparable(log_a = -dt * dt))")
    fused = algebra_fuse.fused_checked(shared)
    assert fused is not None and not algebra_fuse.weighted(shared)
    assert E.show(fused.spec.value) == "x * c"


def diagonal() -> ir.CheckedSpec:
    """A diagonal (GLA/Mamba-1-like) term plus a scalar one: la [batch, seq, 2·H, N]."""
    mask = "diagonal(log_a = -softplus(dt) * exp(D)) + semiseparable(log_a = softplus(dt) * A)"
    text = OTHER.replace("MASK", mask).replace("PARAM", "D : [H, N]")
    return parse(text.replace("value x\n", "value x\ninitial_state\nfinal_state\n"))


def test_a_diagonal_term_fuses_with_a_per_state_dim_decay() -> None:
    fused = algebra_fuse.fused_checked(diagonal())
    assert fused is not None and isinstance(fused.spec.mask, ir.DiagonalSemiseparable)
    assert fused.spec.tensors[-1].shape == ("batch", "seq", "H2", "N")


def test_state_and_output_layouts_are_the_sums() -> None:
    """Fused head h·K + p is term p of head h: its state is rows p·N … of head h."""
    K, H, N, P = 3, 2, 4, 5
    stacked = torch.randn(2, H, K * N, P)
    fused = algebra_fuse.state_in(stacked, K)
    for h in range(H):
        for p in range(K):
            assert torch.equal(fused[:, h * K + p], stacked[:, h, p * N:(p + 1) * N])
    assert torch.equal(algebra_fuse.state_out(fused, K), stacked)
    y = torch.randn(2, 3, K * H, P)
    want = torch.stack([sum(y[:, :, h * K + p] for p in range(K)) for h in range(H)], 2)
    assert torch.allclose(algebra_fuse.output_sum(y, K), want)


def by_name(spec: str) -> ir.CheckedSpec:
    return {"mamba2_2ss": mamba2_2ss, "three": lambda: parse(THREE), "diagonal": diagonal,
            "weighted": scaled, "shared": lambda: scaled(
                "initial_state\nfinal_state", "c * (semiseparable(log_a = softplus(dt) * A)"
                " + semiseparable(log_a = -dt * dt))")}[spec]()


@pytest.mark.parametrize("spec", ["mamba2_2ss", "three", "diagonal", "weighted", "shared"])
def test_the_fused_lowering_is_proved(spec: str) -> None:
    checked = by_name(spec)
    proof = prove(checked, T=4)
    assert all(c.equal for c in proof.checks)
    assert any("one op" in c.quantity for c in proof.checks)


def test_a_wrong_head_order_fails_the_proof(monkeypatch: pytest.MonkeyPatch) -> None:
    """Term p's decay in column p·H + h (the output still adds heads h·K … h·K + K − 1)."""

    def wrong(cols: list[torch.Tensor]) -> torch.Tensor:
        b, T, H = cols[0].shape
        return torch.stack(cols, dim=2).reshape(b, T, H * len(cols))

    monkeypatch.setattr(algebra_fuse, "interleave", wrong)
    with pytest.raises(ProofError, match="one op"):
        prove(parse(THREE), T=4)
    with pytest.raises(ProofError, match=r"y \(one op, K·H heads\) off by"):
        numeric_check(mamba2_2ss(), T=5, seed=0, tol=1e-9)


@pytest.mark.parametrize("spec", ["three", "weighted"])
def test_the_fused_lowering_agrees_numerically(spec: str) -> None:
    """fp64: the one op run by its own reference, and the per-term ops, against the sum."""
    found = numeric_check(by_name(spec), T=5, seed=1, tol=1e-10)
    assert {a.quantity for a in found} >= {"y (one op, K·H heads)",
                                           "final_state (one op, K·H heads)", "y (composite)"}


def test_explain_plans_the_one_op(capsys: pytest.CaptureFixture[str]) -> None:
    from ssmc.cli import main

    assert main(["explain", str(ROOT / "examples" / "mamba2_2ss.ssm"), "--seqlen", "256"]) == 0
    out = capsys.readouterr().out
    assert "one op `mamba2_2ss_sum` with H2 = 2·H heads" in out
    assert "mamba2_2ss_sum on H100" in out and "planned as one spec" in out


@pytest.mark.interpret
@pytest.mark.parametrize(("spec", "form", "T"), [
    ("mamba2_2ss", "recurrent", 9), ("mamba2_2ss", "quadratic", 9),
    ("mamba2_2ss", "chunked", 17), ("mamba2_2ss", None, 1), ("three", "chunked", 17),
    ("three", "recurrent", 5), ("diagonal", "chunked", 17), ("diagonal", "recurrent", 6),
    ("weighted", "chunked", 17), ("shared", "chunked", 17),
])
def test_fused_op_and_gradients_match_the_reference(spec: str, form: str | None, T: int,
                                                    monkeypatch: pytest.MonkeyPatch, gen) -> None:  # type: ignore[no-untyped-def]
    """Outputs, final states and the gradient of every input, state and param (fp64 bound)."""
    checked = by_name(spec)
    op = load(checked)
    assert op.fused is not None and len(op.pieces) == 1
    monkeypatch.setattr(op.module, "torch", PoisonTorch())
    t = ref.random_inputs(checked, batch=2, seqlen=T, generator=gen)
    want_leaves = {k: v.clone().requires_grad_() for k, v in t.items()}
    init64 = want_leaves.pop("initial_state", None)
    want, want_state = ref.reference(checked)(**want_leaves, initial_state=init64)
    leaves = {k: v.float().requires_grad_() for k, v in t.items()}
    init = leaves.pop("initial_state", None)
    Q = 16 if spec == "diagonal" else 8  # the diagonal chunked kernels take Q ≥ 16
    y, state = op(**leaves, initial_state=init, form=form,
                  chunk_size=Q if form == "chunked" else None)
    assert state is not None and state.shape == want_state.shape
    assert rel(y, want) <= 1e-5 and rel(state, want_state) <= 1e-5
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    ds = torch.randn(state.shape, generator=gen, dtype=torch.float64)
    ((want * dy).sum() + (want_state * ds).sum()).backward()
    ((y * dy.float()).sum() + (state * ds.float()).sum()).backward()
    if init is not None:
        want_leaves["initial_state"], leaves["initial_state"] = init64, init
    for name, leaf in leaves.items():
        assert leaf.grad is not None, name
        assert rel(leaf.grad, want_leaves[name].grad) <= 1e-4, (name, rel(leaf.grad, want_leaves[name].grad))


@pytest.mark.interpret
def test_fused_and_per_term_paths_agree_with_packed_sequences(gen) -> None:  # type: ignore[no-untyped-def]
    from ssmc.algebra_ops import CompositeOp

    text = (ROOT / "examples" / "mamba2_2ss.ssm").read_text() + "\nvarlen\n"
    checked = with_dims(parse(text), SMALL)
    fused, apart = load(checked), CompositeOp(checked, fuse=False)
    assert fused.fused is not None and apart.fused is None and len(apart.pieces) == 2
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    t = ref.random_inputs(checked, batch=1, seqlen=13, generator=gen)
    t.pop("initial_state")
    init = torch.randn(3, 2, 8, 4, generator=gen, dtype=torch.float64)
    want, want_state = ref.reference(checked)(**t, initial_state=init, cu_seqlens=cu)
    f32 = {k: v.float() for k, v in t.items()}
    for op in (fused, apart):
        y, state = op(**f32, initial_state=init.float(), cu_seqlens=cu)
        assert rel(y, want) <= 1e-5 and rel(state, want_state) <= 1e-5


@pytest.mark.interpret
def test_heads_bound_at_call_time(gen) -> None:  # type: ignore[no-untyped-def]
    """`dim H` open: the op's K·H head dim is bound from the decay input it is handed."""
    text = (ROOT / "examples" / "mamba2_2ss.ssm").read_text().replace(
        "dim H = 8, G = 1, N = 64, P = 64", "dim H, G = 1, N = 4, P = 4")
    checked = parse(text)
    op = load(checked)
    assert op.fused is not None and op.fused.spec.dim("H2").value is None
    t = ref.random_inputs(checked, batch=2, seqlen=9, dims={"H": 3}, generator=gen)
    init = t.pop("initial_state")
    want, want_state = ref.reference(checked)(**t, initial_state=init)
    y, state = op(**{k: v.float() for k, v in t.items()}, initial_state=init.float())
    assert rel(y, want) <= 1e-5 and rel(state, want_state) <= 1e-5
