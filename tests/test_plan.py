"""Planner: the chosen form is allowed and cheapest, forced choices are honoured or refused."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from ssmc import ir
from ssmc.cost import Cost, Launch, PlanError, Shape
from ssmc.devices import DeviceError, device
from ssmc.pipeline import parse, parse_file, with_dims
from ssmc.plan import CHUNK_CANDIDATES, explain, plan, timing

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.ssm"))
DEVICES = ("H100", "H200", "A100", "cpu-interpreter")
LENGTHS = (1, 63, 64, 1000, 4096, 16384)

MAMBA2 = """
ssm mamba2
dim H = {H}, G = {G}, N = {N}, P = {P}
input x  : [batch, seq, H, P]
input dt : [batch, seq, H]
input B  : [batch, seq, {BC}, N]
input C  : [batch, seq, {BC}, N]
param A  : [H]
output y : [batch, seq, H, P]
mask semiseparable(log_a = softplus(dt) * A)
query C
key   B
value x * softplus(dt)
"""


def mamba2(*, H: int, G: int = 1, N: int, P: int, mha: bool = False) -> ir.CheckedSpec:
    return parse(MAMBA2.format(H=H, G=G, N=N, P=P, BC="H" if mha else "G"))


@pytest.fixture(scope="module", params=EXAMPLES, ids=lambda p: p.stem)
def example(request: pytest.FixtureRequest) -> ir.CheckedSpec:
    return parse_file(request.param)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("T", LENGTHS)
def test_every_example_gets_an_allowed_form(example: ir.CheckedSpec, T: int, device: str) -> None:
    p = plan(example, Shape(batch=2 if T < 4096 else 1, seqlen=T), device=device)
    assert p.form in example.forms
    assert tuple(e.form for e in p.estimates) == example.forms
    assert all(e.time_s > 0 for e in p.estimates)
    if T > 1 or ir.Form.RECURRENT not in example.forms:
        assert p.estimate(p.form).time_s == min(e.time_s for e in p.estimates)
    assert p.reason and p.device == device


def test_every_example_explains(example: ir.CheckedSpec) -> None:
    text = explain(example, Shape(batch=4, seqlen=2048))
    lines = text.splitlines()
    assert len(lines) <= 12 and max(map(len, lines)) <= 100
    for form in example.forms:
        assert form.value in text
    chosen = plan(example, Shape(batch=4, seqlen=2048)).form.value
    assert f"→ {chosen}" in text and f"chose {chosen}" in text


def test_decode_is_recurrent(example: ir.CheckedSpec) -> None:
    p = plan(example, Shape(batch=16, seqlen=1))
    if ir.Form.RECURRENT in example.forms:
        assert p.form is ir.Form.RECURRENT and "decode" in p.reason
    else:
        assert p.form is ir.Form.QUADRATIC


def test_short_mha_scalar_decay_is_quadratic() -> None:
    spec = mamba2(H=8, N=64, P=64, mha=True)
    assert spec.pattern is ir.HeadPattern.MHA
    for batch in (1, 8):
        assert plan(spec, Shape(batch=batch, seqlen=64)).form is ir.Form.QUADRATIC


def test_long_mamba2_is_chunked() -> None:
    spec = mamba2(H=80, G=1, N=128, P=64)
    assert spec.pattern is ir.HeadPattern.MVA
    p = plan(spec, Shape(batch=1, seqlen=16384))
    assert p.form is ir.Form.CHUNKED and p.chunk_size in CHUNK_CANDIDATES
    assert f"chunked with Q = {p.chunk_size} is the fastest" in p.reason
    assert "recurrent" in p.reason


@pytest.mark.parametrize("name", ["toeplitz", "s4d", "lssl_hippo"])
def test_toeplitz_is_never_chunked_or_recurrent(name: str) -> None:
    spec = parse_file(Path(__file__).parent.parent / "examples" / f"{name}.ssm")
    forms = {plan(spec, Shape(batch=b, seqlen=T)).form for T in LENGTHS for b in (1, 8)}
    assert forms <= {ir.Form.QUADRATIC, ir.Form.CONVOLUTION}


def test_long_full_kernel_is_a_convolution_short_one_quadratic() -> None:
    spec = parse_file(Path(__file__).parent.parent / "examples" / "s4d.ssm")
    assert plan(spec, Shape(batch=4, seqlen=128)).form is ir.Form.QUADRATIC
    assert plan(spec, Shape(batch=4, seqlen=16384)).form is ir.Form.CONVOLUTION


def test_forcing_a_disallowed_form_names_the_allowed_ones() -> None:
    spec = parse_file(Path(__file__).parent.parent / "examples" / "toeplitz.ssm")
    with pytest.raises(
        PlanError, match="'chunked' is not allowed.*allowed: quadratic, convolution"
    ):
        plan(spec, Shape(batch=1, seqlen=64), form="chunked")
    with pytest.raises(PlanError, match="unknown form 'fft'"):
        plan(spec, Shape(batch=1, seqlen=64), form="fft")


def test_a_forced_form_is_honoured_and_said_so() -> None:
    spec = mamba2(H=80, N=128, P=64)
    p = plan(spec, Shape(batch=1, seqlen=16384), form=ir.Form.RECURRENT)
    assert p.form is ir.Form.RECURRENT
    assert "forced" in p.reason and "would pick chunked" in p.reason
    assert plan(spec, Shape(batch=1, seqlen=16384), form="Chunked").form is ir.Form.CHUNKED


@pytest.mark.parametrize("chunk", [8, 48, 512, 0])
def test_a_forced_chunk_is_a_power_of_two_in_range(chunk: int) -> None:
    with pytest.raises(PlanError, match="power of two in 16..256"):
        plan(mamba2(H=8, N=64, P=64), Shape(batch=1, seqlen=4096), chunk_size=chunk)


def test_a_forced_chunk_is_used() -> None:
    spec = mamba2(H=8, N=64, P=64)
    shape = Shape(batch=1, seqlen=4096)
    q64, q128 = (plan(spec, shape, form="chunked", chunk_size=q) for q in (64, 128))
    assert (q64.chunk_size, q128.chunk_size) == (64, 128)
    assert q64.estimate(ir.Form.CHUNKED).chunk_size == 64
    states = [p.estimate(ir.Form.CHUNKED).cost.state_bytes for p in (q64, q128)]
    assert states[0] == 2 * states[1]


def test_the_chunk_is_the_cheapest_candidate() -> None:
    spec, shape = mamba2(H=80, N=128, P=64), Shape(batch=1, seqlen=16384)
    chosen = plan(spec, shape, form="chunked")
    times = {
        q: plan(spec, shape, chunk_size=q).estimate(ir.Form.CHUNKED).time_s
        for q in CHUNK_CANDIDATES
    }
    assert times[chosen.chunk_size] == min(times.values())
    assert chosen.estimate(ir.Form.CHUNKED).time_s == min(times.values())
    # N = 128: longer chunks hold fewer states (bytes) but walk more earlier blocks.
    states = {
        q: plan(spec, shape, chunk_size=q).estimate(ir.Form.CHUNKED).cost.state_bytes
        for q in CHUNK_CANDIDATES
    }
    assert states[64] == 2 * states[128] == 4 * states[256]


def test_tuned_entry_overrides_chunk_and_tiles() -> None:
    spec = mamba2(H=8, N=64, P=64)
    shape = Shape(batch=1, seqlen=4096)
    tuned = {"chunk_size": 256, "block_t": 128, "block_p": 32, "num_warps": 8, "num_stages": 4}
    p = plan(spec, shape, form="chunked", tuned=tuned)
    assert (p.chunk_size, p.block_t, p.block_p, p.num_warps, p.num_stages) == (256, 128, 32, 8, 4)
    assert plan(spec, shape, form="chunked", tuned=tuned, chunk_size=128).chunk_size == 128


@pytest.mark.parametrize(
    ("tuned", "message"),
    [
        ({"BLOCK_M": 64}, "unknown tuned keys"),
        ({"block_p": 24}, "block_p = 24"),
        ({"num_warps": 3}, "num_warps = 3"),
        ({"chunk_size": 512}, "power of two in 16..256"),
        ({"chunk_size": 64, "block_t": 128}, "must divide chunk_size"),
    ],
)
def test_bad_tuned_entries_are_refused(tuned: dict[str, int], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        plan(mamba2(H=8, N=64, P=64), Shape(batch=1, seqlen=4096), form="chunked", tuned=tuned)


@pytest.mark.parametrize("form", ["quadratic", "chunked"])
def test_dot_tiles_are_powers_of_two_of_at_least_16(form: str) -> None:
    for N, P in ((16, 1), (64, 64), (128, 64), (256, 128)):
        p = plan(mamba2(H=8, N=N, P=P), Shape(batch=1, seqlen=300), form=form)
        for tile in (p.block_t, p.block_n, p.block_p):
            assert tile >= 16 and tile & (tile - 1) == 0


def test_an_unknown_device_is_refused() -> None:
    with pytest.raises(DeviceError, match="known devices"):
        plan(mamba2(H=8, N=64, P=64), Shape(batch=1, seqlen=64), device="TPU")


def test_a_faster_memory_never_makes_the_estimate_slower() -> None:
    spec = mamba2(H=80, N=128, P=64)
    shape = Shape(batch=1, seqlen=16384)
    h100, h200 = (plan(spec, shape, device=d) for d in ("H100", "H200"))
    assert h200.estimate(h200.form).time_s < h100.estimate(h100.form).time_s


def test_timing_sums_launches_each_taking_its_slowest_side() -> None:
    h100 = device("H100")
    matmul = Launch(name="dots", matmul_flops=int(798e12), bytes=int(1.5e12), programs=1000)
    copy = Launch(name="copy", bytes=int(3e12), programs=1000)
    t = timing(Cost(launches=(matmul, copy), state_bytes=0), h100)
    assert (t.compute_s, t.memory_s, t.bound) == (1.0, 1.5, "compute")
    # The host issues the first launch after host_launch_s; the second is issued while
    # the first runs, so its host time is hidden.
    assert t.total_s == pytest.approx(h100.host_launch_s + 2.0 + 2 * h100.launch_overhead_s)
    assert t.host_s == pytest.approx(h100.host_launch_s)
    few = timing(Cost(launches=(replace(matmul, bytes=0, programs=66),), state_bytes=0), h100)
    assert few.compute_s == pytest.approx(2.0)
    chain = Launch(name="scan", serial_steps=10**9)
    assert timing(Cost(launches=(chain,), state_bytes=0), h100).bound == "latency"


def test_short_launches_wait_for_the_host() -> None:
    h100 = device("H100")
    short = Launch(name="short", bytes=int(3e6), programs=264)  # 1 µs: traffic, one wave
    t = timing(Cost(launches=(short,) * 8, state_bytes=0), h100)
    assert t.bound == "host"
    assert t.total_s == pytest.approx(8 * h100.host_launch_s + 1e-6 + h100.launch_overhead_s)
    torch_ops = timing(Cost(launches=(replace(short, triton=False),) * 8, state_bytes=0), h100)
    assert torch_ops.total_s < t.total_s / 2


def test_a_recurrent_step_waits_for_its_loads() -> None:
    # docs/runs/2026-11-23-h100-autotune.json: Mamba-1's scan, 0.50 µs a token on the H100.
    h100 = device("H100")
    scan = Launch(name="scan", programs=64, serial_steps=16384, step_loads=1, resident=16)
    t = timing(Cost(launches=(scan,), state_bytes=0), h100)
    assert t.chain_s == pytest.approx(16384 * 0.50e-6, rel=0.05)


@pytest.mark.parametrize("batch", [1, 2, 8])
def test_mamba1_is_recurrent_when_short_or_wide_chunked_when_long(batch: int) -> None:
    # Measured on the H100 (docs/runs/2026-11-24-h100-autotune-mamba1-s14.json): the scan,
    # in blocks of 16 tokens, costs ~0.25 µs a token whatever the head count while it fills
    # the GPU, so it wins at short T (16 × 256, 2 × 512) and with many channels (H = 1536);
    # with H = 64 at T ≥ 4096 the chunked form wins (2.2-4.2×). 8 × 2048 is the crossover
    # (both measured 0.63 ms).
    spec = parse_file(Path(__file__).parent.parent / "examples" / "mamba1.ssm")
    wide = with_dims(spec, {"H": 1536})
    for T in (64, 256, 512):
        assert plan(spec, Shape(batch=batch, seqlen=T)).form is ir.Form.RECURRENT
    for T in (4096, 16384):
        p = plan(spec, Shape(batch=batch, seqlen=T))
        assert p.form is ir.Form.CHUNKED
        assert p.estimate(ir.Form.RECURRENT).time_s > p.estimate(ir.Form.CHUNKED).time_s
    for T in (2048, 4096, 16384):
        assert plan(wide, Shape(batch=batch, seqlen=T)).form is ir.Form.RECURRENT


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_short_mamba2_is_quadratic(batch: int) -> None:
    spec = mamba2(H=80, N=128, P=64)
    for T in (32, 64, 128, 256):
        assert plan(spec, Shape(batch=batch, seqlen=T)).form is ir.Form.QUADRATIC


def test_the_mamba2_2p7b_layer_is_chunked() -> None:
    spec = parse_file(Path(__file__).parent.parent / "examples" / "mamba2.ssm")
    for batch, T in ((8, 2048), (4, 4096), (2, 8192), (1, 16384)):
        assert plan(spec, Shape(batch=batch, seqlen=T)).form is ir.Form.CHUNKED
    # With a final state the quadratic form needs one more launch: never chunked at T = 64.
    assert plan(spec, Shape(batch=1, seqlen=64)).form is not ir.Form.CHUNKED


def test_many_tiny_programs_are_latency_bound() -> None:
    h100 = device("H100")
    # A million programs of one phase each: waves of 132 SMs × 2 resident, ~1 µs a wave.
    tiny = Launch(name="tiny", bytes=1000, programs=10**6)
    t = timing(Cost(launches=(tiny,), state_bytes=0), h100)
    assert t.bound == "latency" and t.chain_s > 1e-3
    fewer = timing(Cost(launches=(replace(tiny, resident=16),), state_bytes=0), h100)
    assert fewer.chain_s == pytest.approx(t.chain_s / 8, rel=0.01)
    walk = Launch(name="walk", programs=132, serial_steps=100, step_round_trips=1)
    scan = replace(walk, step_round_trips=0)
    assert timing(Cost(launches=(walk,), state_bytes=0), h100).chain_s > 10 * timing(
        Cost(launches=(scan,), state_bytes=0), h100
    ).chain_s
