"""The canonical core (docs/semantics.md) in every form, in plain torch: the fp64 oracle.

Inputs: x [b, T, Gv, P], log_a [b, T, Gd] | [b, T, Gd, N] | None, B [b, T, Gk, N],
C [b, T, Gq, N], heads H, initial_state [b | S, H, N, P], cu_seqlens [S + 1].
Outputs: y [b, T, H, P] in the dtype of x, final_state [b | S, H, N, P].

Inside, every role is laid out head-first as [b, *hd, T, F]: the H output heads are
written in mixed radix (`_Heads.digits`) so that each role's group index is a prefix of
the digits, and a role with G < H heads has size-1 (broadcast) digits instead of copies
(head counts that do not divide one another, e.g. 2 and 3 of 6, are gathered to H).
Work is done in the dtype of x, promoted to fp32 for fp16/bf16; the state is fp32, or
fp64 for fp64 inputs. Under `cu_seqlens` the recurrent form resets the state at each
boundary in its loop; the other forms run each packed sequence on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Result = tuple[Tensor, Tensor]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Heads:
    """H output heads as digits (prefix products = the role head counts) or gathered."""

    H: int
    digits: tuple[int, ...]
    chain: bool

    @staticmethod
    def of(H: int, counts: tuple[int, ...]) -> _Heads:
        """The mixed-radix layout serving every count, when the counts form a divisor chain."""
        for G in counts:
            if G < 1 or H % G:
                raise ValueError(f"head count {G} does not divide the output head count {H}")
        digits, prev = [], 1
        for G in sorted(set(counts) | {H}):
            if G % prev:
                return _Heads(H=H, digits=(H,), chain=False)
            if G > prev:
                digits.append(G // prev)
            prev = G
        return _Heads(H=H, digits=tuple(digits), chain=True)

    def role(self, t: Tensor) -> Tensor:
        """[b, T, G, *F] → [b, *hd, T, *F]: the digits of G, then size-1 (broadcast) digits."""
        G = t.shape[2]
        t = t.movedim(2, 1)
        if not self.chain:
            return t.index_select(1, torch.arange(self.H, device=t.device) // (self.H // G))
        if not self.digits:
            return t[:, 0]
        sizes, prod = [], 1
        for d in self.digits:
            sizes.append(d if prod < G else 1)
            prod *= sizes[-1]
        return t.unflatten(1, sizes)

    def state(self, s: Tensor) -> Tensor:
        """[b, H, N, P] → [b, *hd, N, P] (a view)."""
        return s.unflatten(1, self.digits) if self.digits else s[:, 0]

    def merge(self, t: Tensor) -> Tensor:
        """[b, *hd, *rest] → [b, H, *rest], broadcasting the digits no role distinguished."""
        rest = t.shape[1 + len(self.digits) :]
        return t.expand(t.shape[0], *self.digits, *rest).reshape(t.shape[0], self.H, *rest)


def _dtypes(x: Tensor) -> tuple[torch.dtype, torch.dtype]:
    """(compute dtype, state dtype) for inputs of x's dtype."""
    if x.dtype == torch.float64:
        return torch.float64, torch.float64
    return (x.dtype if x.dtype == torch.float32 else torch.float32), torch.float32


def _layout(
    x: Tensor, log_a: Tensor | None, B: Tensor, C: Tensor, heads: int
) -> tuple[_Heads, Tensor, Tensor, Tensor, Tensor, bool]:
    """Roles head-first in the compute dtype; log_a as [b, *hd, T, 1 | N] (zeros if causal)."""
    dtype, _ = _dtypes(x)
    counts = tuple(t.shape[2] for t in (x, log_a, B, C) if t is not None)
    hd = _Heads.of(heads, counts)
    diagonal = log_a is not None and log_a.dim() == 4
    if log_a is None:
        log_a = x.new_zeros(x.shape[0], x.shape[1], 1, dtype=dtype)
    la = log_a.to(dtype) if diagonal else log_a.to(dtype)[..., None]
    return (
        hd,
        hd.role(x.to(dtype)),
        hd.role(la),
        hd.role(B.to(dtype)),
        hd.role(C.to(dtype)),
        diagonal,
    )


