"""ssmc bench: on a CPU it checks every series against fp64, times it, reports and plots.

The GPU figures themselves come from scripts/gpu_check.sh (docs/benchmarks.md); here the
same code runs at tiny sizes under the Triton interpreter, and the peer mappings run
against stand-ins written from the peers' documented semantics.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ssmc import bench
from ssmc.bench import BenchConfig, failed, run_bench
from ssmc.bench_peers import Peers
from ssmc.bench_report import plot, table
from ssmc.cli import build_parser, main
from ssmc.errors import SsmcError
from ssmc.pipeline import parse_file, with_dims

ROOT = Path(__file__).parent.parent
SMALL = {"H": 2, "N": 4, "P": 4}


def _spec(name: str) -> str:
    return str(ROOT / "examples" / f"{name}.ssm")


@pytest.mark.interpret
def test_cpu_run_checks_forward_and_gradients() -> None:
    report = run_bench(BenchConfig(file=_spec("retnet"), seqlens=(8,), dims=SMALL, cpu_reps=1,
                                   forms=("chunked", "planner"), backward=True, progress=False))
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["roofline"] is None
    assert any("peers skipped on cpu" in n for n in report["notes"])
    assert [r["series"] for r in report["results"]] == ["ssmc chunked", "ssmc planner"]
    for row in report["results"]:
        assert row["ok"] and row["error"] is None
        assert set(row["errors"]) == {"o", "final_state", "dq", "dk", "dv", "dgamma"}
        assert 0 < row["max_rel_err"] <= row["bound"] == 1e-5
        assert row["fwd"]["plain_ms"] > 0 and row["fwd_bwd"]["plain_ms"] > 0
        assert row["fwd"]["graph_ms"] is None and row["batch"] == 1 and row["T"] == 8
    assert report["results"][0]["form"] == "chunked"
    json.dumps(report)
    assert failed(report) == []


@pytest.mark.interpret
def test_a_wrong_result_fails_the_run(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    real = bench.reference

    def off_by_one_percent(checked: Any, *a: Any, **kw: Any) -> Any:
        def run(**tensors: Tensor) -> tuple[Tensor, Tensor | None]:
            y, state = real(checked, *a, **kw)(**tensors)
            return y * 1.01, state
        return run

    monkeypatch.setattr(bench, "reference", off_by_one_percent)
    code = main(["bench", _spec("retnet"), "-T", "8", "--forms", "chunked", "--no-progress",
                 *(f"--dim={k}={v}" for k, v in SMALL.items())])
    captured = capsys.readouterr()
    assert code == 1
    assert "FAILED ssmc chunked at batch 1, T 8: error 9.90e-03 > 1e-05" in captured.err  # 0.01 / 1.01
    assert "9.9e-03!" in captured.out


@pytest.mark.interpret
def test_cli_writes_json_and_png_and_replots(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    report_path, png_path = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["bench", _spec("gla"), "-T", "4,8", "--forms", "recurrent", "--peers", "none",
                 "--json", str(report_path), "--no-progress",
                 *(f"--dim={k}={v}" for k, v in SMALL.items())])
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["spec"] == "gla" and report["dims"] == {"H": 2, "N": 4, "P": 4}
    assert [(r["batch"], r["T"], r["ok"]) for r in report["results"]] == [(1, 4, True), (1, 8, True)]
    assert "peers" not in " ".join(report["notes"])
    capsys.readouterr()
    pytest.importorskip("matplotlib")
    assert main(["bench", str(report_path), "--png", str(png_path)]) == 0
    assert "ssmc recurrent" in capsys.readouterr().out
    assert png_path.stat().st_size > 10_000


def test_bad_requests_are_user_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", _spec("toeplitz"), "--forms", "chunked", "--no-progress"]) == 2
    assert "no form chunked for this spec; choose from" in capsys.readouterr().err
    assert main(["bench", _spec("retnet"), "-T", "8,x"]) == 2
    assert "expected integers" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", _spec("retnet"), "--device", "cuda"]) == 2
        assert "torch sees no CUDA GPU" in capsys.readouterr().err
    with pytest.raises(SsmcError, match="one per sequence length"):
        bench._shapes(BenchConfig(file="", seqlens=(8, 16, 32), batches=(1, 2)),
                      torch.device("cpu"))


def test_dtype_aliases() -> None:
    parse = build_parser().parse_args
    assert parse(["bench", "f.ssm", "--dtype", "bf16"]).dtype == "bfloat16"
    assert parse(["bench", "f.ssm", "--dtype", "fp32"]).dtype == "float32"
    assert parse(["bench", "f.ssm"]).dtype == "bfloat16"


def test_shapes() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bench._shapes(BenchConfig(file=""), cpu) == [(1, 16), (1, 32)]
    assert bench._shapes(BenchConfig(file="", seqlens=(2048, 16384)), cuda) == [(8, 2048), (1, 16384)]
    assert bench._shapes(BenchConfig(file="", seqlens=(4, 8), batches=(3,)), cpu) == [(3, 4), (3, 8)]
    assert bench._shapes(BenchConfig(file="", seqlens=(4, 8), tokens=16), cpu) == [(4, 4), (2, 8)]


def test_decay_inputs_and_params_stay_fp32() -> None:
    """As Mamba-2 is run: bf16 (here fp16) x, B, C, z; fp32 dt, A, dt_bias, D."""
    checked = with_dims(parse_file(_spec("mamba2")), SMALL)
    assert bench.fp32_tensors(checked) == {"A", "D", "dt", "dt_bias"}
    shape = bench._Shape(checked, 1, 4, torch.float16, torch.device("cpu"), BenchConfig(file=""))
    wide = {k for k, v in shape.inputs.items() if v.dtype == torch.float32}
    assert wide == {"A", "D", "dt", "dt_bias"} and shape.inputs["x"].dtype == torch.float16
    y_bytes, state_bytes = 1 * 4 * 2 * 4 * 2, 1 * 2 * 4 * 4 * 4  # y fp16, final state fp32
    assert shape.io_bytes == sum(t.nbytes for t in shape.inputs.values()) + y_bytes + state_bytes
    assert shape.bound == 5e-3


# ---------------------------------------------------------------- peers, through stand-ins


def _scan(q: Tensor, k: Tensor, v: Tensor, log_a: Tensor | None) -> Tensor:
    """o_t = S_tᵀ q_t, S_t = a_t ⊙ S_{t−1} + k_t v_tᵀ; q, k [b, T, H, K], log_a [b, T, H(, K)]."""
    b, T, H, K = k.shape
    S = q.new_zeros(b, H, K, v.shape[-1], dtype=torch.float32)
    out = []
    for t in range(T):
        if log_a is not None:
            a = log_a[:, t].float().exp()
            S = S * (a[..., None, None] if a.dim() == 2 else a[..., None])
        S = S + k[:, t, :, :, None].float() * v[:, t, :, None, :].float()
        out.append(torch.einsum("bhk,bhkv->bhv", q[:, t].float(), S))
    return torch.stack(out, 1).to(v.dtype)


def fake_mamba(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
               D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
               dt_softplus: bool = False, return_final_states: bool = False) -> Any:
    """mamba_chunk_scan_combined as its docstring describes it (no chunking, no limits)."""
    H = x.shape[2]
    dt = dt + dt_bias if dt_bias is not None else dt
    dt = F.softplus(dt) if dt_softplus else dt
    B, C = (t.repeat_interleave(H // t.shape[2], dim=2) for t in (B, C))
    y = _scan(C, B, x * dt[..., None], dt * A)
    if D is not None:
        y = y + D[:, None] * x
    if z is not None:
        y = y * F.silu(z)
    return (y, None) if return_final_states else y


def fake_fla(kind: str) -> Any:
    def run(q: Tensor, k: Tensor, v: Tensor, g: Tensor | None = None, scale: float = 1.0,
            output_final_state: bool = False, normalize: bool = True) -> tuple[Tensor, None]:
        assert kind != "linear_attn" or normalize is False
        return _scan(q * scale, k, v, g), None
    return run


@pytest.mark.parametrize(("name", "expected"), [
    ("mamba2", {"mamba_ssm": "spec's own tensors", "fla chunk_simple_gla": "core",
                "sdpa (softmax, causal)": None}),
    ("mqa", {"fla chunk_simple_gla": "core", "sdpa (softmax, causal)": None}),
    ("retnet", {"mamba_ssm": "Δ = −log a", "fla chunk_simple_gla": "core",
                "sdpa (softmax, causal)": None}),
    ("gla", {"fla chunk_gla": "core", "sdpa (softmax, causal)": None}),
    ("linear_attention", {"fla chunk_linear_attn": "core", "sdpa (softmax, causal)": None}),
    ("toeplitz", {}),
    ("mamba2_2ss", {}),
])
def test_peer_mappings_match_the_reference(name: str, expected: dict[str, str | None]) -> None:
    declared = {d.name for d in parse_file(_spec(name)).spec.dims}
    dims = {k: v for k, v in {"H": 4, "N": 4, "P": 4}.items() if k in declared}
    checked = with_dims(parse_file(_spec(name)), dims)
    config = BenchConfig(file="", backward=True, cpu_reps=1)
    shape = bench._Shape(checked, 2, 9, torch.float32, torch.device("cpu"), config)
    peers = Peers(found={"mamba": fake_mamba, "sdpa": F.scaled_dot_product_attention,
                         "fla": {k: fake_fla(k) for k in ("simple_gla", "gla", "linear_attn")}})
    rows = [shape.peer(candidates, None) for candidates in peers.calls(shape.case)]
    assert {r["series"] for r in rows} == set(expected)
    for row in rows:
        assert row["error"] is None, row
        assert expected[row["series"]] is None or expected[row["series"]] in row["note"]
        if expected[row["series"]] is None:
            assert row["ok"] is None and row["max_rel_err"] is None
        else:
            assert row["ok"] and row["max_rel_err"] < 1e-5, row
        assert row["fwd"]["plain_ms"] > 0 and row["fwd_bwd"]["plain_ms"] > 0


def test_a_wrong_peer_is_flagged_not_fatal() -> None:
    checked = with_dims(parse_file(_spec("retnet")), SMALL)
    shape = bench._Shape(checked, 1, 6, torch.float32, torch.device("cpu"),
                         BenchConfig(file="", cpu_reps=1))

    def wrong(*args: Any, **kw: Any) -> Any:
        y, state = fake_mamba(*args, **kw)
        return 2 * y, state

    [candidates] = Peers(found={"mamba": wrong}).calls(shape.case)
    row = shape.peer(candidates, None)
    assert row["ok"] is False and row["max_rel_err"] > 0.5 and row["fwd"] is not None
    report = {"results": [row]}
    assert failed(report) == []  # a peer's mismatch is reported, it does not fail the run


# ---------------------------------------------------------------- report


def _synthetic() -> dict[str, Any]:
    rows = []
    for T in (512, 2048, 8192):
        for series, kind, ms in (("ssmc chunked", "ssmc", 0.4), ("ssmc planner", "ssmc", 0.5),
                                 ("mamba_ssm", "peer", 0.8)):
            timing = {"plain_ms": ms * 1.5, "graph_ms": ms, "peak_mib": 300.0, "graph_error": None}
            rows.append({"series": series, "kind": kind, "batch": 16384 // T, "T": T,
                         "tokens": 16384, "io_MB": 349.0, "form": "chunked", "fwd": timing,
                         "fwd_bwd": {**timing, "graph_ms": 3 * ms}, "errors": {"y": 2e-3},
                         "max_rel_err": 2e-3, "bound": 1e-2, "ok": True, "error": None,
                         "note": "", "floor_ms": 0.116, "of_floor": 0.116 / ms})
    return {"spec": "mamba2", "device": "NVIDIA H100 80GB HBM3", "date": "2026-11-23T09:00Z",
            "ssmc": "0.1.0", "torch": "2.11", "triton": "3.6", "dtype": "bfloat16",
            "roofline": {"copy_GBps": 3020.0, "bf16_matmul_TFLOPs": 700.0}, "notes": [],
            "results": rows}


def test_table_shows_ratios_floor_and_memory() -> None:
    text = table(_synthetic())
    assert "roofline: copy 3020 GB/s, bf16 matmul 700 TFLOP/s" in text
    line = next(x for x in text.splitlines() if "mamba_ssm" in x and " 2048 " in x)
    assert line.split()[-5:] == ["2.400", "300", "2.0e-03", "14%", "2.00x"]


def test_plot_draws_time_versus_T(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    out = plot(_synthetic(), tmp_path / "b.png")
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 1000
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or ()) > 50


def test_bench_ssd_script_is_a_thin_wrapper(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("bench_ssd", ROOT / "scripts" / "bench_ssd.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    seen: list[list[str]] = []
    monkeypatch.setattr(module, "ssmc_main", lambda argv: seen.append(argv) or 0)
    assert module.main(["--mamba-src", "/src/mamba_ssm-2.2.4", "--json", "o.json"]) == 0
    [argv] = seen
    assert argv[:2] == ["bench", str(ROOT / "examples" / "mamba2.ssm")]
    assert "--tokens" in argv and "16384" in argv and argv[argv.index("--mamba-src") + 1] == \
        "/src/mamba_ssm-2.2.4"


def test_reference_by_row_groups_equals_one_pass(monkeypatch) -> None:
    """The fp64 reference cut into single batch rows (as at GPU sizes) gives the one-pass
    output, final state and gradients: per-row tensors' gradients joined, parameters' summed."""
    checked = with_dims(parse_file(_spec("mamba2")), SMALL)
    generator = torch.Generator().manual_seed(3)
    exact = {k: v.double() for k, v in bench.random_inputs(
        checked, batch=3, seqlen=12, dtype=torch.float32, generator=generator).items()
        if k != "initial_state"}
    grad_y = torch.randn(3, 12, SMALL["H"], SMALL["P"], generator=generator)
    whole = bench._reference_by_rows(checked, exact, grad_y, 4, True)
    monkeypatch.setattr(bench, "_REFERENCE_ELEMENTS", 1)
    rows = bench._reference_by_rows(checked, exact, grad_y, 4, True)
    torch.testing.assert_close(rows[0], whole[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(rows[1], whole[1], rtol=1e-12, atol=0)
    assert set(rows[2]) == set(whole[2]) == set(exact)
    for name, grad in whole[2].items():
        assert grad.abs().max() > 0
        torch.testing.assert_close(rows[2][name], grad, rtol=1e-10, atol=1e-12)


def test_reference_chunk_bounds_a_diagonal_decays_mask() -> None:
    """The fp64 reference's chunk: T / 32 (≥ 64) for a scalar decay; a diagonal decay's
    Q × Q mask per state dim keeps T·Q·H·N within the row budget (GLA at T = 16384)."""
    gla = with_dims(parse_file(ROOT / "examples" / "gla.ssm"), {"H": 16, "N": 128, "P": 128})
    mamba2 = with_dims(parse_file(ROOT / "examples" / "mamba2.ssm"),
                       {"H": 80, "G": 1, "N": 128, "P": 64})
    dims = {"H": 16, "N": 128, "P": 128}
    assert bench._reference_chunk(mamba2, 16384, {"H": 80, "G": 1, "N": 128, "P": 64}) == 512
    assert bench._reference_chunk(mamba2, 512, {"H": 80, "G": 1, "N": 128, "P": 64}) == 64
    for T in (512, 2048, 16384):
        chunk = bench._reference_chunk(gla, T, dims)
        assert 16 <= chunk <= max(64, T // 32)
        assert T * chunk * 16 * 128 <= bench._REFERENCE_ELEMENTS or chunk == 16
    assert bench._reference_chunk(gla, 16384, dims) == 16
