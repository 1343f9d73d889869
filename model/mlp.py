"""The position-wise feed-forward network of a transformer block, GPT-2's and Llama's.

GPT-2 (FeedForward):
    FFN(x) = dropout( GELU(x W_1 + b_1) W_2 + b_2 ),   W_1: C x 4C,  W_2: 4C x C

GELU uses the tanh approximation, as GPT-2 does:
    GELU(u) = 0.5 u (1 + tanh( sqrt(2/pi) (u + 0.044715 u^3) ))

Llama (SwiGLU, Shazeer 2020): a gate decides, feature by feature, how much of a second
projection passes:
    FFN(x) = dropout( (SiLU(x W_g) * (x W_u)) W_d ),  W_g, W_u: C x F,  W_d: F x C
    SiLU(u) = u * sigmoid(u)
Three matrices instead of two, so F = 8C/3 (GPTConfig.swiglu_hidden) costs what GELU's 4C
does.
"""

import torch
import torch.nn.functional as F
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


class SwiGLU(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.swiglu_hidden  # F
        self.c_gate = nn.Linear(config.n_embd, hidden, bias=config.bias)  # W_g
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)  # W_u ("up")
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)  # W_d ("down")
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C), each position independently."""
        h = F.silu(self.c_gate(x)) * self.c_fc(x)  # (B, T, F)
        return self.dropout(self.c_proj(h))  # (B, T, C)


def make_mlp(config: GPTConfig) -> nn.Module:
    """The config's feed-forward network: GPT-2's GELU one, or SwiGLU."""
    return SwiGLU(config) if config.mlp == "swiglu" else FeedForward(config)
