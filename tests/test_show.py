"""ssmc.show: L and M per head are the spec's matrix (y = M x), drawn as text and PNG."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import ssmc
from ssmc.cli import main
from ssmc.errors import SsmcError
from ssmc.ir import Form
from ssmc.pipeline import parse_file, with_dims
from ssmc.show import _inputs, matrices, png, text

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.ssm"))


def _spec(name: str, **dims: int) -> ssmc.CheckedSpec:
    return with_dims(parse_file(ROOT / "examples" / f"{name}.ssm"), dims)


@pytest.mark.parametrize("name", EXAMPLES)
def test_M_times_x_is_the_reference(name: str) -> None:
    """y = (M x + skip) ∘ gate per head, against the recurrent (or FFT) fp64 reference."""
    checked = _spec(name)
    T = 11
    m = matrices(checked, seqlen=T, chunk_size=4, seed=3)
    r = m.roles
    x = r.x[0].index_select(1, torch.arange(r.H) // (r.H // r.x.shape[2]))  # [T, H, P]
    y = torch.einsum("hij,jhp->ihp", m.M, x)[None]
    if r.skip is not None:
        y = y + r.skip
    if r.gate is not None:
        y = y * r.gate
    inputs = _inputs(checked, T, 3)
    form = Form.RECURRENT if Form.RECURRENT in checked.forms else Form.CONVOLUTION
    y_ref, _ = ssmc.reference(checked, form)(**inputs)
    assert m.M.shape == m.L.shape == (r.H, T, T) and m.M.dtype == torch.float64
    assert torch.equal(m.M.triu(1), torch.zeros_like(m.M)) is m.causal
    assert float((y - y_ref).norm() / y_ref.norm()) < 1e-12


def test_semiseparable_blocks_have_rank_N() -> None:
    m = matrices(_spec("mamba2", N=2), seqlen=16, chunk_size=4)
    assert m.chunk == 4 and m.N == 2
    assert set(m.block_ranks(0, "M").values()) == {2}
    assert set(m.block_ranks(0, "L").values()) == {1}
    assert list(m.block_ranks(0)) == [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]


def test_a_sum_of_two_semiseparable_masks_is_2_semiseparable() -> None:
    m = matrices(_spec("mamba2_2ss", N=2), seqlen=12, chunk_size=4)
    assert m.terms == 2 and m.mask == "semiseparable + semiseparable"
    assert set(m.block_ranks(0, "L").values()) == {2}
    assert set(m.block_ranks(0, "M").values()) == {4}  # ≤ 2N = 4 = Q
    assert "of L, at most 2 for 2 scalar decays" in text(m)


def test_quasiseparable_mask_is_full_with_low_rank_blocks_both_sides() -> None:
    m = matrices(_spec("hydra", N=2), seqlen=12, chunk_size=4)
    assert m.mask == "quasiseparable" and not m.causal
    assert torch.all(m.L[0] > 0) and torch.allclose(m.L[0].diagonal(), torch.ones(12, dtype=torch.float64))
    assert set(m.block_ranks(0, "L")) == {(i, j) for i in range(3) for j in range(3) if i != j}
    assert set(m.block_ranks(0, "L").values()) == {1}
    assert set(m.block_ranks(0, "M").values()) == {2}
    assert "·" not in text(m)


def test_decayed_window_is_a_decaying_toeplitz_matrix() -> None:
    m = matrices(_spec("decay_window", L=3), seqlen=8)
    assert m.mask == "toeplitz" and m.chunk is None
    assert torch.equal(m.M[0].tril(-3), torch.zeros(8, 8))  # a window of L = 3 taps
    assert torch.allclose(m.M[0].diagonal(-1), m.M[0, 1, 0].expand(7))


def test_diagonal_mask_is_a_sum_of_N_masks() -> None:
    m = matrices(_spec("gla", N=3), seqlen=12, chunk_size=6)
    assert m.mask == "diagonal"
    assert set(m.block_ranks(1, "M").values()) == {3}
    # L shows state dim 0: a decay in (0, 1] on and below the diagonal.
    lower = m.L[0][torch.ones(12, 12, dtype=torch.bool).tril()]
    assert float(lower.min()) > 0 and float(lower.max()) == 1.0


def test_toeplitz_has_no_chunks_and_constant_diagonals() -> None:
    m = matrices(_spec("toeplitz"), seqlen=9)
    assert m.chunk is None and m.block_ranks(0) == {}
    assert torch.equal(m.L, m.M)
    assert torch.allclose(m.M[0].diagonal(-2), m.M[0, 2, 0].expand(7))


def test_text_marks_chunks_and_ranks() -> None:
    out = text(matrices(_spec("retnet", N=2), seqlen=8, chunk_size=3))
    assert out.startswith("retnet: const_decay mask, MHA heads, H = 8, T = 8, chunk Q = 3, N = 2")
    assert out.count("┼") == 8 and "│" in out  # L and M: two rules, two crossings each
    assert "of M, at most min(N = 2, Q = 3):\n  (1,0) 2  (2,0) 2  (2,1) 2" in out
    shaded = text(matrices(_spec("linear_attention"), seqlen=20, chunk_size=5))
    assert "@" in shaded and "as ' .:-=+*#%@'" in shaded


def test_bad_sizes_are_user_errors() -> None:
    with pytest.raises(SsmcError, match="--seqlen must be ≥ 1"):
        matrices(_spec("retnet"), seqlen=0)
    with pytest.raises(SsmcError, match="--chunk-size must be ≥ 1"):
        matrices(_spec("retnet"), seqlen=4, chunk_size=0)


def test_png_is_drawn(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    out = png(matrices(_spec("mamba2", N=2), seqlen=16, chunk_size=4), tmp_path / "m.png")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 600 and image.height > 400
        # Not a blank canvas: many distinct colours (the matrices, outlines and text).
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or ()) > 100


def test_png_without_matplotlib_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SsmcError, match=r"pip install 'ssmc\[plot\]'"):
        png(matrices(_spec("retnet"), seqlen=4), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_cli_show_text_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = str(ROOT / "examples" / "gla.ssm")
    assert main(["show", spec, "-T", "6", "--dim", "N=2", "--heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "head 1: M = L ∘ C Bᵀ" in out and "head 2" not in out
    assert main(["show", spec, "-T", "0"]) == 2
    assert "--seqlen must be ≥ 1" in capsys.readouterr().err
    if "matplotlib" in sys.modules or _has_matplotlib():
        assert main(["show", spec, "-T", "8", "--png", str(tmp_path / "g.png")]) == 0
        assert (tmp_path / "g.png").stat().st_size > 10_000


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
