"""`ssmc show`: the mask L and the matrix M = L ∘ C Bᵀ of a spec, per head, as text or a PNG.

For a small T the whole T × T matrix of an SMA is worth looking at: y = M x per head,
M_ij = L_ij · C_iᵀ B_j (i ≥ j). The matrices come from the spec's own roles on random
inputs (`ssmc.reference.random_inputs`, fp64): L = exp(segsum(log a)) for scalar decays,
one mask per state dim n for diagonal decays (M_ij = Σ_n L_ijn C_in B_jn; L shows n = 0),
the kernel's Toeplitz matrix for convolutions (M = L). The chunks of length Q are outlined:
the diagonal blocks are what the chunked form computes as small masked matmuls, and every
off-diagonal block is a low-rank product through the state (rank ≤ N), the semiseparable
structure the chunked form exploits; the text mode prints those ranks. Composite masks:
a sum `mask A + B` is the sum of its terms (L's blocks then have rank ≤ the number of
terms); a quasiseparable (bidirectional) mask fills both triangles, each low-rank block
drawn; a decayed Toeplitz window is read column by column off the reference (y = M x).
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ssmc import ir
from ssmc.bind import bind
from ssmc.errors import SsmcError
from ssmc.expr import Ref, refs
from ssmc.forms_torch import _segsum, _toeplitz_matrix
from ssmc.reference import Roles, _decay_targets, canonical_roles, random_inputs

MASK_NAMES = {
    ir.Causal: "causal",
    ir.ConstDecay: "const_decay",
    ir.ScalarSemiseparable: "semiseparable",
    ir.DiagonalSemiseparable: "diagonal",
    ir.Toeplitz: "toeplitz",
}
SHADES = " .:-=+*#%@"
"""Text glyphs by |value| / max |value|, for matrices too large to print as numbers."""
NUMBERS_UP_TO = 16
"""Largest T printed as numbers; larger matrices print as SHADES."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Matrices:
    """L and M of every output head, [H, T, T] fp64, and what they came from."""

    name: str
    mask: str
    pattern: str
    T: int
    chunk: int | None
    """Q of the outlined blocks (None when the spec has no chunked form)."""
    N: int | None
    L: Tensor
    M: Tensor
    roles: Roles
    """The canonical core's fp64 tensors on the random inputs (x, log a, B, C, skip, gate)."""
    terms: int = 1
    """Masks summed (`mask A + B`): off-diagonal blocks of L have rank ≤ terms."""
    causal: bool = True
    """False for a bidirectional (quasiseparable) mask: M is full, both triangles drawn."""

    def block_ranks(
        self, head: int, of: str = "M", rtol: float = 1e-9
    ) -> dict[tuple[int, int], int]:
        """Numerical rank of each off-diagonal Q × Q block (chunk i, chunk j ≠ i; j < i when
        causal) of M or L."""
        if self.chunk is None:
            return {}
        matrix = self.M if of == "M" else self.L
        Q, chunks = self.chunk, math.ceil(self.T / self.chunk)
        ranks = {}
        for i in range(chunks):
            for j in range(chunks if not self.causal else i):
                if j == i:
                    continue
                block = matrix[head, i * Q : (i + 1) * Q, j * Q : (j + 1) * Q]
                ranks[(i, j)] = int(torch.linalg.matrix_rank(block, rtol=rtol))
        return ranks


