"""Multi-head causal self-attention, as in GPT-2.

For each head h, with d = C / n_head:

    Q_h = X W_q^h,   K_h = X W_k^h,   V_h = X W_v^h
    A_h = softmax( Q_h K_h^T / sqrt(d) + M )          M_ij = 0 if j <= i else -inf
    head_h = dropout(A_h) V_h
    Y = dropout( concat(head_1 .. head_H) W_o )

The three projections are one fused Linear `c_attn` (C -> 3C) and W_o is `c_proj`,
exactly GPT-2's layout, so its weights load unchanged (after transposing Conv1D).

Two implementations of the middle step, chosen by GPTConfig.attention:
  "manual": the formula above written out, the readable reference;
  "sdpa":   torch.nn.functional.scaled_dot_product_attention, which computes the same
            with a fused kernel (flash attention on GPUs). tests/ proves they agree.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPTConfig
from .kv_cache import KVCache


def causal_mask(t_q: int, t_k: int, device: torch.device) -> torch.Tensor:
    """Boolean (t_q, t_k) mask, True where query i may attend to key j.

    The queries are the last t_q of the t_k positions, so query i sits at position
    t_k - t_q + i and may see keys j <= t_k - t_q + i.
    """
    ones = torch.ones(t_q, t_k, dtype=torch.bool, device=device)
    return torch.tril(ones, diagonal=t_k - t_q)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.layer = layer  # which slot of a KVCache is ours
        self.attention = config.attention
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # X -> Q,K,V
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # W_o
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C). With a cache, x holds only the new positions."""
        B, T, C = x.shape
        H, D = self.n_head, self.head_dim

        # One matmul for all three projections, then split and give each head its slice.
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)

        if cache is not None:  # prepend the keys and values of earlier positions
            k, v = cache.append(self.layer, k, v)  # (B, H, T_k, D), T_k = cache.pos + T

        if self.attention == "manual":
            y = self._manual(q, k, v)
        else:
            y = self._sdpa(q, k, v)  # (B, H, T, D)

        y = y.transpose(1, 2).contiguous().view(B, T, C)  # merge heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _manual(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The formula, step by step. q: (B, H, T_q, D); k, v: (B, H, T_k, D)."""
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T_q, T_k)
        mask = causal_mask(q.size(2), k.size(2), q.device)  # (T_q, T_k)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = F.softmax(scores, dim=-1)  # each row sums to 1 over visible keys
        weights = self.attn_dropout(weights)
        return weights @ v  # (B, H, T_q, D)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The same through torch's fused kernel."""
        t_q, t_k = q.size(2), k.size(2)
        dropout_p = self.dropout if self.training else 0.0
        if t_q == t_k:  # a whole sequence: the standard causal mask
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        if t_q == 1:  # one new token after a cache: it may see every key
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        mask = causal_mask(t_q, t_k, q.device)  # several new tokens after a cache
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
