"""Where and how a run computes: device, precision, and the distributed process group.

Resolved once, at start-up, so that a device that does not exist fails before any
work is done:

    device:    auto | cpu | cuda | cuda:N | mps      (auto: CUDA when present, else MPS, else CPU)
    precision: auto | float32 | bfloat16 | float16   (auto: bf16 where the device runs it
                                                      natively, else float32)

Under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set in the environment) the process joins
the group with nccl on CUDA and gloo on CPU; each rank on a CUDA machine takes the GPU
cuda:LOCAL_RANK. Nothing here is specific to one node, so several nodes work the same.
"""

import contextlib
import ctypes
import functools
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from errors import UserError

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # compute dtype under autocast; float32 means no autocast
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only rank 0 logs, prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the forward pass: matmuls in self.dtype, weights stay fp32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def no_autocast(self) -> contextlib.AbstractContextManager:
        """Autocast off inside self.autocast() (for backward), keeping its cast weights."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, enabled=False)

    def grad_scaler(self) -> "torch.amp.GradScaler":
        """A loss scaler, enabled only for float16 (bf16 has fp32's exponent range)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)

    def synchronize(self) -> None:
        """Wait for queued device work, so that timings measure it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """Turn a device string into a torch.device, or explain why it cannot be had."""
    name = str(name).strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise UserError("device=mps was requested but MPS is not available; use device=cpu")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(
                f"device={name} was requested but CUDA is not available on this machine "
                "(no GPU, or a CPU-only torch); use device=cpu or device=auto"
            )
        count = torch.cuda.device_count()
        if name == "cuda":
            return torch.device("cuda", local_rank % count)
        index = name.split(":", 1)[1]
        if not index.isdigit():
            raise UserError(f"device={name} is not a valid device; write cuda:N with N a number")
        if int(index) >= count:
            raise UserError(
                f"device={name} was requested but this machine has {count} GPU(s) "
                f"(cuda:0 .. cuda:{count - 1}); pick one of those"
            )
        return torch.device("cuda", int(index))
    raise UserError(f"device={name} is not known; use auto, cpu, cuda, cuda:N or mps")


# The CPU instruction-set flags that multiply bfloat16 natively: AVX-512 BF16 (Intel Cooper
# Lake and Sapphire Rapids on, AMD Zen 4 on), AMX (Intel Sapphire Rapids on), Arm's BF16.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# The one override of the detection: "1" or "0" says whether this CPU runs bf16 natively.
# Tests set it to exercise both branches on any machine (subprocesses inherit it).
CPU_BF16_ENV = "HANDGPT_CPU_BF16"


def cpu_supports_bf16() -> bool:
    """True when the CPU multiplies bfloat16 natively, so that bf16 is the faster dtype.

    $HANDGPT_CPU_BF16 (1 or 0) answers first; otherwise the CPU's own flags (Linux), or
    where there are none to read, a measurement (detected_cpu_bf16)."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip()
    if forced:
        if forced not in ("0", "1"):
            raise UserError(f"{CPU_BF16_ENV}={forced} is not valid; set it to 1 or 0, or unset it")
        return forced == "1"
    return detected_cpu_bf16()


@functools.cache
def detected_cpu_bf16() -> bool:
    """This CPU's answer, found once per process."""
    return native_bf16(cpu_flags(), bf16_speedup)


def native_bf16(flags: frozenset[str] | None, speedup: Callable[[], float]) -> bool:
    """The decision: a CPU whose flags name a bf16 instruction (NATIVE_BF16_FLAGS) runs it
    natively, one whose flags do not, emulates it; with no flags to read (macOS, Windows),
    bf16 is native when a bf16 matmul outruns float32's (`speedup() > 1`).

    Not oneDNN's own answer (torch.ops.mkldnn._is_mkldnn_bf16_supported): it says yes on
    any AVX-512 CPU, Skylake and Cascade Lake included, which emulate bf16 tens of times
    slower than they multiply float32."""
    if flags is not None:
        return bool(flags & NATIVE_BF16_FLAGS)
    return speedup() > 1.0


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str] | None:
    """The CPU's instruction-set flags ("flags" on x86, "Features" on Arm), or None where
    the file does not exist or names none."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def bf16_speedup(n: int = 256, repeats: int = 3) -> float:
    """float32 time / bfloat16 time of an n x n matmul on this CPU, best of `repeats` each:
    about 2 where bf16 is native, about 1/45 where it is emulated (tens of milliseconds)."""

    def best(dtype: torch.dtype) -> float:
        a = torch.ones(n, n, dtype=dtype)
        a @ a  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """Turn a precision string into the autocast dtype for `device`."""
    name = str(name).strip().lower()
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_supports_bf16():
            return torch.bfloat16
        return torch.float32
    if name not in PRECISIONS:
        raise UserError(f"precision={name} is not known; use auto, float32, bfloat16 or float16")
    dtype = PRECISIONS[name]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"precision=bfloat16 is not supported on {torch.cuda.get_device_name(device)}; "
            "use precision=float16 or precision=auto"
        )
    return dtype


def precision_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16": the name a config and a checkpoint use."""
    return str(dtype).removeprefix("torch.")