def matrices(
    checked: ir.CheckedSpec, *, seqlen: int = 16, chunk_size: int | None = None, seed: int = 0
) -> Matrices:
    """L and M per head from random fp64 inputs of `checked` at T = `seqlen`."""
    if seqlen < 1:
        raise SsmcError(f"show: --seqlen must be ≥ 1, got {seqlen}")
    inputs = _inputs(checked, seqlen, seed)
    dims = bind(checked, inputs)
    roles = canonical_roles(checked, inputs, dims)
    mask = checked.spec.mask
    pieces = checked.pieces or (checked,)
    mask_name = " + ".join(MASK_NAMES[type(p.spec.mask)] for p in pieces)
    if isinstance(mask, ir.Quasiseparable):
        L, M = _quasiseparable(checked, inputs, seqlen)
        mask_name = "quasiseparable"
    elif checked.pieces and not isinstance(mask, ir.MaskSum):
        L = M = _probe(checked, inputs, seqlen)
        mask_name = "toeplitz"  # a kernel times a decay: still constant along diagonals
    else:
        parts = [_core(p, _sub(p, inputs), seqlen) for p in pieces]
        L = torch.stack([part[0] for part in parts]).sum(0)
        M = torch.stack([part[1] for part in parts]).sum(0)
    chunk = None
    if ir.Form.CHUNKED in checked.forms:
        chunk = chunk_size if chunk_size is not None else max(2, seqlen // 4)
        if chunk < 1:
            raise SsmcError(f"show: --chunk-size must be ≥ 1, got {chunk}")
    N = roles.B.shape[-1] if roles.B is not None else None
    return Matrices(name=checked.spec.name, mask=mask_name, pattern=checked.pattern.value,
                    T=seqlen, chunk=chunk, N=N, L=L, M=M, roles=roles,
                    terms=1 if isinstance(mask, ir.Quasiseparable) else len(pieces),
                    causal=not isinstance(mask, ir.Quasiseparable))


def _sub(piece: ir.CheckedSpec, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
    return {t.name: inputs[t.name] for t in piece.spec.tensors}


def _quasiseparable(checked: ir.CheckedSpec, inputs: dict[str, Tensor],
                    T: int) -> tuple[Tensor, Tensor]:
    """L_ij = ∏_{k=j+1..i} a_k on and below the diagonal, ∏_{k=i..j-1} b_k above; M = L ∘ C Bᵀ."""
    forward, backward = checked.pieces
    L_lower, M_lower = _core(forward, _sub(forward, inputs), T)
    roles = canonical_roles(backward, _sub(backward, inputs), bind(backward, _sub(backward, inputs)))
    H = L_lower.shape[0]
    lb = roles.log_a if roles.log_a is not None else torch.zeros(1, T, 1, dtype=L_lower.dtype)
    # segsum of log b shifted by one token: entry [j, i] = Σ_{k=i..j-1} log b_k for j ≥ i.
    shifted = torch.nn.functional.pad(_per_head(lb, H).T, (1, 0))[:, :T]
    upper = torch.exp(_segsum(shifted)).transpose(1, 2).triu(1)
    L = L_lower + upper
    C, B = (_per_head(t, H) for t in (roles.C, roles.B) if t is not None)
    return L, M_lower + upper * torch.einsum("ihn,jhn->hij", C, B)


def _probe(checked: ir.CheckedSpec, inputs: dict[str, Tensor], T: int) -> Tensor:
    """M column by column from the reference, for a spec whose value is a bare input and that
    has no skip or gate (y = M x): batch element j holds x = 1 at token j, 0 elsewhere."""
    from ssmc.reference import reference

    spec = checked.spec
    if not isinstance(spec.value, Ref) or spec.skip is not None or spec.gate is not None:
        raise SsmcError(f"show: cannot draw the {type(spec.mask).__name__} mask of {spec.name} "
                        "(its value is not a bare input, or it has a skip or gate)")
    batched = {}
    for t in spec.tensors:
        value = inputs[t.name]
        if t.kind is ir.TensorKind.INPUT:
            value = value.expand(T, *value.shape[1:])
        batched[t.name] = value
    x = inputs[spec.value.name]
    batched[spec.value.name] = torch.eye(T, dtype=x.dtype)[:, :, None, None].expand(
        T, T, *x.shape[2:]).contiguous()
    y, _ = reference(checked)(**batched)
    return y[..., 0].permute(2, 1, 0).contiguous()  # [b = j, i, H] → [H, i, j]


def _inputs(checked: ir.CheckedSpec, seqlen: int, seed: int) -> dict[str, Tensor]:
    """Random fp64 inputs (no initial state); a sum's decays drawn by each term's ranges."""
    generator = torch.Generator().manual_seed(seed)
    try:
        inputs = random_inputs(checked, batch=1, seqlen=seqlen, generator=generator)
        for piece in checked.pieces:
            drawn = random_inputs(piece, batch=1, seqlen=seqlen, generator=generator)
            reads = set().union(*(refs(e) for e, _ in _decay_targets(piece.spec.mask)))
            inputs.update({k: v for k, v in drawn.items() if k in reads})
    except ValueError as err:
        raise SsmcError(f"show: {err} (bind them with --dim NAME=INT)") from None
    inputs.pop("initial_state", None)
    return inputs


def _core(checked: ir.CheckedSpec, inputs: dict[str, Tensor], T: int) -> tuple[Tensor, Tensor]:
    """L and M [H, T, T] of a basic mask (diagonal decays: L of state dim 0)."""
    roles = canonical_roles(checked, inputs, bind(checked, inputs))
    H = roles.H
    if roles.kernel is not None:
        kernel = roles.kernel.index_select(0, torch.arange(H) // (H // roles.kernel.shape[0]))
        L = _toeplitz_matrix(kernel, T)
        return L, L
    assert roles.B is not None and roles.C is not None
    C, B = _per_head(roles.C, H), _per_head(roles.B, H)  # [T, H, N]
    la = roles.log_a if roles.log_a is not None else torch.zeros(1, T, 1, dtype=C.dtype)
    if la.dim() == 4:
        # one mask per state dim n: L [H, N, T, T]
        Ln = torch.exp(_segsum(_per_head(la, H).permute(1, 2, 0)))
        return Ln[:, 0], torch.einsum("ihn,jhn,hnij->hij", C, B, Ln)
    L = torch.exp(_segsum(_per_head(la, H).T))
    return L, L * torch.einsum("ihn,jhn->hij", C, B)


def _per_head(t: Tensor, H: int) -> Tensor:
    """[1, T, G, ...] → [T, H, ...]: head h reads group h // (H / G) (DESIGN §2)."""
    G = t.shape[2]
    index = torch.arange(H) // (H // G)
    return t[0].index_select(1, index)


def text(m: Matrices, heads: int = 1) -> str:
    """L and M of the first `heads` heads, chunk boundaries drawn, and the blocks' ranks."""
    lines = [_title(m)]
    L_name = {"diagonal": "L (state dim n = 0; one mask per n)", "toeplitz": "L = M (Toeplitz)"}
    for h in range(min(heads, m.L.shape[0])):
        lines += ["", f"head {h}: {L_name.get(m.mask, 'L')}", *_grid(m.L[h], m.chunk, m.causal)]
        if m.mask != "toeplitz":
            lines += ["", f"head {h}: M = L ∘ C Bᵀ", *_grid(m.M[h], m.chunk, m.causal)]
        bounds = (("L", f"{m.terms} for {m.terms} scalar decay{'s' if m.terms > 1 else ''}"),
                  ("M", f"min({m.terms if m.terms > 1 else ''}N = {m.terms * (m.N or 0)}, "
                   f"Q = {m.chunk})"))
        for of, bound in bounds:
            ranks = m.block_ranks(h, of)
            if ranks:
                cells = "  ".join(f"({i},{j}) {r}" for (i, j), r in ranks.items())
                lines += [f"head {h}: rank of each off-diagonal block (chunk i, chunk j) of {of}, "
                          f"at most {bound}:", "  " + cells]
    return "\n".join(lines)


def _title(m: Matrices) -> str:
    chunk = f", chunk Q = {m.chunk}" if m.chunk else ", no chunked form"
    state = f", N = {m.N}" if m.N is not None else ""
    return (f"{m.name}: {m.mask} mask, {m.pattern} heads, H = {m.L.shape[0]}, "
            f"T = {m.T}{chunk}{state} (random fp64 inputs)")


def _grid(a: Tensor, chunk: int | None, causal: bool = True) -> list[str]:
    """Rows of a lower-triangular matrix: numbers (small T) or shades, `│`/`─` at chunks."""
    T = a.shape[0]
    numbers = T <= NUMBERS_UP_TO
    peak = float(a.abs().max()) or 1.0
    width = 7 if numbers else 1

    def cell(i: int, j: int) -> str:
        if j > i and causal:
            return " " * (width - 1) + "·" if numbers else " "
        v = float(a[i, j])
        if numbers:
            return f"{v:{width}.2f}"
        return SHADES[min(len(SHADES) - 1, int(abs(v) / peak * len(SHADES)))]

    rows = []
    for i in range(T):
        parts = []
        for j in range(T):
            if chunk and j and j % chunk == 0:
                parts.append("│")
            parts.append(cell(i, j) + (" " if numbers else ""))
        row = "".join(parts).rstrip()
        if chunk and i and i % chunk == 0:
            rule = "".join("┼" if c == "│" else "─" for c in "".join(parts))
            rows.append("  " + rule.rstrip())
        rows.append("  " + row)
    if not numbers:
        rows.append(f"  (|value| / {peak:.3g} as {SHADES!r}; · and blanks: above the diagonal)")
    return rows


def png(m: Matrices, path: str | Path, heads: int = 2) -> Path:
    """Draw L and M of the first `heads` heads into `path` (needs matplotlib: ssmc[plot])."""
    Figure, Rectangle = _matplotlib()
    shown = min(heads, m.L.shape[0])
    columns = 1 if m.mask == "toeplitz" else 2
    fig = Figure(figsize=(4.6 * columns + 0.6, 4.1 * shown + 0.7), layout="constrained")
    axes = fig.subplots(shown, columns, squeeze=False)
    for h in range(shown):
        pictures = [(m.L[h], _L_title(m, h), "magma" if m.mask == "toeplitz" else "viridis")]
        if columns == 2:
            pictures.append((m.M[h], f"head {h}: M = L ∘ C Bᵀ", "RdBu_r"))
        for ax, (a, title, cmap) in zip(axes[h], pictures, strict=True):
            ranks = m.block_ranks(h, "M" if cmap == "RdBu_r" else "L")
            _draw(ax, a, title, cmap, m.chunk, ranks, Rectangle, m.causal)
            fig.colorbar(ax.images[0], ax=ax, shrink=0.8, extend="both")
    width = 60 if columns == 1 else 110
    lines = textwrap.wrap(_title(m), width) + textwrap.wrap(_structure_note(m), width)
    fig.suptitle("\n".join(lines), fontsize=10)
    out = Path(path)
    fig.savefig(out, dpi=110)
    return out


def _L_title(m: Matrices, h: int) -> str:
    return {
        "diagonal": f"head {h}: L for state dim n = 0",
        "toeplitz": f"head {h}: M = L (Toeplitz kernel)",
    }.get(m.mask, f"head {h}: mask L")


def _structure_note(m: Matrices) -> str:
    if m.chunk is None:
        return "constant along each diagonal (a convolution): no chunks to outline"
    n = f"{m.terms}N = {m.terms * (m.N or 0)}" if m.terms > 1 else f"N = {m.N}"
    return ("bold squares: the chunks' diagonal blocks; dashed: off-diagonal blocks, "
            f"r = their rank (L: ≤ {m.terms}, one per decay term; M: ≤ {n}: the "
            f"{'' if m.terms == 1 else f'{m.terms}-'}semiseparable structure)")


def _draw(ax: object, a: Tensor, title: str, cmap: str, chunk: int | None,
          ranks: dict[tuple[int, int], int], Rectangle: type, causal: bool = True) -> None:
    """One matrix: the upper triangle blank (causal), chunk blocks outlined, ranks written in."""
    import matplotlib

    T = a.shape[0]
    above = torch.ones(T, T, dtype=torch.bool).triu(1)
    shown = a.clone().masked_fill(above, float("nan")) if causal else a.clone()
    colors = matplotlib.colormaps[cmap].with_extremes(bad="#eeeeee")
    lower = a[~above] if causal else a.flatten()
    if cmap == "RdBu_r":
        # A few large entries of M would wash out the rest: its colours saturate at the 95th
        # percentile of |M| over the lower triangle (the colour bar's arrows say so).
        peak = float(torch.quantile(lower.abs(), 0.95)) or 1.0
        limits = (-peak, peak)
    else:
        # A decay mask spans [0, 1]; a Toeplitz kernel's own range shows its slow decay.
        low, high = float(lower.min()), float(lower.max())
        if cmap == "viridis":
            low = min(low, 0.0)
        limits = (low, high) if high > low else (low - 1.0, low + 1.0)
    ax.imshow(shown.numpy(), cmap=colors, vmin=limits[0], vmax=limits[1],  # type: ignore[attr-defined]
              interpolation="nearest")
    ax.set_title(title, fontsize=9)  # type: ignore[attr-defined]
    if chunk is None:
        ticks = list(range(0, T, max(1, T // 5)))
        ax.set_xticks(ticks)  # type: ignore[attr-defined]
        ax.set_yticks(ticks)  # type: ignore[attr-defined]
        return
    for i in range(0, T, chunk):
        size = min(chunk, T - i)
        ax.add_patch(Rectangle((i - 0.5, i - 0.5), size, size, fill=False,  # type: ignore[attr-defined]
                               edgecolor="black", linewidth=2))
        for j in range(0, i if causal else T, chunk):
            if j == i:
                continue
            width = min(chunk, T - j)
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), width, size, fill=False,  # type: ignore[attr-defined]
                                   edgecolor="0.35", linewidth=1, linestyle="--"))
            r = ranks.get((i // chunk, j // chunk))
            if r is not None and chunk >= 3:
                ax.text(j + width / 2 - 0.5, i + size / 2 - 0.5, f"r={r}",  # type: ignore[attr-defined]
                        ha="center", va="center", fontsize=8,
                        bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0})
    ticks = list(range(0, T, chunk))
    ax.set_xticks(ticks)  # type: ignore[attr-defined]
    ax.set_yticks(ticks)  # type: ignore[attr-defined]


def _matplotlib() -> tuple[type, type]:
    """matplotlib's Figure and Rectangle (no pyplot: no global state, no display needed)."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError:
        raise SsmcError("drawing PNGs needs matplotlib: pip install 'ssmc[plot]' "
                        "(or leave out --png for the text view)") from None
    return Figure, Rectangle
