"""The position-wise feed-forward network of a transformer block.

    FFN(x) = dropout( GELU(x W_1 + b_1) W_2 + b_2 ),   W_1: C x 4C,  W_2: 4C x C

GELU uses the tanh approximation, as GPT-2 does:
    GELU(u) = 0.5 u (1 + tanh( sqrt(2/pi) (u + 0.044715 u^3) ))
"""

import torch
from torch import nn

from .config import GPTConfig


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)  # W_1
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)  # W_2
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C), each position independently."""
        h = self.gelu(self.c_fc(x))  # (B, T, 4C)
        return self.dropout(self.c_proj(h))  # (B, T, C)
