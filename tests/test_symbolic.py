"""The SymPy proof: every form of every structure and head pattern equals M·x, and a wrong
expansion is caught."""

from __future__ import annotations

import importlib
import re
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import sympy

from ssmc import ir, symbolic, symbolic_numeric
from ssmc.errors import SsmcError
from ssmc.expr import Num, Ref
from ssmc.ir import Form
from ssmc.symbolic import ProofError, mixing_matrix, problem_sizes, prove

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.ssm"))

SMA = (Form.RECURRENT, Form.QUADRATIC, Form.CHUNKED)
MASKS: dict[str, tuple[ir.Mask, tuple[Form, ...]]] = {
    "causal": (ir.Causal(), SMA),
    "const_decay": (ir.ConstDecay(log_gamma=Ref(name="log_gamma")), SMA),
    "scalar_ss": (ir.ScalarSemiseparable(log_a=Ref(name="log_a")), SMA),
    "diagonal": (ir.DiagonalSemiseparable(log_a=Ref(name="log_a")), SMA[::2]),
}
TOEPLITZ: dict[str, ir.Toeplitz] = {
    "toeplitz_learned": ir.Toeplitz(kernel=ir.LearnedKernel(kernel=Ref(name="K"))),
    "lti_diagonal": ir.Toeplitz(
        kernel=ir.LtiKernel(
            A=Ref(name="A"),
            B=Ref(name="Bp"),
            C=Ref(name="Cp"),
            dt=Num(value=0.5),
            hippo=None,
            discretization=ir.Discretization.ZOH,
        )
    ),
    "lti_hippo": ir.Toeplitz(
        kernel=ir.LtiKernel(
            A=None,
            B=None,
            C=Ref(name="Cp"),
            dt=Num(value=0.5),
            hippo=ir.Hippo.LEGS,
            discretization=ir.Discretization.BILINEAR,
        )
    ),
}
# Head count of (query C, key B, value x) per pattern; "G" has fewer heads than H.
PATTERNS = {
    "MHA": ("H", "H", "H"),
    "MQA": ("H", "G", "G"),
    "MKA": ("G", "H", "G"),
    "MVA": ("G", "G", "H"),
}


def checked(
    mask: ir.Mask,
    forms: tuple[Form, ...],
    pattern: str = "MHA",
    *,
    decay: ir.Size | None = "H",
    window: int = 64,
    P: ir.Size = "P",
) -> ir.CheckedSpec:
    """A CheckedSpec built by hand, as `check` would return it (tensors: only what proofs read)."""
    q, k, v = PATTERNS[pattern]
    toeplitz = isinstance(mask, ir.Toeplitz)
    dims = tuple(
        ir.Dim(name=n, value=val)
        for n, val in (("H", 8), ("G", 2), ("N", 16), ("P", 4), ("L", window))
    )
    tensors = (
        ir.Tensor(name="K", kind=ir.TensorKind.PARAM, shape=("H", "L")),
        ir.Tensor(name="A", kind=ir.TensorKind.PARAM, shape=("H", "N")),
    )
    spec = ir.Spec(
        name=f"hand_{type(mask).__name__}_{pattern}",
        dims=dims,
        tensors=tensors,
        output=ir.Output(name="y", shape=("batch", "seq", "H", P)),
        mask=mask,
        query=None if toeplitz else Ref(name="C"),
        key=None if toeplitz else Ref(name="B"),
        value=Ref(name="x"),
    )
    heads = ir.HeadCounts(
        output="H",
        query=None if toeplitz else q,
        key=None if toeplitz else k,
        value=v,
        decay=None if isinstance(mask, ir.Causal) else decay,
    )
    return ir.CheckedSpec(
        spec=spec,
        forms=forms,
        heads=heads,
        pattern=ir.HeadPattern[pattern] if not toeplitz else ir.HeadPattern.MHA,
        state_size=None if toeplitz else "N",
        head_dim=P,
        value_factors=None,
    )


def assert_proved(proof: symbolic.Proof, forms: tuple[Form, ...]) -> None:
    assert proof.checks and all(c.equal for c in proof.checks)
    assert set(forms) <= {c.form for c in proof.checks}


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("structure", MASKS)
def test_every_form_of_every_structure_and_pattern(structure: str, pattern: str) -> None:
    mask, forms = MASKS[structure]
    proof = prove(checked(mask, forms, pattern))
    assert_proved(proof, forms)
    chunked = {(c.chunk_size, c.quantity) for c in proof.checks if c.form is Form.CHUNKED}
    assert chunked == {(Q, q) for Q in (2, 3) for q in ("y", "y_initial_state", "final_state")}
    assert {c.quantity for c in proof.checks if c.form is Form.RECURRENT} == {"y", "final_state"}


