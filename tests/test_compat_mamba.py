"""compat.mamba: mamba_ssm's SSD entry points against an fp64 loop written from mamba's math.

The oracle is an explicit per-token loop in mamba_ssm's own layout (state P×N), so it
shares no code with ssmc. fp64 cases run the shims' ops through the PyTorch reference
(relative error ≤ 1e-10); `interpret` cases run the generated kernels in fp32 (≤ 1e-5).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ssmc
from ssmc.compat import CompatError, mamba
from ssmc.compat.mamba import mamba_chunk_scan_combined, selective_state_update

ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INF = float("inf")


@pytest.fixture
def reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shims' ops run the fp64 PyTorch reference, as on a CPU without the interpreter."""
    loaded = mamba.op_for

    def op_for(spec):  # type: ignore[no-untyped-def]
        op = loaded(spec)
        monkeypatch.setattr(op, "interpreted", False)
        return op

    monkeypatch.setattr(mamba, "op_for", op_for)


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return ((got.double().cpu() - want.double().cpu()).norm() / want.double().norm()).item()


def inputs(gen, *, b=2, T=37, H=4, G=2, N=8, P=4, dtype=torch.float64, device="cpu"):
    """Mamba-2 inputs: Δ·A lands in a realistic decay range (A < 0, dt around 0)."""

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)

    return dict(
        x=randn(b, T, H, P),
        dt=(randn(b, T, H) * 0.5 - 1.0),
        A=(-0.5 - torch.rand(H, generator=gen, dtype=torch.float64)).to(dtype).to(device),
        B=randn(b, T, G, N),
        C=randn(b, T, G, N),
    )


def oracle(
    x,
    dt,
    A,
    B,
    C,
    D=None,
    z=None,
    dt_bias=None,
    initial_states=None,
    seq_idx=None,
    dt_softplus=False,
    dt_limit=(0.0, INF),
    ends=(),
):
    """mamba_ssm's SSD token by token in fp64: out, final state, states after `ends`."""
    x, dt, A, B, C = (t.double().cpu() for t in (x, dt, A, B, C))
    b, T, H, P = x.shape
    N = B.shape[-1]
    rep = H // B.shape[2]
    Bh, Ch = B.repeat_interleave(rep, 2), C.repeat_interleave(rep, 2)
    if dt_bias is not None:
        dt = dt + dt_bias.double().cpu()
    if dt_softplus:
        dt = F.softplus(dt)
    if tuple(dt_limit) != (0.0, INF):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    h = torch.zeros(b, H, P, N, dtype=torch.float64)
    if initial_states is not None:
        h = initial_states.double().cpu().clone()
    seq = None if seq_idx is None else seq_idx.cpu()
    ys, kept = [], {}
    for t in range(T):
        if seq is not None:
            previous = torch.zeros(b, dtype=seq.dtype) if t == 0 else seq[:, t - 1]
            h = torch.where((seq[:, t] != previous)[:, None, None, None], 0.0, h)
        decay = torch.exp(dt[:, t] * A.double().cpu())[..., None, None]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", h, Ch[:, t]))
        if t + 1 in ends:
            kept[t + 1] = h.clone()
    y = torch.stack(ys, 1)
    if D is not None:
        Dd = D.double().cpu()
        y = y + x * (Dd[:, None] if Dd.dim() == 1 else Dd)
    if z is not None:
        y = y * F.silu(z.double().cpu())
    return y, h, kept


def randn_like_state(gen, b, H, P, N, dtype=torch.float64):
    return torch.randn(b, H, P, N, generator=gen, dtype=torch.float64).to(dtype)