def replay_precision(requested: str, recorded: str | None, device: torch.device) -> tuple[str, str]:
    """The precision to score a trained checkpoint at, and why, in words.

    A precision asked for by name is used as asked. With auto: the precision the stage ran
    at (its checkpoint records it), so that the stage's figures come out the same, unless
    this device would only emulate it (bfloat16 on a CPU without native bf16 is ~45 times
    slower, float16 on any CPU): then float32, whose figures may differ in the last
    digits. Nothing recorded (an older or a Hugging Face checkpoint): auto's usual pick."""
    if str(requested).strip().lower() != "auto":
        return str(requested), "as asked"
    if recorded not in PRECISIONS:
        auto = precision_name(resolve_precision("auto", device))
        return auto, "auto; the checkpoint does not record the precision it was trained at"
    emulated = device.type == "cpu" and (
        recorded == "float16" or (recorded == "bfloat16" and not cpu_supports_bf16())
    )
    if emulated:
        return "float32", (
            f"the checkpoint was trained in {recorded}, which this CPU only emulates; "
            "figures may differ from the stage's in the last digits"
        )
    return recorded, "the precision the checkpoint was trained at"


def setup_runtime(device: str = "auto", precision: str = "auto", seed: int = 0) -> Runtime:
    """Resolve device and precision, join the process group under torchrun, seed torch.

    Every rank gets the same seed, so that model initialisation is identical everywhere;
    the data loaders give each rank its own stream.
    """
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    dev = resolve_device(device, local_rank)
    dtype = resolve_precision(precision, dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if dev.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(seed)
    return Runtime(dev, dtype, rank, local_rank, world_size)


def teardown_runtime(runtime: Runtime) -> None:
    """Leave the process group (a no-op on a single process)."""
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def runtime_session(device: str = "auto", precision: str = "auto", seed: int = 0):
    """`with runtime_session(...) as rt:` set up the runtime, and always tear it down."""
    runtime = setup_runtime(device, precision, seed)
    try:
        yield runtime
    finally:
        teardown_runtime(runtime)


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_memory(mmap_mib: int = 64, trim_mib: int = 256) -> bool:
    """Let glibc reuse freed tensor memory instead of handing it back to the OS (Linux).

    A CPU training step allocates and frees the same large tensors every time (the tiny
    model's logits and their gradients are 16 MiB each). By default glibc maps blocks that
    large straight from the OS and unmaps them on free, or trims the heap once 2x that much
    is free at its top; either way the next step touches fresh pages, and the kernel zeroes
    each one on a page fault: 9,000-13,000 minor faults per step measured, 30-45 ms of
    system time in a 500 ms step (one thread). Serving blocks below `mmap_mib` from the
    heap and keeping up to `trim_mib` free there brings that to a few dozen faults per step
    (docs/training.md). Memory in use is unchanged; the process keeps its peak mapped, as
    CUDA's caching allocator does. Returns whether the settings took (False off glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_mib << 20) == 1
        return ok and libc.mallopt(M_TRIM_THRESHOLD, trim_mib << 20) == 1
    except (OSError, AttributeError):  # not glibc (musl, ...): leave malloc as it is
        return False