# A Toeplitz mask has no C or B: only whether x has H heads or fewer (MHA/MVA vs MQA/MKA).
@pytest.mark.parametrize("pattern", ["MHA", "MQA"])
@pytest.mark.parametrize("structure", TOEPLITZ)
def test_every_form_of_toeplitz_masks(structure: str, pattern: str) -> None:
    forms = (Form.QUADRATIC, Form.CONVOLUTION)
    proof = prove(checked(TOEPLITZ[structure], forms, pattern))
    assert_proved(proof, forms)
    # An LTI kernel K_k = C Ā^k B̄ is also proved to be what the recurrence computes.
    assert (Form.RECURRENT in {c.form for c in proof.checks}) == structure.startswith("lti")


@pytest.mark.parametrize("structure", [*MASKS, *TOEPLITZ])
def test_groups_of_two_among_four_heads(structure: str) -> None:
    mask, forms = MASKS.get(structure) or (TOEPLITZ[structure], (Form.QUADRATIC, Form.CONVOLUTION))
    spec = checked(mask, forms, "MVA", decay="G")
    sizes = problem_sizes(spec, 6, heads=4)
    assert (sizes.H, sizes.value, sizes.decay) == (4, 4, 1 if structure == "causal" else 2)
    assert_proved(prove(spec, T=5, chunk_sizes=(2,), heads=4), forms)


@pytest.mark.parametrize("T", [1, 7])
def test_lengths_that_are_not_a_multiple_of_the_chunk(T: int) -> None:
    mask, forms = MASKS["diagonal"]
    proof = prove(checked(mask, forms, "MVA"), T=T, chunk_sizes=(1, 3, 4, 8))
    assert_proved(proof, forms)
    assert {c.chunk_size for c in proof.checks} == {None, 1, 3, 4, 8}


def test_sizes_follow_the_spec() -> None:
    mask, forms = MASKS["scalar_ss"]
    assert problem_sizes(checked(mask, forms, "MQA")) == symbolic.Sizes(
        T=6, N=2, P=2, H=2, query=2, key=1, value=1, decay=2
    )
    assert problem_sizes(checked(mask, forms, "MHA", P=1, decay=1)).P == 1
    assert problem_sizes(checked(mask, forms, "MHA", P=1, decay=1)).decay == 1


def test_a_short_learned_window_zeroes_the_band() -> None:
    spec = checked(TOEPLITZ["toeplitz_learned"], (Form.QUADRATIC, Form.CONVOLUTION), window=3)
    M = mixing_matrix(spec, 6)
    assert all(M[i, j] == 0 for i in range(6) for j in range(6) if i - j >= 3 or j > i)
    assert all(M[i, j] != 0 for i in range(6) for j in range(6) if 0 <= i - j < 3)
    assert_proved(prove(spec), (Form.QUADRATIC, Form.CONVOLUTION))


def test_mixing_matrix_is_the_semiseparable_matrix() -> None:
    M = mixing_matrix(checked(*MASKS["scalar_ss"], "MVA"), 3)
    a = [sympy.Symbol(f"a_d0_t{t}", real=True) for t in range(3)]
    C = sympy.Matrix(3, 2, lambda t, n: sympy.Symbol(f"C_g0_t{t}_n{n}", real=True))
    B = sympy.Matrix(3, 2, lambda t, n: sympy.Symbol(f"B_g0_t{t}_n{n}", real=True))
    L = sympy.Matrix([[1, 0, 0], [a[1], 1, 0], [a[1] * a[2], a[2], 1]])
    assert sympy.expand(M - L.multiply_elementwise(C * B.T)) == sympy.zeros(3, 3)


def test_const_decay_mask_is_a_power_of_gamma() -> None:
    M = mixing_matrix(checked(*MASKS["const_decay"]), 4)
    gamma = sympy.Symbol("gamma_h0", real=True)
    assert sympy.degree(M[3, 0], gamma) == 3 and M[0, 1] == 0


def test_lti_kernel_entries_are_c_abar_power_bbar() -> None:
    M = mixing_matrix(checked(TOEPLITZ["lti_diagonal"], (Form.QUADRATIC,)), 4)
    s = {
        n: sympy.Symbol(n, real=True)
        for n in (
            "Abar_h0_n0",
            "Abar_h0_n1",
            "Bbar_h0_n0",
            "Bbar_h0_n1",
            "Cbar_h0_n0",
            "Cbar_h0_n1",
        )
    }
    k3 = (
        s["Cbar_h0_n0"] * s["Abar_h0_n0"] ** 3 * s["Bbar_h0_n0"]
        + s["Cbar_h0_n1"] * s["Abar_h0_n1"] ** 3 * s["Bbar_h0_n1"]
    )
    assert sympy.expand(M[3, 0] - k3) == 0
    assert M[2, 0] == M[3, 1] and M[0, 1] == 0