CASES = {
    "D_per_head-z-bias-softplus": dict(D="H", z=True, bias=True, softplus=True, limit=None),
    "D_per_channel-limit-initial": dict(
        D="HP", z=False, bias=True, softplus=True, limit=(0.05, 0.4), initial=True
    ),
    "lower_limit_only": dict(D=None, z=True, bias=False, softplus=True, limit=(0.3, INF)),
    "plain": dict(D=None, z=False, bias=False, softplus=False, limit=None),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_chunk_scan_matches_oracle(case, gen, reference_path) -> None:
    c = CASES[case]
    t = inputs(gen)
    b, T, H, P = t["x"].shape
    N = t["B"].shape[-1]
    if not c["softplus"]:
        t["dt"] = t["dt"].abs() * 0.2
    kw = dict(dt_softplus=c["softplus"])
    if c["D"] is not None:
        kw["D"] = torch.randn(H, generator=gen, dtype=torch.float64)
        if c["D"] == "HP":
            kw["D"] = torch.randn(H, P, generator=gen, dtype=torch.float64)
    if c["z"]:
        kw["z"] = torch.randn(b, T, H, P, generator=gen, dtype=torch.float64)
    if c["bias"]:
        kw["dt_bias"] = torch.randn(H, generator=gen, dtype=torch.float64) * 0.5
    if c["limit"] is not None:
        kw["dt_limit"] = c["limit"]
    if c.get("initial"):
        kw["initial_states"] = randn_like_state(gen, b, H, P, N)
    want_y, want_h, _ = oracle(**t, **kw)
    result = mamba_chunk_scan_combined(**t, chunk_size=16, **kw, return_final_states=True)
    out, final = result
    assert out.dtype == torch.float64 and final.shape == (b, H, P, N)
    assert rel(out, want_y) <= 1e-10
    assert rel(final, want_h) <= 1e-10
    plain = mamba_chunk_scan_combined(**t, chunk_size=16, **kw)
    assert isinstance(plain, torch.Tensor) and rel(plain, want_y) <= 1e-10


def varlen_inputs(gen):
    t = inputs(gen, b=1, T=30)
    offsets = [0, 5, 5, 17, 30]
    seq_idx = torch.tensor([[0] * 5 + [2] * 12 + [3] * 13])
    H, P, N = 4, 4, 8
    extra = dict(
        D=torch.randn(H, P, generator=gen, dtype=torch.float64),
        z=torch.randn(1, 30, H, P, generator=gen, dtype=torch.float64),
        dt_bias=torch.randn(H, generator=gen, dtype=torch.float64) * 0.5,
        initial_states=randn_like_state(gen, 1, H, P, N),
    )
    return t, extra, offsets, seq_idx


@pytest.mark.parametrize("with_seq_idx", [True, False], ids=["seq_idx", "cu_seqlens_only"])
def test_varlen_states(with_seq_idx, gen, reference_path) -> None:
    t, extra, offsets, seq_idx = varlen_inputs(gen)
    want_y, want_h, kept = oracle(
        **t, **extra, seq_idx=seq_idx, dt_softplus=True, ends=set(offsets[1:])
    )
    out, final, states = mamba_chunk_scan_combined(
        **t,
        chunk_size=8,
        **extra,
        seq_idx=seq_idx if with_seq_idx else None,
        cu_seqlens=torch.tensor(offsets),
        dt_softplus=True,
        return_final_states=True,
        return_varlen_states=True,
    )
    assert states.shape == (4, 4, 4, 8)
    assert rel(out, want_y) <= 1e-10
    assert rel(final, want_h) <= 1e-10
    assert rel(states[0], kept[5][0]) <= 1e-10
    # The empty sequence [5, 5) has the zero state; the initial state went to the first.
    assert torch.count_nonzero(states[1]) == 0
    assert rel(states[2], kept[17][0]) <= 1e-10 and rel(states[3], kept[30][0]) <= 1e-10
    out2, states2 = mamba_chunk_scan_combined(
        **t,
        chunk_size=8,
        **extra,
        seq_idx=seq_idx,
        cu_seqlens=torch.tensor(offsets),
        dt_softplus=True,
        return_varlen_states=True,
    )
    assert rel(out2, want_y) <= 1e-10 and rel(states2, states) <= 1e-12


def test_seq_idx_batches(gen, reference_path) -> None:
    """Rows are packed separately; a row whose seq_idx starts above 0 drops initial_states."""
    t = inputs(gen, b=2, T=21)
    seq_idx = torch.tensor([[0] * 9 + [1] * 12, [1] * 4 + [2] * 17])
    h0 = randn_like_state(gen, 2, 4, 4, 8)
    want_y, want_h, _ = oracle(**t, initial_states=h0, seq_idx=seq_idx, dt_softplus=True)
    out, final = mamba_chunk_scan_combined(
        **t,
        chunk_size=8,
        initial_states=h0,
        seq_idx=seq_idx,
        dt_softplus=True,
        return_final_states=True,
    )
    assert rel(out, want_y) <= 1e-10 and rel(final, want_h) <= 1e-10


def test_cu_seqlens_without_varlen_states_is_ignored(gen, reference_path) -> None:
    """As in mamba_ssm: cu_seqlens only matters with return_varlen_states."""
    t = inputs(gen, b=1, T=12)
    want_y, _, _ = oracle(**t)
    out = mamba_chunk_scan_combined(**t, chunk_size=8, cu_seqlens=torch.tensor([0, 4, 12]))
    assert rel(out, want_y) <= 1e-10


def decode_inputs(gen, b, H, G, P, N, dtype=torch.float64):
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return dict(
        x=randn(b, H, P),
        B=randn(b, G, N),
        C=randn(b, G, N),
        z=randn(b, H, P),
    )


@pytest.mark.parametrize("indices", [False, True], ids=["slots=batch", "state_batch_indices"])
def test_state_update_four_steps_equal_the_chunked_run(indices, gen, reference_path) -> None:
    """Mamba-2's step: dt, dt_bias, A and D expanded over headdim with stride 0 (tied)."""
    t = inputs(gen, b=2, T=4)
    b, T, H, P = t["x"].shape
    N = t["B"].shape[-1]
    D = torch.randn(H, generator=gen, dtype=torch.float64)
    z = torch.randn(b, T, H, P, generator=gen, dtype=torch.float64)
    dt_bias = torch.randn(H, generator=gen, dtype=torch.float64) * 0.5
    h0 = randn_like_state(gen, b, H, P, N)
    out, final = mamba_chunk_scan_combined(
        **t,
        chunk_size=16,
        D=D,
        z=z,
        dt_bias=dt_bias,
        initial_states=h0,
        dt_softplus=True,
        return_final_states=True,
    )
    if indices:
        slots = torch.tensor([3, 1])
        state = randn_like_state(gen, 5, H, P, N)
        untouched = state[[0, 2, 4]].clone()
        state[slots] = h0
    else:
        slots, state = None, h0.clone()
    A = t["A"][:, None, None].expand(H, P, N)
    for step in range(T):
        y = selective_state_update(
            state,
            t["x"][:, step],
            t["dt"][:, step, :, None].expand(b, H, P),
            A,
            t["B"][:, step],
            t["C"][:, step],
            D=D[:, None].expand(H, P),
            z=z[:, step],
            dt_bias=dt_bias[:, None].expand(H, P),
            dt_softplus=True,
            state_batch_indices=slots,
        )
        assert y.shape == (b, H, P) and rel(y, out[:, step]) <= 1e-10
    got = state if slots is None else state[slots]
    assert rel(got, final) <= 1e-10
    if indices:
        assert torch.equal(state[[0, 2, 4]], untouched)


def step_oracle(state, x, dt, A, B, C, D, z, dt_bias):
    """mamba_ssm's selective_state_update_ref, multi-head, in fp64."""
    rep = x.shape[1] // B.shape[1]
    dt = F.softplus(dt + dt_bias)
    dA = torch.exp(dt[..., None] * A)
    dB = dt[..., None] * B.repeat_interleave(rep, 1)[:, :, None, :]
    new = state * dA + dB * x[..., None]
    out = torch.einsum("bhpn,bhn->bhp", new, C.repeat_interleave(rep, 1))
    return (out + x * D) * F.silu(z), new


def test_state_update_untied_runs_every_channel(gen, reference_path) -> None:
    """dt, dt_bias and A that vary over headdim: each channel is its own head."""
    b, H, G, P, N = 3, 4, 2, 3, 8
    t = decode_inputs(gen, b, H, G, P, N)
    dt = torch.randn(b, H, P, generator=gen, dtype=torch.float64) * 0.5 - 1
    A = -0.5 - torch.rand(H, P, N, generator=gen, dtype=torch.float64)
    D = torch.randn(H, P, generator=gen, dtype=torch.float64)
    dt_bias = torch.randn(H, P, generator=gen, dtype=torch.float64) * 0.5
    state = randn_like_state(gen, b, H, P, N)
    want_y, want_state = step_oracle(state, t["x"], dt, A, t["B"], t["C"], D, t["z"], dt_bias)
    y = selective_state_update(
        state, t["x"], dt, A, t["B"], t["C"], D=D, z=t["z"], dt_bias=dt_bias, dt_softplus=True
    )
    assert rel(y, want_y) <= 1e-10 and rel(state, want_state) <= 1e-10


def test_state_update_mamba1_form(gen, reference_path) -> None:
    """The 3-axis form (no head axis): state (b, dim, dstate), A (dim, dstate), B (b, dstate)."""
    b, dim, N = 2, 6, 8
    t = decode_inputs(gen, b, 1, 1, dim, N)
    dt = torch.randn(b, 1, dim, generator=gen, dtype=torch.float64) * 0.5 - 1
    A = -0.5 - torch.rand(1, dim, N, generator=gen, dtype=torch.float64)
    D = torch.randn(1, dim, generator=gen, dtype=torch.float64)
    dt_bias = torch.zeros(1, dim, dtype=torch.float64)
    state = randn_like_state(gen, b, 1, dim, N)
    want_y, want_state = step_oracle(state, t["x"], dt, A, t["B"], t["C"], D, t["z"], dt_bias)
    flat = state[:, 0].clone()
    y = selective_state_update(
        flat,
        t["x"][:, 0],
        dt[:, 0],
        A[0],
        t["B"][:, 0],
        t["C"][:, 0],
        D=D[0],
        z=t["z"][:, 0],
        dt_bias=dt_bias[0],
        dt_softplus=True,
    )
    assert y.shape == (b, dim)
    assert rel(y, want_y[:, 0]) <= 1e-10 and rel(flat, want_state[:, 0]) <= 1e-10


@pytest.mark.interpret
def test_chunk_scan_kernels_fp32_varlen(gen) -> None:
    """The generated kernels, fp32: varlen with initial state, D (H, P), z, bias, limit."""
    t, extra, offsets, seq_idx = varlen_inputs(gen)
    kw = dict(dt_softplus=True, dt_limit=(0.05, 0.6))
    want_y, want_h, kept = oracle(**t, **extra, seq_idx=seq_idx, ends=set(offsets[1:]), **kw)
    f32 = {k: v.float().to(DEVICE) for k, v in {**t, **extra}.items()}
    out, final, states = mamba_chunk_scan_combined(
        **f32,
        chunk_size=16,
        seq_idx=seq_idx.to(DEVICE),
        cu_seqlens=torch.tensor(offsets),
        return_final_states=True,
        return_varlen_states=True,
        **kw,
    )
    assert out.dtype == torch.float32
    assert rel(out, want_y) <= 1e-5 and rel(final, want_h) <= 1e-5
    assert rel(states[3], kept[30][0]) <= 1e-5


@pytest.mark.interpret
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_state_update_kernels_fp32(tied, gen) -> None:
    b, H, G, P, N = 2, 4, 2, 4, 8
    t = decode_inputs(gen, b, H, G, P, N)
    if tied:
        dt = (torch.randn(b, H, 1, generator=gen, dtype=torch.float64) - 1).expand(b, H, P)
        A = (-0.5 - torch.rand(H, 1, 1, generator=gen, dtype=torch.float64)).expand(H, P, N)
    else:
        dt = torch.randn(b, H, P, generator=gen, dtype=torch.float64) - 1
        A = -0.5 - torch.rand(H, P, N, generator=gen, dtype=torch.float64)
    D = torch.randn(H, P, generator=gen, dtype=torch.float64)
    dt_bias = torch.zeros(H, P, dtype=torch.float64)
    state = randn_like_state(gen, b, H, P, N)
    want_y, want_state = step_oracle(state, t["x"], dt, A, t["B"], t["C"], D, t["z"], dt_bias)

    def f32(v):
        return v.float().to(DEVICE)

    s32 = f32(state)
    y = selective_state_update(
        s32,
        f32(t["x"]),
        f32(dt),
        f32(A),
        f32(t["B"]),
        f32(t["C"]),
        D=f32(D),
        z=f32(t["z"]),
        dt_softplus=True,
    )
    assert y.dtype == torch.float32
    assert rel(y, want_y) <= 1e-5 and rel(s32, want_state) <= 1e-5


def test_errors_are_clear(gen) -> None:
    t = inputs(gen, b=1, T=8)
    with pytest.raises(CompatError, match="non-decreasing"):
        mamba_chunk_scan_combined(
            **t, chunk_size=8, seq_idx=torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2]])
        )
    with pytest.raises(CompatError, match="disagree"):
        mamba_chunk_scan_combined(
            **t,
            chunk_size=8,
            seq_idx=torch.tensor([[0] * 4 + [1] * 4]),
            cu_seqlens=torch.tensor([0, 3, 8]),
            return_varlen_states=True,
        )
    with pytest.raises(CompatError, match="cu_seqlens must be provided"):
        mamba_chunk_scan_combined(**t, chunk_size=8, return_varlen_states=True)
    with pytest.raises(CompatError, match=re.escape("dt: expected shape (1, 8, 4)")):
        mamba_chunk_scan_combined(**{**t, "dt": t["dt"][..., :3]}, chunk_size=8)
    with pytest.raises(CompatError, match="chunk_size"):
        mamba_chunk_scan_combined(**t, chunk_size=0)
    two = inputs(gen, b=2, T=8)
    with pytest.raises(CompatError, match="batch 1"):
        mamba_chunk_scan_combined(
            **two, chunk_size=8, cu_seqlens=torch.tensor([0, 8]), return_varlen_states=True
        )
    with pytest.raises(CompatError, match="state has 3 rows"):
        d = decode_inputs(gen, 2, 4, 2, 4, 8)
        selective_state_update(
            torch.zeros(3, 4, 4, 8, dtype=torch.float64),
            d["x"],
            d["x"],
            torch.zeros(4, 4, 8),
            d["B"],
            d["C"],
        )