def _state0(hd: _Heads, init: Tensor | None, b: int, N: int, P: int, x: Tensor) -> Tensor:
    """The state entering the sequence, [b, *hd, N, P] (zeros when no initial_state)."""
    _, sdtype = _dtypes(x)
    if init is None:
        return x.new_zeros(b, *hd.digits, N, P, dtype=sdtype)
    return hd.state(init.to(sdtype)).expand(b, *hd.digits, N, P)


def _y_out(hd: _Heads, y: Tensor, x: Tensor) -> Tensor:
    """y [b, *hd, T, P] → [b, T, H, P] in x's dtype."""
    return hd.merge(y).movedim(2, 1).to(x.dtype)


def _segments(cu_seqlens: Tensor) -> list[tuple[int, int]]:
    """(start, end) of each packed sequence."""
    offsets = cu_seqlens.tolist()
    return list(zip(offsets[:-1], offsets[1:], strict=True))


def _per_sequence(
    form: Callable[..., Result],
    x: Tensor,
    log_a: Tensor | None,
    B: Tensor,
    C: Tensor,
    heads: int,
    initial_state: Tensor | None,
    cu_seqlens: Tensor,
    **options: int,
) -> Result:
    """Run `form` on each packed sequence of a batch-1 varlen input; cat y, stack states."""
    if x.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs batch 1, got batch {x.shape[0]}")
    ys, states = [], []
    for s, (start, end) in enumerate(_segments(cu_seqlens)):
        init = None if initial_state is None else initial_state[s : s + 1]
        if end == start:
            _, sdtype = _dtypes(x)
            zeros = x.new_zeros(1, heads, B.shape[-1], x.shape[-1], dtype=sdtype)
            states.append(zeros if init is None else init.to(sdtype))
            continue
        part = slice(start, end)
        la = None if log_a is None else log_a[:, part]
        y, state = form(x[:, part], la, B[:, part], C[:, part], heads, init, **options)
        ys.append(y)
        states.append(state)
    y = torch.cat(ys, dim=1) if ys else x.new_zeros(1, 0, heads, x.shape[-1])
    return y, torch.cat(states, dim=0)