def test_an_off_by_one_in_state_passing_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    def wrong(a, start, end):
        # Drops a_start: the decay of the chunk's first step is missing from the passed state.
        return symbolic._seg(a, end - 1, start)

    monkeypatch.setattr(symbolic, "_chunk_decay", wrong)
    with pytest.raises(ProofError, match=r"chunked \(Q=2\) y differs") as err:
        prove(checked(*MASKS["scalar_ss"], "MVA"))
    assert "recurrent" not in str(err.value) and "quadratic" not in str(err.value)
    assert isinstance(err.value, SsmcError)


def test_a_shifted_convolution_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    right = symbolic._convolution

    def shifted(k):
        y = right(k)
        return sympy.Matrix.vstack(sympy.zeros(1, y.cols), y[:-1, :])

    monkeypatch.setattr(symbolic, "_convolution", shifted)
    with pytest.raises(ProofError, match=r"convolution y differs"):
        prove(checked(TOEPLITZ["lti_hippo"], (Form.QUADRATIC, Form.CONVOLUTION)))


def test_a_form_without_expansion_is_refused() -> None:
    with pytest.raises(ProofError, match="no expansion of form chunked"):
        prove(checked(TOEPLITZ["toeplitz_learned"], (Form.CHUNKED,)))


@pytest.mark.parametrize("structure", [*MASKS, *TOEPLITZ])
def test_every_symbol_is_a_plain_identifier(structure: str) -> None:
    # Only these names ever reach lambdify, which prints them into source.
    mask, forms = MASKS.get(structure) or (TOEPLITZ[structure], (Form.QUADRATIC,))
    names = {str(s) for s in mixing_matrix(checked(mask, forms, "MVA")).free_symbols}
    assert names and all(re.fullmatch(r"[A-Za-z]+[0-9]?(_[a-z][0-9]+)+", n) for n in names)


def test_sizes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        prove(checked(*MASKS["causal"]), chunk_sizes=(0,))


def test_proof_is_a_frozen_record() -> None:
    proof = prove(checked(*MASKS["causal"]), T=3, chunk_sizes=(2,))
    with pytest.raises(FrozenInstanceError):
        proof.seconds = 0.0  # type: ignore[misc]
    assert proof.seconds >= sum(c.seconds for c in proof.checks) > 0
    assert "chunked Q=2" in proof.render() and "DIFFERS" not in proof.render()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_spec_is_proved_quickly(path: Path) -> None:
    pipeline = pytest.importorskip("ssmc.pipeline")
    spec = pipeline.parse_file(path)
    proof = prove(spec)
    assert_proved(proof, spec.forms)
    # ≲ 2 s on a laptop core; the bound leaves room for a loaded CI machine.
    assert proof.seconds < 6




@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_the_reference_agrees_with_the_lambdified_m(path: Path) -> None:
    pipeline = pytest.importorskip("ssmc.pipeline")
    spec = pipeline.parse_file(path)
    agreements = symbolic_numeric.numeric_check(spec)
    assert {a.form for a in agreements} == set(spec.forms)
    assert all(a.error <= 1e-10 for a in agreements)
    if spec.spec.final_state:
        assert "final_state" in {a.quantity for a in agreements}


def test_a_wrong_reference_chunked_form_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    ref = importlib.import_module("ssmc.reference")

    right = ref.reference

    def slightly_wrong_state(checked, form=None, **options):
        run = right(checked, form, **options)

        def wrong(**tensors):
            # A chunked final state off by 0.1 %: small, but far beyond fp64 rounding.
            y, state = run(**tensors)
            return y, state * 1.001 if form is Form.CHUNKED else state

        return wrong

    monkeypatch.setattr(ref, "reference", slightly_wrong_state)
    spec = pytest.importorskip("ssmc.pipeline").parse_file(EXAMPLES_DIR / "mamba2.ssm")
    with pytest.raises(ProofError, match=r"chunked \(Q=2\) final_state off by") as err:
        symbolic_numeric.numeric_check(spec)
    assert "recurrent" not in str(err.value)


def test_a_wrong_lti_discretisation_in_the_reference_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref = importlib.import_module("ssmc.reference")

    right = ref.lti_kernel

    def zoh_always(A, B, C, dt, hippo, discretization, T):
        return right(A, B, C, dt, hippo, ir.Discretization.ZOH, T)

    monkeypatch.setattr(ref, "lti_kernel", zoh_always)
    spec = pytest.importorskip("ssmc.pipeline").parse_file(EXAMPLES_DIR / "lssl_hippo.ssm")
    with pytest.raises(ProofError, match=r"quadratic y off by"):
        symbolic_numeric.numeric_check(spec)
