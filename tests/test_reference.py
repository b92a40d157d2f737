"""The reference of every example spec: forms agree, roles evaluate as written, gradients flow."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ssmc import forms_torch
from ssmc.bind import bind
from ssmc.errors import TensorError
from ssmc.ir import Discretization, Form, Hippo
from ssmc.lti import discretize, hippo
from ssmc.pipeline import parse, parse_file, with_dims
from ssmc.reference import canonical_roles, random_inputs, reference

F64 = torch.float64
TOL = 1e-10
EXAMPLES = sorted(Path(__file__).parent.parent.glob("examples/*.ssm"))
SMALL = {"H": 4, "N": 8, "P": 4, "L": 12}


def rel(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def example(name: str, small: bool = True):
    checked = parse_file(Path(__file__).parent.parent / "examples" / f"{name}.ssm")
    declared = {d.name for d in checked.spec.dims}
    return (
        with_dims(checked, {k: v for k, v in SMALL.items() if k in declared}) if small else checked
    )


def inputs(checked, gen, *, batch: int = 2, seqlen: int = 33, **kw) -> dict[str, Tensor]:
    return random_inputs(checked, batch=batch, seqlen=seqlen, generator=gen, **kw)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
@pytest.mark.parametrize("seqlen", [1, 7, 33])
def test_forms_agree_on_examples(gen, path: Path, seqlen: int) -> None:
    """Every allowed form of every example gives the same y and final state (chunk 16)."""
    checked = parse_file(path)
    declared = {d.name for d in checked.spec.dims}
    checked = with_dims(checked, {k: v for k, v in SMALL.items() if k in declared})
    given = inputs(checked, gen, seqlen=seqlen)
    results = {f: reference(checked, f, chunk_size=16)(**given) for f in checked.forms}
    y0, state0 = results[checked.forms[0]]
    assert y0.shape[:2] == (2, seqlen) and torch.isfinite(y0).all()
    assert (state0 is not None) == checked.spec.final_state
    for form, (y, state) in results.items():
        assert rel(y, y0) < TOL, form
        if state0 is not None:
            assert rel(state, state0) < TOL, form


@pytest.mark.parametrize("name", ["mamba2", "mamba1", "toeplitz", "s4d"])
def test_examples_at_declared_sizes(gen, name: str) -> None:
    checked = example(name, small=False)
    given = inputs(checked, gen, batch=1, seqlen=20)
    forms = [reference(checked, f, chunk_size=8)(**given) for f in checked.forms]
    for y, _ in forms[1:]:
        assert rel(y, forms[0][0]) < TOL


def naive_ssm(x, log_a, B, C, H, h0):
    """The recurrent core on canonical tensors (forms_torch's own tests check it by loops)."""
    return forms_torch.recurrent(x, log_a, B, C, H, h0)


def test_mamba2_roles_as_written(gen) -> None:
    """Δ = softplus(dt + dt_bias), log a = Δ A, X̄ = Δ x, y = (core + D x) · silu(z)."""
    checked = example("mamba2")
    t = inputs(checked, gen)
    y, state = reference(checked)(**t)
    delta = F.softplus(t["dt"] + t["dt_bias"])
    core_y, core_state = naive_ssm(
        t["x"] * delta[..., None], delta * t["A"], t["B"], t["C"], 4, t["initial_state"]
    )
    expected = (core_y + t["D"][:, None] * t["x"]) * F.silu(t["z"])
    assert rel(y, expected) < TOL and rel(state, core_state) < TOL


def test_mamba1_roles_as_written(gen) -> None:
    """Literal-1 axes: x [b, T, H, 1], B [b, T, 1, N]; log a = Δ A per (head, n)."""
    checked = example("mamba1")
    t = inputs(checked, gen)
    y, _ = reference(checked)(**t)
    delta = F.softplus(t["dt"] + t["dt_bias"])
    log_a = delta[..., None] * t["A"]
    core_y, _ = naive_ssm(t["x"] * delta[..., None], log_a, t["B"], t["C"], 4, t["initial_state"])
    expected = (core_y + t["D"][:, None] * t["x"]) * F.silu(t["z"])
    assert y.shape == t["x"].shape and rel(y, expected) < TOL


def test_retnet_and_gla_roles_as_written(gen) -> None:
    for name in ("retnet", "gla"):
        checked = example(name)
        t = inputs(checked, gen)
        y, state = reference(checked)(**t)
        if name == "retnet":
            log_a = torch.log(t["gamma"]).expand(2, 33, 4)
        else:
            log_a = F.logsigmoid(t["g"]) / 16
        core_y, core_state = naive_ssm(t["v"], log_a, t["k"], t["q"] * 0.125, 4, t["initial_state"])
        assert rel(y, core_y) < TOL and rel(state, core_state) < TOL, name


def simulate_lti(Abar: Tensor, Bbar: Tensor, C: Tensor, x: Tensor) -> Tensor:
    """h_t = Ā h_{t-1} + B̄ x_t, y_t = C h_t; Ā [H, N, N], x [b, T, H] → y [b, T, H]."""
    h = torch.zeros(x.shape[0], *Bbar.shape, dtype=F64)
    ys = []
    for t in range(x.shape[1]):
        h = torch.einsum("hnk,bhk->bhn", Abar, h) + Bbar * x[:, t, :, None]
        ys.append((C * h).sum(-1))
    return torch.stack(ys, dim=1)


@pytest.mark.parametrize("name", ["s4d", "lssl_hippo"])
def test_lti_examples_equal_their_recurrence(gen, name: str) -> None:
    checked = example(name)
    t = inputs(checked, gen, seqlen=20)
    dt = torch.exp(t["log_dt"])
    if name == "s4d":
        Abar, Bbar = discretize(t["A"], t["Bp"], dt, Discretization.ZOH)
        Abar = torch.diag_embed(Abar)
    else:
        A, B = hippo(Hippo.LEGS, 8)
        Abar, Bbar = discretize(A.expand(4, 8, 8), B.expand(4, 8), dt, Discretization.BILINEAR)
    x = t["x"][..., 0]
    expected = simulate_lti(Abar, Bbar, t["Cp"], x)
    if name == "s4d":
        expected = expected + t["D"] * x
    for form in checked.forms:
        y, state = reference(checked, form)(**t)
        assert state is None and rel(y[..., 0], expected) < TOL, form


def test_learned_toeplitz_as_written(gen) -> None:
    """y_i = Σ_{j ≤ i, i − j < L} K[h, i − j] x_j with L = 12 < T = 20."""
    checked = example("toeplitz")
    t = inputs(checked, gen, seqlen=20)
    K, x = t["K"], t["x"]
    expected = torch.zeros_like(x)
    for i in range(20):
        for j in range(max(0, i - 11), i + 1):
            expected[:, i] += K[:, i - j, None] * x[:, j]
    for form in checked.forms:
        assert rel(reference(checked, form)(**t)[0], expected) < TOL, form


@pytest.mark.parametrize("name", ["mamba2", "gla"])
def test_varlen_equals_separate_sequences(gen, name: str) -> None:
    """3 packed sequences of uneven lengths = 3 separate calls, in every form."""
    checked = example(name)
    offsets = [0, 5, 22, 30]
    t = inputs(checked, gen, batch=1, seqlen=30)
    t["initial_state"] = torch.randn(3, *t["initial_state"].shape[1:], dtype=F64, generator=gen)
    cu = torch.tensor(offsets, dtype=torch.int64)
    per_token = {d.name for d in checked.spec.tensors if d.kind.value == "input"}
    for form in checked.forms:
        run = reference(checked, form, chunk_size=8)
        y, state = run(**t, cu_seqlens=cu)
        for s, (lo, hi) in enumerate(zip(offsets[:-1], offsets[1:], strict=True)):
            part = {k: v[:, lo:hi] if k in per_token else v for k, v in t.items()}
            part["initial_state"] = t["initial_state"][s : s + 1]
            y_s, state_s = run(**part)
            assert rel(y[:, lo:hi], y_s) < TOL and rel(state[s : s + 1], state_s) < TOL, form


def test_default_form_and_errors() -> None:
    gla, toeplitz = example("gla"), example("toeplitz")
    with pytest.raises(
        ValueError, match="quadratic is not allowed for gla; it allows recurrent, chunked"
    ):
        reference(gla, "quadratic")
    with pytest.raises(ValueError, match="unknown form 'banana'"):
        reference(gla, "banana")
    with pytest.raises(ValueError, match="allows quadratic, convolution"):
        reference(toeplitz, Form.CHUNKED)


def test_bad_tensor_raises_tensor_error(gen) -> None:
    checked = example("mamba2")
    t = inputs(checked, gen)
    t["B"] = t["B"][:, :, :, :3]
    with pytest.raises(TensorError, match=r"B: expected shape \[batch, seq, G=1, N=8\]"):
        reference(checked)(**t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_low_precision_inputs(gen, dtype: torch.dtype) -> None:
    checked = example("mamba2")
    t64 = inputs(checked, gen)
    y64, s64 = reference(checked)(**t64)
    t = {k: v.to(dtype) if k != "initial_state" else v.float() for k, v in t64.items()}
    y, s = reference(checked)(**t)
    assert y.dtype == dtype and s.dtype == torch.float32
    bound = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(y.double(), y64) < bound and rel(s.double(), s64) < bound


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_random_inputs_are_realistic(gen, path: Path) -> None:
    checked = parse_file(path)
    declared = {d.name for d in checked.spec.dims}
    checked = with_dims(checked, {k: v for k, v in SMALL.items() if k in declared})
    t = inputs(checked, gen, seqlen=40)
    assert ("initial_state" in t) == checked.spec.initial_state
    state = t.pop("initial_state", None)
    dims = bind(checked, t, initial_state=state)
    assert all((v != 0).all() for v in t.values())
    roles = canonical_roles(checked, t, dims)
    if roles.log_a is not None:
        lo, hi = (math.log(0.8), math.log(0.99)) if "gamma" in t else (-1.0, -0.01)
        assert lo <= roles.log_a.min() and roles.log_a.max() <= hi
    if "log_dt" in t:
        dt = torch.exp(t["log_dt"])
        assert 0.001 <= dt.min() and dt.max() <= 0.1
    if "A" in t and roles.log_a is None and roles.kernel is not None:
        assert -4 <= t["A"].min() and t["A"].max() <= -0.5


def test_random_inputs_dims() -> None:
    checked = parse("""
ssm open_dims
dim H = 2, N = 4, P
input x : [batch, seq, H, P]
input B : [batch, seq, 1, N]
input C : [batch, seq, 1, N]
output y : [batch, seq, H, P]
mask causal
query C
key B
value x
""")
    with pytest.raises(ValueError, match="dims needed: P"):
        random_inputs(checked, batch=1, seqlen=4)
    with pytest.raises(ValueError, match=r"conflicting: H=3 \(the spec says 2\)"):
        random_inputs(checked, batch=1, seqlen=4, dims={"H": 3, "P": 2})
    t = random_inputs(checked, batch=1, seqlen=4, dims={"P": 5})
    assert t["x"].shape == (1, 4, 2, 5) and t["B"].shape == (1, 4, 1, 4)


MAMBA2_SMALL = """
ssm mamba2_small
dim H = 2, G = 1, N = 2, P = 2
input x  : [batch, seq, H, P]
input dt : [batch, seq, H]
input B  : [batch, seq, G, N]
input C  : [batch, seq, G, N]
input z  : [batch, seq, H, P]
param A       : [H]
param dt_bias : [H]
param D       : [H]
output y : [batch, seq, H, P]
let delta = clamp(softplus(dt + dt_bias), 0.0, inf)
mask semiseparable(log_a = delta * A)
query C
key   B
value x * delta
skip  D * x
gate  silu(z)
initial_state
final_state
"""


@pytest.mark.parametrize("form", ["chunked", "quadratic", "recurrent"])
def test_gradcheck_mamba2(gen, form: str) -> None:
    """Gradients reach x, dt, A, B, C, D, z, dt_bias and the initial state."""
    checked = parse(MAMBA2_SMALL)
    t = random_inputs(checked, batch=1, seqlen=5, generator=gen)
    names = list(t)
    run = reference(checked, form, chunk_size=2)

    def f(*values: Tensor):
        return run(**dict(zip(names, values, strict=True)))

    assert torch.autograd.gradcheck(f, tuple(v.requires_grad_() for v in t.values()))


@pytest.mark.parametrize("name", ["s4d", "toeplitz"])
@pytest.mark.parametrize("form", ["quadratic", "convolution"])
def test_gradcheck_toeplitz(gen, name: str, form: str) -> None:
    checked = with_dims(
        example(name, small=False),
        {"H": 2, "N": 3, "P": 1} if name == "s4d" else {"H": 2, "P": 2, "L": 4},
    )
    t = random_inputs(checked, batch=1, seqlen=6, generator=gen)
    names = list(t)
    run = reference(checked, form)

    def f(*values: Tensor):
        return run(**dict(zip(names, values, strict=True)))[0]

    assert torch.autograd.gradcheck(f, tuple(v.requires_grad_() for v in t.values()))
