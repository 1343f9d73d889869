"""The denominators of MFU and of the bandwidth fraction (train/core/peak.py): a CPU's peak is
measured once per machine and setting, cached, reused, and measured again elsewhere."""

import json

import pytest
import torch

import train.core.peak as peak

CPU = torch.device("cpu")


@pytest.fixture
def fake_matmul(tmp_path, monkeypatch) -> list:
    """A cache in tmp_path and a 'measurement' that records its calls: call i gives i GFLOP/s."""
    monkeypatch.setenv("HANDGPT_CACHE", str(tmp_path))
    calls = []

    def measure(device, dtype, seconds):
        calls.append(seconds)
        return 1e9 * len(calls)

    monkeypatch.setattr(peak, "measured_matmul_flops", measure)
    return calls


def test_the_peak_is_measured_once_then_read_back(fake_matmul, tmp_path):
    first = peak.peak_flops(CPU, torch.float32)
    n = peak.MEASURE_REPEATS
    assert len(fake_matmul) == n and all(s >= 1.0 for s in fake_matmul)  # several, long runs
    assert first.flops == n * 1e9  # the best of them
    assert "measured now" in first.source and str(tmp_path) in first.source
    again = peak.peak_flops(CPU, torch.float32)
    assert len(fake_matmul) == n  # not measured again
    assert again.flops == first.flops and "cached in" in again.source
    assert "MFU against 5 GFLOP/s" in again.describe()


def test_another_machine_or_setting_measures_again(fake_matmul, tmp_path, monkeypatch):
    n = peak.MEASURE_REPEATS
    here = peak.peak_flops(CPU, torch.float32).flops
    monkeypatch.setattr(peak, "cpu_model", lambda: "Some Other CPU 9000")
    there = peak.peak_flops(CPU, torch.float32).flops
    assert len(fake_matmul) == 2 * n and there != here
    assert peak.peak_flops(CPU, torch.bfloat16).flops not in (here, there)  # another dtype
    assert len(fake_matmul) == 3 * n
    entries = json.loads((tmp_path / "peak_flops.json").read_text())
    assert len(entries) == 3 and any("Some Other CPU 9000" in k for k in entries)
    monkeypatch.undo()  # back on the first machine: its figure, without measuring
    monkeypatch.setenv("HANDGPT_CACHE", str(tmp_path))
    assert peak.peak_flops(CPU, torch.float32).flops == here


def test_the_key_names_threads_dtype_and_torch():
    before = torch.get_num_threads()
    one = peak.cache_key(CPU, torch.float32)
    try:
        torch.set_num_threads(2)
        two = peak.cache_key(CPU, torch.float32)
    finally:
        torch.set_num_threads(before)
    assert one != two and "1 threads" in one and torch.__version__ in one
    assert one != peak.cache_key(CPU, torch.bfloat16)
    assert peak.cpu_model() in one


def test_a_damaged_cache_is_measured_again(fake_matmul, tmp_path):
    (tmp_path / "peak_flops.json").write_text("{not json")
    assert peak.peak_flops(CPU, torch.float32).flops > 0
    assert len(fake_matmul) == peak.MEASURE_REPEATS
    assert json.loads((tmp_path / "peak_flops.json").read_text())  # rewritten, readable


def test_gpus_use_the_datasheet_and_an_override_wins(fake_matmul, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    gpu = peak.peak_flops(torch.device("cuda", 0), torch.bfloat16)
    assert gpu.flops == 989e12 and "datasheet" in gpu.source and not fake_matmul
    given = peak.peak_flops(CPU, torch.float32, override_tflops=2.5)
    assert given.flops == 2.5e12 and "peak_tflops=2.5" in given.source and not fake_matmul


def test_read_bandwidth_is_a_plausible_figure():
    bw = peak.read_bandwidth(CPU, repeats=2, mib=16)
    assert 1e8 < bw < 1e13  # between 0.1 GB/s and 10 TB/s
