"""Embeddings: token ids to the first residual stream, GPT-2 style.

    x_t = W_te[idx_t] + W_pe[t]        (token embedding + learned absolute position)

followed by dropout. Positions count from `start`, which is non-zero when a KV cache
already holds the earlier positions.
"""

import torch
from torch import nn


class Embeddings(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)  # token embedding, shared with the LM head
        self.wpe = nn.Embedding(block_size, n_embd)  # one learned vector per position
        self.drop = nn.Dropout(dropout)

    def forward(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        """idx: (B, T) token ids at positions start .. start+T-1  ->  (B, T, C)."""
        T = idx.size(1)
        if start + T > self.block_size:
            raise ValueError(
                f"sequence reaches position {start + T} but the model's context (block_size) "
                f"is {self.block_size} tokens; crop the input to the last {self.block_size} tokens"
            )
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        return self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C) + (T, C) broadcast
