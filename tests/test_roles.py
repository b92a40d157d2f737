"""ssmc.roles: which skips leave x's gradient to the core's backward (skip_fold); which
queries the diagonal chunked forward reads unscaled (query_scale)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssmc.pipeline import parse, parse_file
from ssmc.roles import prologue, skip_fold

ROOT = Path(__file__).parent.parent

SPEC = """
ssm s
dim H = 2, N = 4, P = 4
input x : [batch, seq, H, P]
input B : [batch, seq, 1, N]
input C : [batch, seq, 1, N]
{decls}
output y : [batch, seq, H, P]
mask causal
query C
key B
value x
skip {skip}
{gate}
"""
DECLS = {"z": "input z : [batch, seq, H, P]", "D": "param D : [H]", "E": "param E : [H, P]"}


def fold_of(skip: str, gate: str = "") -> tuple[int, int] | None:
    words = (skip + " " + gate).replace("(", " ").replace(")", " ").split()
    used = [line for name, line in DECLS.items() if name in words]
    checked = parse(SPEC.format(decls="\n".join(used), skip=skip, gate=gate), "s.ssm")
    fold = skip_fold(checked, prologue(checked))
    return None if fold is None else (fold.x, fold.scale)


def test_mamba2_folds_its_skip() -> None:
    """Mamba-2's skip D ⊙ x: x (position 0) and D (position 7)."""
    checked = parse_file(ROOT / "examples" / "mamba2.ssm")
    fold = skip_fold(checked, prologue(checked))
    assert fold is not None and (fold.x, fold.scale) == (0, 7)


@pytest.mark.parametrize(
    ("skip", "gate", "want"),
    [
        ("D * x", "", (0, 3)),
        ("x * D", "gate silu(z)", (0, 4)),
        ("D * x", "gate silu(x)", None),  # the gate reads x: its gradient is the epilogue's
        ("E * x", "", None),  # not one scale per head
        ("D * z", "", None),  # not the value's tensor
        ("x", "", None),
        ("D * x + x", "", None),
    ],
)
def test_skip_fold_forms(skip: str, gate: str, want: tuple[int, int] | None) -> None:
    """Only a per-head scale times the value's own tensor, read by no gate, is folded."""
    assert fold_of(skip, gate) == want


DIAG = """
ssm d
dim H = 2, N = 4, P = 4
{query_decl}
input k : [batch, seq, H, N]
input v : [batch, seq, H, P]
input g : [batch, seq, H, N]
output o : [batch, seq, H, P]
mask diagonal(log_a = logsigmoid(g))
query {query}
key k
value v
"""


@pytest.mark.parametrize(
    ("query", "want"),
    [
        ("q * 0.125", (0, 0.125)),
        ("0.5 * q", (0, 0.5)),
        ("q / 4", (0, 0.25)),
        ("q", None),  # passed through already
        ("q * q", None),
        ("q * 0", None),
        ("q * g", None),
        ("w * 2", None),  # w has no head axis: the prologue lays C out
        ("q * 2 + k", None),
    ],
)
def test_chunked_diagonal_forward_reads_a_scaled_query_unscaled(
    query: str, want: tuple[int, float] | None
) -> None:
    decl = "input w : [batch, seq, N]" if "w" in query else "input q : [batch, seq, H, N]"
    checked = parse(DIAG.format(query=query, query_decl=decl), "d.ssm")
    pro = prologue(checked)
    assert pro.fused_decay is not None
    assert pro.chunked_query == want
    written = {r.role for k in pro.chunked_kernels for r in k.results}
    assert ("C" in written) == (want is None and query != "q")
