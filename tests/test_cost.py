"""Cost model: per-form FLOPs, bytes and launches scale as the math says, shared factors once."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ssmc import cost_forms, ir
from ssmc.cost import PlanError, Shape, cost, fused_epilogue
from ssmc.cost_terms import Launch, sizes, tile_pairs
from ssmc.expr import BinOp, Op, Ref
from ssmc.pipeline import parse_file

EXAMPLES = Path(__file__).parent.parent / "examples"
SSD_FORMS = (ir.Form.RECURRENT, ir.Form.QUADRATIC, ir.Form.CHUNKED)
TOEPLITZ_FORMS = (ir.Form.QUADRATIC, ir.Form.CONVOLUTION)


def _input(name: str, *axes: ir.Size) -> ir.Tensor:
    return ir.Tensor(name=name, kind=ir.TensorKind.INPUT, shape=(ir.BATCH, ir.SEQ, *axes))


def _param(name: str, *axes: ir.Size) -> ir.Tensor:
    return ir.Tensor(name=name, kind=ir.TensorKind.PARAM, shape=axes)


def ssd(
    *,
    H: int = 8,
    G: int = 1,
    N: int = 64,
    P: int = 64,
    mva: bool = True,
    final_state: bool = False,
    varlen: bool = False,
) -> ir.CheckedSpec:
    """Mamba-2 by hand: B/C with G groups (MVA) or H heads (MHA); P bound at call time."""
    g: ir.Size = "G" if mva else "H"
    spec = ir.Spec(
        name="ssd",
        dims=(
            ir.Dim(name="H", value=H),
            ir.Dim(name="G", value=G),
            ir.Dim(name="N", value=N),
            ir.Dim(name="P", value=None),
        ),
        tensors=(
            _input("x", "H", "P"),
            _input("dt", "H"),
            _input("B", g, "N"),
            _input("C", g, "N"),
            _param("A", "H"),
        ),
        output=ir.Output(name="y", shape=(ir.BATCH, ir.SEQ, "H", "P")),
        mask=ir.ScalarSemiseparable(log_a=BinOp(op=Op.MUL, lhs=Ref(name="dt"), rhs=Ref(name="A"))),
        query=Ref(name="C"),
        key=Ref(name="B"),
        value=Ref(name="x"),
        final_state=final_state,
        varlen=varlen,
    )
    heads = ir.HeadCounts(output="H", query=g, key=g, value="H", decay="H")
    return ir.CheckedSpec(
        spec=spec,
        forms=SSD_FORMS,
        heads=heads,
        pattern=ir.HeadPattern.MVA if mva else ir.HeadPattern.MHA,
        state_size="N",
        head_dim="P",
        value_factors=None,
    )


def toeplitz(*, H: int = 8, L: int = 64, P: int = 32) -> ir.CheckedSpec:
    """A learned Toeplitz kernel K [H, L] with a window of L taps."""
    spec = ir.Spec(
        name="toeplitz",
        dims=(ir.Dim(name="H", value=H), ir.Dim(name="L", value=L), ir.Dim(name="P", value=P)),
        tensors=(_input("x", "H", "P"), _param("K", "H", "L")),
        output=ir.Output(name="y", shape=(ir.BATCH, ir.SEQ, "H", "P")),
        mask=ir.Toeplitz(kernel=ir.LearnedKernel(kernel=Ref(name="K"))),
        query=None,
        key=None,
        value=Ref(name="x"),
    )
    heads = ir.HeadCounts(output="H", query=None, key=None, value="H", decay="H")
    return ir.CheckedSpec(
        spec=spec,
        forms=TOEPLITZ_FORMS,
        heads=heads,
        pattern=ir.HeadPattern.MHA,
        state_size=None,
        head_dim="P",
        value_factors=None,
    )


def shape(T: int, batch: int = 1, **kw: int) -> Shape:
    return Shape(batch=batch, seqlen=T, dims={"P": 64}, **kw)


@pytest.mark.parametrize("form", SSD_FORMS, ids=lambda f: f.value)
def test_every_form_has_a_positive_cost(form: ir.Form) -> None:
    c = cost(ssd(), form, shape(1000))
    assert c.flops > 0 and c.bytes > 0 and c.kernels >= 1
    assert all(k.programs >= 1 and k.bytes > 0 for k in c.launches)


def test_recurrent_is_scalar_work_that_moves_only_the_core_rows() -> None:
    T, H, N, P = 256, 8, 64, 64
    c = cost(ssd(H=H, N=N), ir.Form.RECURRENT, shape(T))
    assert c.matmul_flops == 0
    assert c.scalar_flops >= 4 * T * H * N * P
    core = T * (2 * H * P * 2 + 2 * N * 2 + H * 4)  # x, y, B, C (bf16), log a (fp32)
    prologue = T * (H * 2 + H * 4)  # log a = dt * A: dt read, log a written
    assert c.bytes == core + prologue
    assert c.state_bytes == H * N * P * 4
    assert [k.name for k in c.launches] == ["prologue", "recurrent"]
    assert c.launches[1].serial_steps == T


def test_chunked_is_linear_in_T() -> None:
    short, long = (cost(ssd(), ir.Form.CHUNKED, shape(T)) for T in (4096, 8192))
    assert long.matmul_flops == 2 * short.matmul_flops
    assert long.flops / short.flops == pytest.approx(2, rel=1e-3)
    assert long.bytes / short.bytes == pytest.approx(2, rel=1e-3)
    assert long.state_bytes == 2 * short.state_bytes


def test_quadratic_is_quadratic_in_T() -> None:
    short, long = (cost(ssd(), ir.Form.QUADRATIC, shape(T)) for T in (4096, 8192))
    assert long.matmul_flops / short.matmul_flops == pytest.approx(4, rel=0.02)
    assert 3 < long.bytes / short.bytes < 4.5


@pytest.mark.parametrize("dtype_bytes", [2, 4])
def test_chunk_states_are_written_and_read_once(dtype_bytes: int) -> None:
    T, Q, H, N, P = 1024, 64, 8, 64, 64
    c = cost(ssd(H=H, N=N), ir.Form.CHUNKED, shape(T, dtype_bytes=dtype_bytes), chunk_size=Q)
    # The state entering each chunk is stored in C's dtype when 16-bit, else fp32.
    states = (T // Q) * H * N * P * dtype_bytes
    assert c.state_bytes == states
    walk, cb, scan = c.launches[1:]
    rows = T * (N * dtype_bytes + H * P * dtype_bytes + H * 4)  # B, x, log a
    assert walk.bytes == rows + states
    cb_bytes = (T // Q) * Q * Q * dtype_bytes
    assert cb.bytes == T * 2 * N * dtype_bytes + cb_bytes
    assert scan.bytes == T * (N + 2 * H * P) * dtype_bytes + T * H * 4 + cb_bytes + states


def test_the_scalar_chunked_form_is_three_launches() -> None:
    c = cost(ssd(), ir.Form.CHUNKED, shape(4096), chunk_size=128)
    assert [k.name for k in c.launches] == [
        "prologue",
        "chunked_state",
        "chunked_scan_cb",
        "chunked_scan",
    ]
    walk = c.launches[1]
    # One walker per (sequence, head, N × P tile); 128-token steps when they are few.
    assert (walk.programs, walk.serial_steps, walk.step_round_trips) == (8, 4096 // 128, 1)
    many = cost(ssd(H=64), ir.Form.CHUNKED, shape(4096, batch=8), chunk_size=128).launches[1]
    assert (many.programs, many.serial_steps) == (512, 4096 // 64)


def test_the_diagonal_chunked_form_is_five_launches() -> None:
    spec = parse_file(EXAMPLES / "mamba1.ssm")
    c = cost(spec, ir.Form.CHUNKED, Shape(batch=2, seqlen=4096), chunk_size=64)
    core = [k.name for k in c.launches if k.name.startswith("chunked")]
    assert core == [
        "chunked_diag_cumsum",
        "chunked_diag_state",
        "chunked_diag_intra",
        "chunked_diag_intra_rest",
        "chunked_diag_scan",
    ]
    # the whole-chunk intra: one program per chunk and head (one [Q, N] × [N, Q] dot); the
    # sub-chunk launch after it, four programs per chunk and head, finds them written
    intra, rest = c.launches[3], c.launches[4]
    assert intra.programs == 2 * 64 * 64 and rest.programs == 4 * intra.programs
    assert c.launches[-1].name == "epilogue"
    # Every chunk's fp32 state: 2 · 64 chunks · 64 heads · N = 16 · P = 1.
    assert c.state_bytes == 2 * 64 * 64 * 16 * 1 * 4


def test_the_chunked_scan_applies_skip_and_gate_in_its_store() -> None:
    spec = parse_file(EXAMPLES / "mamba2.ssm")
    s = Shape(batch=2, seqlen=1024)
    chunked = cost(spec, ir.Form.CHUNKED, s, chunk_size=128)
    recurrent = cost(spec, ir.Form.RECURRENT, s)
    assert "epilogue" not in [k.name for k in chunked.launches]
    assert recurrent.launches[-1].name == "epilogue"
    # y (fp32, H·P per token) is neither written by the scan nor read back; the scan
    # reads what the epilogue read (x, z) and writes out instead.
    epilogue = recurrent.launches[-1]
    unfused = cost_forms.chunked(sizes(spec, s), 128)[-1]
    y_bytes = 2 * 1024 * 80 * 64 * 4
    assert chunked.launches[-1].bytes == unfused.bytes + epilogue.bytes - 2 * y_bytes


def test_mva_computes_c_bt_once_per_group() -> None:
    H, G, N, T, Q = 8, 2, 64, 2048, 64
    mva = cost(ssd(H=H, G=G, N=N, mva=True), ir.Form.CHUNKED, shape(T), chunk_size=Q)
    mha = cost(ssd(H=H, G=G, N=N, mva=False), ir.Form.CHUNKED, shape(T), chunk_size=Q)
    # What MVA saves is exactly the C Bᵀ of the H − G heads that share a group's block.
    assert mha.matmul_flops - mva.matmul_flops == (H - G) * (T // Q) * 2 * Q * Q * N


def test_the_quadratic_kernel_recomputes_c_bt_per_head() -> None:
    mva = cost(ssd(G=2, mva=True), ir.Form.QUADRATIC, shape(2048))
    mha = cost(ssd(G=2, mva=False), ir.Form.QUADRATIC, shape(2048))
    assert mva.matmul_flops == mha.matmul_flops


def test_final_state_adds_work_to_the_quadratic_form() -> None:
    plain = cost(ssd(), ir.Form.QUADRATIC, shape(512))
    with_state = cost(ssd(final_state=True), ir.Form.QUADRATIC, shape(512))
    assert [k.name for k in with_state.launches] == ["prologue", "quadratic", "quadratic_state"]
    assert with_state.launches[:2] == plain.launches
    state = with_state.launches[2]
    # One more pass over the key rows (B, x, log a) and the final state written.
    assert state.bytes == 512 * (64 * 2 + 8 * 64 * 2 + 8 * 4) + 8 * 64 * 64 * 4
    assert state.matmul_flops == 8 * 8 * 2 * 64 * 64 * 64


def test_windowed_toeplitz_quadratic_is_banded_hence_linear() -> None:
    short, long = (
        cost(toeplitz(L=64), ir.Form.QUADRATIC, Shape(batch=2, seqlen=T)) for T in (4096, 8192)
    )
    assert long.matmul_flops / short.matmul_flops == pytest.approx(2, rel=0.01)


def test_convolution_is_n_log_n() -> None:
    short, long = (
        cost(toeplitz(L=8192), ir.Form.CONVOLUTION, Shape(batch=2, seqlen=T)) for T in (4096, 8192)
    )
    assert short.matmul_flops == 0
    assert 2 < long.scalar_flops / short.scalar_flops < 2.3


def test_packed_sequences_cost_less_than_one_long_one() -> None:
    spec = ssd(varlen=True)
    packed = cost(spec, ir.Form.QUADRATIC, Shape(batch=1, seqlen=4096, dims={"P": 64}, num_seqs=4))
    single = cost(spec, ir.Form.QUADRATIC, shape(4096))
    assert packed.matmul_flops < single.matmul_flops / 3


def test_shape_errors() -> None:
    with pytest.raises(PlanError, match="dim P is bound at call time"):
        cost(ssd(), ir.Form.CHUNKED, Shape(batch=1, seqlen=64))
    with pytest.raises(PlanError, match="N = 64 in the spec"):
        cost(ssd(), ir.Form.CHUNKED, Shape(batch=1, seqlen=64, dims={"P": 64, "N": 32}))
    with pytest.raises(PlanError, match="not varlen"):
        cost(ssd(), ir.Form.CHUNKED, Shape(batch=1, seqlen=64, dims={"P": 64}, num_seqs=2))
    with pytest.raises(PlanError, match="batch = 1"):
        Shape(batch=2, seqlen=64, num_seqs=2)
    with pytest.raises(PlanError, match="≥ 1"):
        Shape(batch=1, seqlen=0)


def test_a_disallowed_form_is_refused() -> None:
    with pytest.raises(PlanError, match="allowed: quadratic, convolution"):
        cost(toeplitz(), ir.Form.CHUNKED, Shape(batch=1, seqlen=64))


def test_shapes_hash_by_value() -> None:
    a = Shape(batch=1, seqlen=8, dims={"P": 64, "N": 16})
    b = Shape(batch=1, seqlen=8, dims={"N": 16, "P": 64})
    assert a == b and hash(a) == hash(b)


@pytest.mark.parametrize("window", [1, 15, 16, 17, 64, 100, 10_000])
@pytest.mark.parametrize("nb", [1, 2, 7, 40])
def test_tile_pairs_match_a_direct_count(nb: int, window: int) -> None:
    bt = 16
    direct = sum(
        1
        for i in range(nb)
        for j in range(i + 1)
        if (i - j) * bt - (bt - 1) <= window - 1  # some (row, column) of the tile is in the band
    )
    assert tile_pairs(nb, bt, window) == direct


def test_the_fused_epilogue_rule_is_the_renderers() -> None:
    from ssmc import roles

    for path in sorted(EXAMPLES.glob("*.ssm")):
        checked = parse_file(path)
        assert fused_epilogue(checked) == (roles.fused_epilogue(checked) is not None), path


def test_a_walk_of_few_programs_is_cut_as_the_launcher_cuts_it() -> None:
    """The chunked state walk's chain at batch 1 and few heads: cut into ⌊SMs / walkers⌋
    segments (at most 8, each ≥ 8 chunks) on the device, as `walk_splits` does; a walk of
    more than half the SMs' worth of programs is not cut."""
    from ssmc.cost_time import launch_sides, walk_cut
    from ssmc.devices import device

    h100 = device("H100")
    def walk(checked: ir.CheckedSpec, at: Shape) -> Launch:
        (state,) = (k for k in cost(checked, ir.Form.CHUNKED, at).launches
                    if k.name == "chunked_state")
        return state

    few = walk(ssd(H=16), shape(16384))
    many = walk(ssd(H=80), shape(2048, batch=8))
    assert few.name == many.name == "chunked_state"
    programs, steps = walk_cut(few, h100)
    assert (programs, steps) == (few.programs * 8, few.serial_steps // 8)
    assert walk_cut(many, h100) == (many.programs, many.serial_steps)
    uncut = launch_sides(dataclasses.replace(few, segment_steps=0), h100, 1e-6)["latency"]
    assert launch_sides(few, h100, 1e-6)["latency"] < uncut / 4
    short = walk(ssd(H=16), shape(256))
    assert walk_cut(short, h100) == (short.programs, short.serial_steps)  # < 2 × 8 chunks
