"""compat.fla: FLA's entry points against an fp64 loop written from FLA's math.

The oracle is an explicit per-token loop in FLA's own layout (state [K, V] per head), so
it shares no code with ssmc. fp64 cases run the shims' ops through the PyTorch reference
(relative error ≤ 1e-10); `interpret` cases run the generated kernels in fp32 (≤ 1e-5).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssmc.compat import CompatError, fla
from ssmc.compat.fla import (
    chunk_gla,
    chunk_linear_attn,
    chunk_simple_gla,
    fused_recurrent_simple_gla,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OFFSETS = [0, 7, 7, 20, 33]


@pytest.fixture
def reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shims' ops run the fp64 PyTorch reference, as on a CPU without the interpreter."""
    loaded = fla.op_for

    def op_for(spec):  # type: ignore[no-untyped-def]
        op = loaded(spec)
        monkeypatch.setattr(op, "interpreted", False)
        return op

    monkeypatch.setattr(fla, "op_for", op_for)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return ((got.double().cpu() - want.double().cpu()).norm() / want.double().norm()).item()


def qkv(gen, *, B=2, T=33, H=3, K=8, V=4):
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return dict(q=randn(B, T, H, K), k=randn(B, T, H, K), v=randn(B, T, H, V))


def gates(gen, shape):
    """Log decays in a realistic range (about −1.5 … −0.05)."""
    return F.logsigmoid(torch.randn(*shape, generator=gen, dtype=torch.float64) + 2.0)


def oracle(
    q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, cu_seqlens=None, reverse=False
):
    """FLA's recurrence token by token in fp64: o [B, T, H, V], final states [N, H, K, V].

    S_t = exp(g_t) S_{t-1} (g [.., H] or [.., H, K], times exp(g_gamma)) + k_t v_tᵀ,
    o_t = S_tᵀ (scale·q_t); `reverse` walks each sequence from its end.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    if cu_seqlens is None:
        spans = [(b, 0, T) for b in range(B)]
    else:
        spans = [(0, s, e) for s, e in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True)]
    o = torch.zeros(B, T, H, V, dtype=torch.float64)
    finals = []
    for n, (b, start, end) in enumerate(spans):
        S = torch.zeros(H, K, V, dtype=torch.float64)
        if initial_state is not None:
            S = initial_state[n].clone()
        steps = range(end - 1, start - 1, -1) if reverse else range(start, end)
        for t in steps:
            if g is not None:
                decay = torch.exp(g[b, t])
                S = S * (decay[:, None, None] if decay.dim() == 1 else decay[:, :, None])
            if g_gamma is not None:
                S = S * torch.exp(g_gamma)[:, None, None]
            S = S + k[b, t][:, :, None] * v[b, t][:, None, :]
            o[b, t] = torch.einsum("hk,hkv->hv", q[b, t] * scale, S)
        finals.append(S)
    return o, torch.stack(finals)


def normalised(o, q, k, scale, cu_seqlens=None):
    """FLA's normalize=True: o_t / ((scale·q_t)·Σ_{j≤t, same sequence} k_j + 1e-10)."""
    keys = torch.zeros_like(k)
    spans = (
        [(0, k.shape[1])]
        if cu_seqlens is None
        else list(zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True))
    )
    for start, end in spans:
        keys[:, start:end] = k[:, start:end].cumsum(1)
    return o / ((q * scale * keys).sum(-1, keepdim=True) + 1e-10)


