"""Device table: lookup by name, GPU-name mapping, detection without a GPU."""

from __future__ import annotations

import pytest
import torch

from ssmc.devices import DEVICES, DeviceError, detect, device, from_gpu_name


def test_measured_rates() -> None:
    h100, h200, a100 = device("H100"), device("H200"), device("A100")
    assert (h100.matmul_flops, h100.mem_bandwidth, h100.sm_count) == (798e12, 3.0e12, 132)
    assert (h200.matmul_flops, h200.mem_bandwidth, h200.sm_count) == (790e12, 4.3e12, 132)
    assert (a100.matmul_flops, a100.mem_bandwidth, a100.sm_count) == (312e12, 1.9e12, 108)
    for d in DEVICES.values():
        assert d.matmul_flops >= d.fp32_flops > 0
        assert d.launch_overhead_s > 0 and d.step_latency_s > 0


def test_lookup_ignores_case() -> None:
    assert device("h100") is device("H100")
    assert device(" CPU-Interpreter ").name == "cpu-interpreter"


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(
        DeviceError, match="unknown device 'B200'.*H100, H200, A100, cpu-interpreter"
    ):
        device("B200")


@pytest.mark.parametrize(
    ("gpu", "entry"),
    [
        ("NVIDIA H100 80GB HBM3", "H100"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
    ],
)
def test_gpu_names_map_to_entries(gpu: str, entry: str) -> None:
    assert from_gpu_name(gpu) is device(entry)


def test_unknown_gpu_borrows_h100_rates_with_a_note() -> None:
    d = from_gpu_name("NVIDIA L4")
    assert d.name == "NVIDIA L4"
    assert d.matmul_flops == device("H100").matmul_flops
    assert "H100 rates" in d.note


def test_detect_without_gpu_is_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert detect().name == "cpu-interpreter"


def test_detect_under_interpret_is_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert detect().name == "cpu-interpreter"


def test_detect_maps_the_cuda_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    assert detect() is device("H200")
