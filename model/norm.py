"""The two normalisations of the residual stream: GPT-2's LayerNorm and Llama's RMSNorm.

LayerNorm (GPT-2), over the C features of one position:

    LN(x) = g * (x - mean(x)) / sqrt(var(x) + eps) + b          eps = 1e-5

RMSNorm (Zhang & Sennrich 2019; Llama, Qwen, Mistral) drops the centring and the shift:

    RMS(x) = w * x / sqrt(mean(x^2) + eps)                       w starts at 1

It costs less (no mean to subtract, no bias) and trains as well: what the next layer
needs is a stream of bounded size, and dividing by the root mean square gives that.
transformers computes it in float32 and casts back before multiplying by w; so do we,
which keeps bfloat16 models equal to theirs.
"""

import torch
from torch import nn

from .config import GPTConfig

LAYER_NORM_EPS = 1e-5  # GPT-2's epsilon


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps) over the last dim. (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # w: the gain, 1 at first (not 1 + w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()  # (..., dim) in float32, whatever the model's dtype
        h = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(config: GPTConfig, dim: int | None = None) -> nn.Module:
    """The config's normalisation over `dim` features (default the stream's width C)."""
    dim = dim or config.n_embd
    if config.norm == "rmsnorm":
        return RMSNorm(dim, config.rms_norm_eps)
    return nn.LayerNorm(dim, eps=LAYER_NORM_EPS, bias=config.bias)