def initial(gen, N, H=3, K=8, V=4):
    return torch.randn(N, H, K, V, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize(
    "entry", [chunk_simple_gla, fused_recurrent_simple_gla], ids=["chunk", "fused_recurrent"]
)
def test_simple_gla_default_scale_and_states(entry, gen, reference_path) -> None:
    t = qkv(gen)
    g, h0 = gates(gen, (2, 33, 3)), initial(gen, 2)
    want_o, want_h = oracle(**t, g=g, initial_state=h0)
    o, final = entry(**t, g=g, initial_state=h0, output_final_state=True)
    assert o.dtype == torch.float64 and final.shape == (2, 3, 8, 4)
    assert rel(o, want_o) <= 1e-10 and rel(final, want_h) <= 1e-10
    o2, none = entry(t["q"], t["k"], t["v"], g)
    assert none is None and rel(o2, oracle(**t, g=g)[0]) <= 1e-10


def test_simple_gla_varlen_custom_scale_no_gate(gen, reference_path) -> None:
    t = qkv(gen, B=1)
    h0 = initial(gen, 4)
    cu = torch.tensor(OFFSETS)
    want_o, want_h = oracle(**t, scale=0.3, initial_state=h0, cu_seqlens=OFFSETS)
    o, final = chunk_simple_gla(
        **t, scale=0.3, initial_state=h0, output_final_state=True, cu_seqlens=cu
    )
    assert final.shape == (4, 3, 8, 4)
    assert rel(o, want_o) <= 1e-10 and rel(final, want_h) <= 1e-10


@pytest.mark.parametrize("with_g", [False, True], ids=["g_gamma", "g+g_gamma"])
def test_simple_gla_g_gamma(with_g, gen, reference_path) -> None:
    t = qkv(gen)
    g = gates(gen, (2, 33, 3)) if with_g else None
    g_gamma = torch.log(torch.tensor([0.8, 0.9, 0.97], dtype=torch.float64))
    want_o, want_h = oracle(**t, g=g, g_gamma=g_gamma)
    o, final = chunk_simple_gla(**t, g=g, g_gamma=g_gamma, output_final_state=True)
    assert rel(o, want_o) <= 1e-10 and rel(final, want_h) <= 1e-10


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "cu_seqlens"])
def test_fused_recurrent_reverse(packed, gen, reference_path) -> None:
    t = qkv(gen, B=1 if packed else 2)
    g = gates(gen, t["q"].shape[:3])
    h0 = initial(gen, 4 if packed else 2)
    cu = OFFSETS if packed else None
    want_o, want_h = oracle(**t, g=g, initial_state=h0, cu_seqlens=cu, reverse=True)
    o, final = fused_recurrent_simple_gla(
        **t,
        g=g,
        initial_state=h0,
        output_final_state=True,
        reverse=True,
        cu_seqlens=None if cu is None else torch.tensor(cu),
    )
    assert rel(o, want_o) <= 1e-10 and rel(final, want_h) <= 1e-10


@pytest.mark.parametrize("packed", [False, True], ids=["batch", "cu_seqlens"])
def test_chunk_gla(packed, gen, reference_path) -> None:
    t = qkv(gen, B=1 if packed else 2)
    g = gates(gen, t["q"].shape) / 4
    h0 = initial(gen, 4 if packed else 2)
    cu = OFFSETS if packed else None
    want_o, want_h = oracle(**t, g=g, initial_state=h0, cu_seqlens=cu)
    o, final = chunk_gla(
        **t,
        g=g,
        initial_state=h0,
        output_final_state=True,
        cu_seqlens=None if cu is None else torch.tensor(cu),
    )
    assert rel(o, want_o) <= 1e-10 and rel(final, want_h) <= 1e-10


def test_linear_attn_raw_and_normalised(gen, reference_path) -> None:
    t = qkv(gen)
    h0 = initial(gen, 2)
    want_o, want_h = oracle(**t, initial_state=h0)
    o, final = chunk_linear_attn(**t, initial_state=h0, output_final_state=True, normalize=False)
    assert rel(o, want_o) <= 1e-10 and rel(final, want_h) <= 1e-10
    plain = oracle(**t)[0]
    normal, none = chunk_linear_attn(**t)  # FLA's default: normalize=True
    assert none is None
    assert rel(normal, normalised(plain, t["q"], t["k"], 8**-0.5)) <= 1e-10


