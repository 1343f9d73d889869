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
from dataclasses import dataclass

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


@functools.cache
def cpu_supports_bf16() -> bool:
    """True when the CPU has native bfloat16 instructions (AVX-512 BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


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
