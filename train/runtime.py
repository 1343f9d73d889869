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
import functools
import os
import time
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


def measured_matmul_flops(device: torch.device, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """FLOP/s of a 2048 x 2048 matmul on `device` in `dtype`: a practical peak."""
    n = 2048
    g = torch.Generator(device=device).manual_seed(0)  # leave the global RNG (dropout) alone
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    a @ b  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n**3 * count / (time.perf_counter() - start)


def peak_flops(runtime: Runtime, override_tflops: float | None = None) -> float:
    """Peak FLOP/s of one device, the denominator of MFU.

    An explicit override wins; known GPUs use their datasheet bf16 peak; anything else
    (CPUs, unknown GPUs) is measured with a short matmul in the run's precision.
    """
    if override_tflops:
        return float(override_tflops) * 1e12
    if runtime.device.type == "cuda":
        name = torch.cuda.get_device_name(runtime.device)
        for key, tflops in GPU_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return measured_matmul_flops(runtime.device, runtime.dtype)