def recurrent(
    x: Tensor,
    log_a: Tensor | None,
    B: Tensor,
    C: Tensor,
    heads: int,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> Result:
    """h_t = a_t ⊙ h_{t-1} + B_t ⊗ x_t, y_t = C_tᵀ h_t, step by step; reset at each boundary."""
    hd, xs, la, Bs, Cs, _ = _layout(x, log_a, B, C, heads)
    _, sdtype = _dtypes(x)
    b, T, N, P = x.shape[0], x.shape[1], B.shape[-1], x.shape[-1]
    if cu_seqlens is None:
        segments = [(0, T)]
        inits = [_state0(hd, initial_state, b, N, P, x)]
    else:
        if b != 1:
            raise ValueError(f"cu_seqlens needs batch 1, got batch {b}")
        segments = _segments(cu_seqlens)
        inits = [
            _state0(hd, None if initial_state is None else initial_state[s : s + 1], 1, N, P, x)
            for s in range(len(segments))
        ]
    starts = {start: s for s, (start, end) in reversed(list(enumerate(segments))) if end > start}
    ends = {end - 1: s for s, (start, end) in enumerate(segments) if end > start}
    finals = list(inits)
    h = inits[0]
    ys = []
    for t in range(T):
        if t in starts:
            h = inits[starts[t]]
        a_t = torch.exp(la[..., t, :]).to(sdtype)[..., None]
        Bx = torch.einsum("b...n,b...p->b...np", Bs[..., t, :], xs[..., t, :]).to(sdtype)
        h = a_t * h + Bx
        ys.append(torch.einsum("b...n,b...np->b...p", Cs[..., t, :].to(sdtype), h))
        if t in ends:
            finals[ends[t]] = h
    y = torch.stack(ys, dim=-2) if ys else xs.new_zeros(b, *hd.digits, 0, P)
    return _y_out(hd, y, x), torch.cat([hd.merge(s) for s in finals], dim=0)


def _segsum(la: Tensor) -> Tensor:
    """segsum[..., i, j] = Σ_{k=j+1..i} la[..., k] for i ≥ j, −inf above the diagonal.

    la [..., Q] → [..., Q, Q]; each entry is its own masked sum, not a difference of
    long cumulative sums, so it keeps full precision for any length.
    """
    Q = la.shape[-1]
    i = torch.arange(Q, device=la.device)
    tril, strict = i[:, None] >= i, i[:, None] > i
    terms = la[..., :, None].expand(*la.shape, Q).masked_fill(~strict, 0)
    return terms.cumsum(dim=-2).masked_fill(~tril, float("-inf"))


def quadratic(
    x: Tensor,
    log_a: Tensor | None,
    B: Tensor,
    C: Tensor,
    heads: int,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> Result:
    """Y = (L ∘ C Bᵀ) X per head, L_ij = exp(segsum); scalar decays and causal only."""
    if log_a is not None and log_a.dim() == 4:
        raise ValueError("quadratic form needs a scalar decay; a diagonal mask has N masks")
    if cu_seqlens is not None:
        return _per_sequence(quadratic, x, log_a, B, C, heads, initial_state, cu_seqlens)
    hd, xs, la, Bs, Cs, _ = _layout(x, log_a, B, C, heads)
    _, sdtype = _dtypes(x)
    b, N, P = x.shape[0], B.shape[-1], x.shape[-1]
    h0 = _state0(hd, initial_state, b, N, P, x)
    la = la[..., 0]
    # Prepend a step with log a = 0 standing for the initial state: row i of L then holds
    # the decay from the state entering the sequence (column 0) and from every j ≤ i.
    L = torch.exp(_segsum(F.pad(la, (1, 0))))
    M = L[..., 1:, 1:] * torch.einsum("b...in,b...jn->b...ij", Cs, Bs)
    y = M @ xs + L[..., 1:, 0, None] * (Cs @ h0.to(xs.dtype))
    to_end = L[..., -1, :]
    Bx = torch.einsum("b...jn,b...jp->b...np", to_end[..., 1:, None] * Bs, xs)
    state = to_end[..., 0, None, None].to(sdtype) * h0 + Bx.to(sdtype)
    return _y_out(hd, y, x), hd.merge(state)


def chunked(
    x: Tensor,
    log_a: Tensor | None,
    B: Tensor,
    C: Tensor,
    heads: int,
    initial_state: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    *,
    chunk_size: int = 64,
) -> Result:
    """The five SSD steps of DESIGN §1 with chunk length Q, scalar or diagonal decays."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if cu_seqlens is not None:
        return _per_sequence(
            chunked, x, log_a, B, C, heads, initial_state, cu_seqlens, chunk_size=chunk_size
        )
    hd, xs, la, Bs, Cs, diagonal = _layout(x, log_a, B, C, heads)
    _, sdtype = _dtypes(x)
    b, T, N, P, Q = x.shape[0], x.shape[1], B.shape[-1], x.shape[-1], chunk_size
    # Pad to whole chunks with B = x = 0 and log a = 0: the state passes the tail unchanged.
    pad = -T % Q
    xs, Bs, Cs, la = (F.pad(t, (0, 0, 0, pad)).unflatten(-2, (-1, Q)) for t in (xs, Bs, Cs, la))
    # 1. cumulative sums of log a inside each chunk: cs [b, *hd, c, Q, 1 | N]
    cs = la.cumsum(dim=-2)
    # 2. diagonal blocks: Y_diag = (L_c ∘ C_c B_cᵀ) X_c, L_c per n for diagonal decays
    if diagonal:
        Lc = torch.exp(_segsum(la.movedim(-1, -2))).movedim(-3, -1)
        M = torch.einsum("b...cin,b...cjn,b...cijn->b...cij", Cs, Bs, Lc)
    else:
        M = torch.exp(_segsum(la[..., 0])) * torch.einsum("b...cin,b...cjn->b...cij", Cs, Bs)
    y_diag = M @ xs
    # 3. chunk states: S_c = Σ_l exp(cs_end − cs_l) B_l ⊗ x_l
    to_end = torch.exp(cs[..., -1:, :] - cs)
    S = torch.einsum("b...cln,b...clp->b...cnp", to_end * Bs, xs).to(sdtype)
    # 4. state passing: H_c = exp(cs_end(c−1)) H_{c−1} + S_{c−1}, H_0 = initial state
    chunk_decay = torch.exp(cs[..., -1, :]).to(sdtype)[..., None]
    states = [_state0(hd, initial_state, b, N, P, x)]
    for c in range(S.shape[-3]):
        states.append(chunk_decay[..., c, :, :] * states[-1] + S[..., c, :, :])
    H_in = torch.stack(states[:-1], dim=-3).to(xs.dtype)
    # 5. off-diagonal output: Y_off,l = exp(cs_l) C_lᵀ H_c
    y_off = torch.einsum("b...cln,b...cnp->b...clp", torch.exp(cs) * Cs, H_in)
    y = (y_diag + y_off).flatten(-3, -2)[..., :T, :]
    return _y_out(hd, y, x), hd.merge(states[-1])


def _toeplitz_matrix(kernel: Tensor, T: int) -> Tensor:
    """M [Gd, T, T] with M_ij = K[i−j] for 0 ≤ i−j < L, else 0; kernel [Gd, L]."""
    L = kernel.shape[-1]
    lag = torch.arange(T, device=kernel.device)[:, None] - torch.arange(T, device=kernel.device)
    taps = F.pad(kernel, (0, max(T - L, 0)))
    return taps[:, lag.clamp(min=0)].masked_fill(lag < 0, 0)


def _toeplitz(
    form: Callable[[Tensor, Tensor, _Heads], Tensor],
    x: Tensor,
    kernel: Tensor,
    heads: int,
    cu_seqlens: Tensor | None,
) -> Tensor:
    """Shared head layout and varlen split of the Toeplitz forms; y [b, T, H, P]."""
    if cu_seqlens is not None:
        if x.shape[0] != 1:
            raise ValueError(f"cu_seqlens needs batch 1, got batch {x.shape[0]}")
        parts = [_toeplitz(form, x[:, s:e], kernel, heads, None) for s, e in _segments(cu_seqlens)]
        return torch.cat(parts, dim=1)
    dtype, _ = _dtypes(x)
    hd = _Heads.of(heads, (x.shape[2], kernel.shape[0]))
    xs = hd.role(x.to(dtype))
    # The kernel [Gd, L] laid out as a role of a batch-1, length-L input: [1, *hd, L].
    K = hd.role(kernel.to(dtype).T[None, :, :, None])[..., 0]
    y = form(xs, K, hd)
    return hd.merge(y).movedim(2, 1).to(x.dtype)


def toeplitz_quadratic(
    x: Tensor, kernel: Tensor, heads: int, cu_seqlens: Tensor | None = None
) -> Tensor:
    """y_i = Σ_{j≤i} K[h, i−j] x_j with M materialised; x [b, T, Gv, P], kernel [Gd, L]."""

    def form(xs: Tensor, K: Tensor, hd: _Heads) -> Tensor:
        T = xs.shape[-2]
        M = _toeplitz_matrix(K.flatten(0, -2), T).unflatten(0, K.shape[:-1])
        return M @ xs

    return _toeplitz(form, x, kernel, heads, cu_seqlens)


def toeplitz_convolution(
    x: Tensor, kernel: Tensor, heads: int, cu_seqlens: Tensor | None = None
) -> Tensor:
    """The same causal convolution via FFT of length 2T (taps past L or T are zero)."""

    def form(xs: Tensor, K: Tensor, hd: _Heads) -> Tensor:
        T = xs.shape[-2]
        taps = K[..., :T]
        n = 2 * T
        fx = torch.fft.rfft(xs, n=n, dim=-2)
        fk = torch.fft.rfft(taps, n=n, dim=-1)[..., None]
        return torch.fft.irfft(fx * fk, n=n, dim=-2)[..., :T, :]

    return _toeplitz(form, x, kernel, heads, cu_seqlens)
