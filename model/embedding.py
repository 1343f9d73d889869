"""Embeddings: token ids to the first residual stream, GPT-2 style.

    x_t = W_te[idx_t] + W_pe[t]        (token embedding + learned absolute position)

followed by dropout. The T tokens of idx fill slots offset .. offset+T-1; `offset` is
non-zero when a KV cache already holds the earlier slots. Without padding a token's
position is its slot. With left padding, row b's real tokens start at slot start[b] and
its slot s is position s - start[b], so they sit at positions 0 .. n-1 exactly as when the
row is alone; padding slots (s < start[b]) get position 0, which no real token ever sees.

With rotary embeddings (GPTConfig.position = "rope") there is no W_pe: x_t = W_te[idx_t],
and the same positions turn the queries and keys instead (model/rotary.py, model/gpt.py).
"""

import torch
from torch import nn


def positions(
    offset: int, T: int, start: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """The positions of slots offset .. offset+T-1: (T,), or (B, T) when rows are left-padded
    (start: (B,) each row's first real slot; see the module docstring)."""
    pos = torch.arange(offset, offset + T, device=device)  # (T,)
    if start is not None:  # left padding: count each row's positions from its start
        pos = (pos[None, :] - start[:, None]).clamp(min=0)  # (B, T)
    return pos


class Embeddings(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_embd: int,
        dropout: float,
        learned_positions: bool = True,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.wte = nn.Embedding(vocab_size, n_embd)  # token embedding (the LM head when tied)
        # one learned vector per position, or none (rotary embeddings)
        self.wpe = nn.Embedding(block_size, n_embd) if learned_positions else None
        self.drop = nn.Dropout(dropout)

    def forward(
        self, idx: torch.Tensor, offset: int = 0, start: torch.Tensor | None = None
    ) -> torch.Tensor:
        """idx: (B, T) token ids in slots offset .. offset+T-1; start: (B,) or None -> (B, T, C)."""
        T = idx.size(1)
        if offset + T > self.block_size:
            raise ValueError(
                f"sequence reaches position {offset + T} but the model's context (block_size) "
                f"is {self.block_size} tokens; crop the input to the last {self.block_size} tokens"
            )
        if self.wpe is None:
            return self.drop(self.wte(idx))  # (B, T, C)
        pos = positions(offset, T, start, idx.device)  # (T,) or (B, T)
        return self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C) + (T, C) or (B, T, C)
