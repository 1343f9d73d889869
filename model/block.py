"""One transformer block, pre-norm as in GPT-2.

    x = x + Attention( LN_1(x) )
    x = x + FFN( LN_2(x) )

Each sub-layer reads a normalised copy of the residual stream and adds its output
back, so the stream itself is never normalised: gradients flow straight through.
LN is GPT-2's LayerNorm or RMSNorm (model/norm.py), FFN GPT-2's GELU network or SwiGLU
(model/mlp.py), as the config says; the arrangement is the same for both families.
"""

import torch
from torch import nn

from .attention import CausalSelfAttention
from .config import GPTConfig
from .kv_cache import KVCache
from .mlp import make_mlp
from .norm import make_norm


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = make_mlp(config)

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C); mask, rope: see CausalSelfAttention.forward."""
        x = x + self.attn(self.ln_1(x), cache, mask, rope)
        x = x + self.mlp(self.ln_2(x))
        return x
