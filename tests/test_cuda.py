"""The CUDA paths: cuda:N, bf16 and fp16 (with the grad scaler) through the training loop,
torch.compile, SDPA's flash kernel, nccl DDP in one process, decoding on the GPU.

Marked `cuda` and skipped where no GPU is present; `make gpu-check` runs them on a lent
GPU (scripts/gpu_check.py). Each compares the GPU path with a reference (fp32, eager,
the manual attention, the same loop without DDP), so a wrong result fails, not only a crash.
"""

import copy
import socket

import pytest
import torch
import torch.distributed as dist
from tiny_loop import loop_settings

from errors import UserError
from model import GPT, GPTConfig
from model.generate import complete
from train.core.optim import build_optimizer
from train.core.runtime import Runtime, resolve_device, resolve_precision
from train.core.trainer import Trainer, next_token_step

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
SMALL = dict(n_layer=2, n_head=4, n_embd=128, block_size=64, vocab_size=256)


def gpu() -> torch.device:
    return torch.device("cuda", 0)


def batch(B: int = 4, T: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, SMALL["vocab_size"], (B, T + 1), generator=g)
    return x[:, :-1].to(gpu()), x[:, 1:].to(gpu())


def losses(rt: Runtime, steps: int = 6, optimizer: str = "muon", model=None, tmp=None) -> list:
    """The Trainer's update `steps` times on one fixed batch; the losses."""
    torch.manual_seed(0)
    model = (model or GPT(GPTConfig(**SMALL))).to(rt.device)
    opt = build_optimizer(model, 1e-3, 0.0, device_type="cuda", kind=optimizer)
    loop = loop_settings(max_iters=steps, warmup_iters=0, lr=1e-3, min_lr=1e-3)
    trainer = Trainer(model, opt, rt, loop, tmp or "unused", checkpoint_meta={})
    fixed = batch()
    return [trainer.update([fixed], next_token_step).loss for _ in range(steps)]


def test_cuda_devices_resolve_and_a_missing_one_is_a_user_error():
    assert resolve_device("cuda:0") == gpu()
    assert resolve_device("cuda") == gpu()
    n = torch.cuda.device_count()
    with pytest.raises(UserError, match=f"has {n} GPU"):
        resolve_device(f"cuda:{n}")
    assert resolve_precision("auto", gpu()) in (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mixed_precision_training_follows_float32(dtype):
    """bf16, and fp16 with the loss scaler, learn as fp32 does on the same steps."""
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    rt = Runtime(gpu(), dtype)
    assert rt.grad_scaler().is_enabled() == (dtype == torch.float16)
    mixed = losses(rt)
    full = losses(Runtime(gpu(), torch.float32))
    assert all(torch.isfinite(torch.tensor(mixed)))
    assert mixed[-1] < mixed[0] - 0.5  # it learns the fixed batch
    assert abs(mixed[-1] - full[-1]) < 0.1 * full[0]


def test_compiled_model_equals_eager():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL)).to(gpu())
    x, y = batch()
    eager_logits, eager_loss = model(x, y)
    compiled = torch.compile(copy.deepcopy(model))
    logits, loss = compiled(x, y)
    assert torch.allclose(logits, eager_logits, atol=1e-3, rtol=1e-3)
    assert abs(loss.item() - eager_loss.item()) < 1e-3
    loss.backward()  # the compiled backward runs too
    assert all(p.grad is not None for p in compiled.parameters())


def test_sdpa_flash_kernel_equals_the_manual_attention_in_bf16():
    """Forcing the flash backend fails if it cannot run: this proves the flash path works."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    manual = GPT(GPTConfig(**SMALL, attention="manual")).to(gpu(), torch.bfloat16)
    flash = GPT(GPTConfig(**SMALL, attention="sdpa")).to(gpu(), torch.bfloat16)
    flash.load_state_dict(manual.state_dict())
    x, y = batch()
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        logits, loss = flash(x, y)
        loss.backward()
    ref_logits, ref_loss = manual(x, y)
    assert (logits.float() - ref_logits.float()).abs().max() < 0.1
    assert abs(loss.item() - ref_loss.item()) < 0.02


def test_decoding_on_the_gpu_batched_equals_one_at_a_time():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**SMALL)).to(gpu()).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    together = complete(model, prompts, 12, temperature=0.0)
    alone = [complete(model, [p], 12, temperature=0.0)[0] for p in prompts]
    assert [c.tokens for c in together] == [c.tokens for c in alone]


class OneRankDDP(Runtime):
    """A runtime that takes the distributed paths (DDP wrap, all-reduces) with one rank."""

    @property
    def distributed(self) -> bool:
        return True


def test_nccl_ddp_with_one_process_equals_the_plain_loop(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                            world_size=1, device_id=gpu())  # fmt: skip
    try:
        ddp = losses(OneRankDDP(gpu(), torch.float32), optimizer="adamw", tmp=tmp_path)
    finally:
        dist.destroy_process_group()
    plain = losses(Runtime(gpu(), torch.float32), optimizer="adamw", tmp=tmp_path)
    assert ddp == pytest.approx(plain, abs=1e-4)


# The Llama family: rotary embeddings, RMSNorm, SwiGLU, 4 query heads on 2 key/value heads
# (SDPA's enable_gqa), QK-norm, an untied head.
LLAMA = dict(
    SMALL,
    position="rope",
    norm="rmsnorm",
    mlp="swiglu",
    bias=False,
    n_kv_head=2,
    qk_norm=True,
    tie_embeddings=False,
)


def test_llama_family_sdpa_kernels_equal_the_manual_attention_in_bf16():
    torch.manual_seed(0)
    manual = GPT(GPTConfig(**LLAMA, attention="manual")).to(gpu(), torch.bfloat16)
    fused = GPT(GPTConfig(**LLAMA, attention="sdpa")).to(gpu(), torch.bfloat16)
    fused.load_state_dict(manual.state_dict())
    x, y = batch()
    logits, loss = fused(x, y)
    loss.backward()
    ref_logits, ref_loss = manual(x, y)
    assert (logits.float() - ref_logits.float()).abs().max() < 0.1
    assert abs(loss.item() - ref_loss.item()) < 0.02
    assert all(p.grad is not None for p in fused.parameters())


def test_llama_family_learns_in_bf16_as_in_float32_and_decodes_on_the_gpu():
    model = GPT(GPTConfig(**LLAMA))
    mixed = losses(Runtime(gpu(), torch.bfloat16), model=copy.deepcopy(model))
    full = losses(Runtime(gpu(), torch.float32), model=copy.deepcopy(model))
    assert mixed[-1] < mixed[0] - 0.5 and abs(mixed[-1] - full[-1]) < 0.1 * full[0]
    model = model.to(gpu()).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    together = complete(model, prompts, 80, temperature=0.0)  # past the 64-token context
    alone = complete(model, prompts[:1], 80, temperature=0.0)[0]
    assert together[0].tokens[:50] == alone.tokens[:50]  # the window slides at 58 new tokens