def test_linear_attn_normalised_varlen(gen, reference_path) -> None:
    t = qkv(gen, B=1)
    cu = torch.tensor(OFFSETS)
    plain = oracle(**t, scale=0.5, cu_seqlens=OFFSETS)[0]
    o, _ = chunk_linear_attn(**t, scale=0.5, cu_seqlens=cu, normalize=True)
    assert rel(o, normalised(plain, t["q"], t["k"], 0.5, OFFSETS)) <= 1e-10


@pytest.mark.interpret
def test_simple_gla_kernels_fp32_varlen(gen) -> None:
    t = qkv(gen, B=1)
    g, h0 = gates(gen, (1, 33, 3)), initial(gen, 4)
    want_o, want_h = oracle(**t, g=g, initial_state=h0, cu_seqlens=OFFSETS)
    f32 = {k: v.float().to(DEVICE) for k, v in t.items()}
    o, final = chunk_simple_gla(
        **f32,
        g=g.float().to(DEVICE),
        initial_state=h0.float().to(DEVICE),
        output_final_state=True,
        cu_seqlens=torch.tensor(OFFSETS, device=DEVICE),
    )
    assert o.dtype == torch.float32 and final.dtype == torch.float32
    assert rel(o, want_o) <= 1e-5 and rel(final, want_h) <= 1e-5


@pytest.mark.interpret
def test_gla_kernels_fp32(gen) -> None:
    t = qkv(gen, T=21)
    g, h0 = gates(gen, t["q"].shape) / 4, initial(gen, 2)
    want_o, want_h = oracle(**t, g=g, scale=0.25, initial_state=h0)
    f32 = {k: v.float().to(DEVICE) for k, v in t.items()}
    o, final = chunk_gla(
        **f32,
        g=g.float().to(DEVICE),
        scale=0.25,
        initial_state=h0.float().to(DEVICE),
        output_final_state=True,
    )
    assert rel(o, want_o) <= 1e-5 and rel(final, want_h) <= 1e-5


def test_errors_are_clear(gen) -> None:
    t = qkv(gen)
    with pytest.raises(CompatError, match="head-first"):
        chunk_simple_gla(**t, head_first=True)
    with pytest.raises(CompatError, match="batch size is expected to be 1"):
        chunk_simple_gla(**t, cu_seqlens=torch.tensor([0, 33]))
    with pytest.raises(CompatError, match="initial_state: expected shape"):
        chunk_simple_gla(**t, initial_state=initial(gen, 3))
    with pytest.raises(CompatError, match="g: expected shape"):
        chunk_gla(**t, g=gates(gen, (2, 33, 3)))
    with pytest.raises(CompatError, match="g .* is required"):
        chunk_gla(**t, g=None)  # type: ignore[arg-type]


def test_gradients_match_the_oracle(gen, reference_path) -> None:
    """q, k, v, g and the initial state, through a packed call with a custom scale."""
    t = qkv(gen, B=1)
    leaves = {**t, "g": gates(gen, (1, 33, 3)), "initial_state": initial(gen, 4)}
    leaves = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    w_o = torch.randn(1, 33, 3, 4, generator=gen, dtype=torch.float64)
    w_h = torch.randn(4, 3, 8, 4, generator=gen, dtype=torch.float64)
    o, h = oracle(**leaves, scale=0.4, cu_seqlens=OFFSETS)
    want = torch.autograd.grad((o * w_o).sum() + (h * w_h).sum(), list(leaves.values()))
    o, h = chunk_simple_gla(
        **leaves, scale=0.4, output_final_state=True, cu_seqlens=torch.tensor(OFFSETS)
    )
    got = torch.autograd.grad((o * w_o).sum() + (h * w_h).sum(), list(leaves.values()))
    for name, g, w in zip(leaves, got, want, strict=True):
        assert rel(g, w) <= 1e-10, name
