"""The machine's limits, the denominators of every efficiency figure we print.

    MFU                = model FLOPs per token * tokens/s / peak FLOP/s
    bandwidth fraction = tokens/s / (read bytes/s / bytes of weights per token)

Peak FLOP/s of one device (`peak_flops`), in this order:
  1. peak_tflops given in the config: the user's figure;
  2. a GPU in the datasheet table below: its dense bf16/fp16 tensor-core peak;
  3. anything else (CPUs, unknown GPUs): measured once per machine, then read back.

Why measure once and cache: a peak measured at every start with a short matmul follows
whatever else the machine is doing. On a shared machine a 0.3-second measurement gave
169 to 422 GFLOP/s for the same setting, so the same throughput read as 17% or 83% MFU.
The measurement is the best of several one-second runs of a 2048 x 2048 matmul, timed on
a CPU by the threads' CPU time (so that other programs do not lower it), stored
in ~/.cache/handgpt/peak_flops.json (or $HANDGPT_CACHE) under a key naming everything
that changes it: the device (CPU model and instruction set, or GPU name), the core and
thread counts, the dtype and the torch version. Another machine, another thread count
or another torch gives another key, so a new measurement; delete the file to measure
again on a quieter machine. Every run says which peak it used (`Peak.source`).
"""

import json
import os
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from errors import UserError

from .files import atomic_write_text

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) of common GPUs, for MFU. Matched by substring
# of torch.cuda.get_device_name(); the first match wins, so longer names come first.
GPU_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "A6000": 155.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10": 125.0,
    "4090": 165.0,
    "3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
}
MEASURE_REPEATS = 5  # the cached peak is the best of this many runs ...
MEASURE_SECONDS = 1.0  # ... of at least this long each


@dataclass(frozen=True)
class Peak:
    """A peak FLOP/s and where it came from (printed beside every MFU)."""

    flops: float
    source: str

    def describe(self) -> str:
        return f"MFU against {self.flops / 1e9:,.0f} GFLOP/s ({self.source})"


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """FLOP/s of a 2048 x 2048 matmul on `device` in `dtype`, over at least `seconds`.

    On a CPU the time is the threads' own CPU time, (process CPU seconds) / threads: what
    the cores do while they run, however many other programs share them. Wall time would
    measure this process's share of a busy machine instead (on the project's 2-core machine,
    with others training: 30-43 GFLOP/s by the wall clock, 59-67 by CPU time, one thread).
    """
    n = 2048
    g = torch.Generator(device=device).manual_seed(0)  # leave the global RNG (dropout) alone
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b  # warm-up
    _sync(device)
    count, start, cpu_start = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
        _sync(device)
    busy = time.perf_counter() - start
    if device.type == "cpu":
        busy = (time.process_time() - cpu_start) / torch.get_num_threads()
    return 2 * n**3 * count / busy


def read_bandwidth(device: torch.device, repeats: int = 5, mib: int = 256) -> float:
    """Bytes per second read from memory: the best of `repeats` sums of a float32 tensor of
    `mib` MiB, far larger than any CPU cache, so every byte comes from DRAM (or HBM)."""
    x = torch.ones(mib * 2**20 // 4, device=device)
    x.sum()  # warm-up: the pages are mapped
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x.sum()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """What the peak depends on besides dtype and threads: the CPU model and its vector
    instructions, or the GPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores"
    return device.type


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cache_path() -> Path:
    root = os.environ.get("HANDGPT_CACHE") or Path.home() / ".cache" / "handgpt"
    return Path(root) / "peak_flops.json"


def cache_key(device: torch.device, dtype: torch.dtype) -> str:
    dt = str(dtype).removeprefix("torch.")
    threads = torch.get_num_threads()
    return f"{device_name(device)} | {threads} threads | {dt} | torch {torch.__version__}"


def measured_peak(device: torch.device, dtype: torch.dtype) -> Peak:
    """The cached measurement for this machine and setting; measured and stored if none."""
    path, key = cache_path(), cache_key(device, dtype)
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):  # no cache yet, or a damaged one: measure again
        cached = {}
    entry = cached.get(key) if isinstance(cached, dict) else None
    if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)):
        return Peak(float(entry["flops"]), f"measured {entry.get('when', '?')}, cached in {path}")
    runs = [measured_matmul_flops(device, dtype, MEASURE_SECONDS) for _ in range(MEASURE_REPEATS)]
    flops = max(runs)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cached = {**(cached if isinstance(cached, dict) else {}), key: {"flops": flops, "when": when}}
    try:
        atomic_write_text(path, json.dumps(cached, indent=1) + "\n")
        where = f"cached in {path}"
    except UserError:  # a read-only home: measure again next time, but run now
        where = "not cached: could not write " + str(path)
    return Peak(flops, f"measured now, best of {MEASURE_REPEATS} x {MEASURE_SECONDS:g} s, {where}")


def peak_flops(
    device: torch.device, dtype: torch.dtype, override_tflops: float | None = None
) -> Peak:
    """Peak FLOP/s of one device, the denominator of MFU (see the module docstring)."""
    if override_tflops:
        return Peak(float(override_tflops) * 1e12, f"peak_tflops={override_tflops:g} given")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return Peak(tflops * 1e12, f"datasheet, {name}, dense bf16/fp16")
    return measured_peak(device, dtype)