def test_specs_hold_only_numbers_and_flags() -> None:
    """The rendered spec is a pure function of the configuration, and it checks."""
    from ssmc.compat._specs import MambaSpec

    spec = MambaSpec(
        H=8,
        G=2,
        N=16,
        P=4,
        D=2,
        z=True,
        dt_bias=True,
        softplus=True,
        limit=True,
        initial_state=True,
        final_state=True,
        varlen=True,
    )
    checked = ssmc.parse(spec.text())
    assert checked.spec.name == "mamba_ssd" and checked.pattern.value == "MVA"
    with pytest.raises(CompatError):
        MambaSpec(H=6, G=4, N=16, P=4).text()
    with pytest.raises(CompatError):
        MambaSpec(H=True, G=1, N=16, P=4).text()  # type: ignore[arg-type]


def test_switching_doc_specs_check() -> None:
    """Every complete spec shown in docs/switching.md passes ssmc.parse."""
    text = (ROOT / "docs" / "switching.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```ssm\n(.*?)^```", text, flags=re.S | re.M)
    assert blocks
    for block in blocks:
        ssmc.parse(block)


def test_gradients_match_the_oracle(gen, reference_path) -> None:
    """Every input's gradient (and the initial state's) through the shim's transposes."""
    t = inputs(gen, b=2, T=11)
    H, P, N = 4, 4, 8
    extra = dict(
        D=torch.randn(H, P, generator=gen, dtype=torch.float64),
        z=torch.randn(2, 11, H, P, generator=gen, dtype=torch.float64),
        dt_bias=torch.randn(H, generator=gen, dtype=torch.float64) * 0.5,
        initial_states=randn_like_state(gen, 2, H, P, N),
    )
    leaves = {k: v.clone().requires_grad_() for k, v in {**t, **extra}.items()}
    w_out = torch.randn(2, 11, H, P, generator=gen, dtype=torch.float64)
    w_fin = torch.randn(2, H, P, N, generator=gen, dtype=torch.float64)
    y, h, _ = oracle(**leaves, dt_softplus=True)
    want = torch.autograd.grad((y * w_out).sum() + (h * w_fin).sum(), list(leaves.values()))
    out, final = mamba_chunk_scan_combined(
        **leaves, chunk_size=8, dt_softplus=True, return_final_states=True
    )
    got = torch.autograd.grad((out * w_out).sum() + (final * w_fin).sum(), list(leaves.values()))
    for name, g, w in zip(leaves, got, want, strict=True):
        assert rel(g, w) <= 1e-10, name
