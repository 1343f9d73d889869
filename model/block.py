"""One transformer block, pre-LayerNorm as in GPT-2.

    x = x + Attention( LN_1(x) )
    x = x + FFN( LN_2(x) )

Each sub-layer reads a normalised copy of the residual stream and adds its output
back, so the stream itself is never normalised: gradients flow straight through.
"""

import torch
from torch import nn

from .attention import CausalSelfAttention
from .config import GPTConfig
from .kv_cache import KVCache
from .mlp import FeedForward

LAYER_NORM_EPS = 1e-5  # GPT-2's epsilon


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=LAYER_NORM_EPS, bias=config.bias)
        self.mlp = FeedForward(config)

    def forward(
        self, x: torch.Tensor, cache: KVCache | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C); mask: see CausalSelfAttention.forward."""
        x = x + self.attn(self.ln_1(x), cache, mask)
        x = x + self.mlp(self.ln_2(x))
        return x
