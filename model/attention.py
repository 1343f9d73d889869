"""Multi-head causal self-attention, as in GPT-2.

For each head h, with d = C / n_head:

    Q_h = X W_q^h,   K_h = X W_k^h,   V_h = X W_v^h
    A_h = softmax( Q_h K_h^T / sqrt(d) + M )          M_ij = 0 if j <= i else -inf
    head_h = dropout(A_h) V_h
    Y = dropout( concat(head_1 .. head_H) W_o )

The three projections are one fused Linear `c_attn` (C -> 3C) and W_o is `c_proj`,
exactly GPT-2's layout, so its weights load unchanged (after transposing Conv1D).

Left padding (prompts of different lengths in one batch): row b's real tokens start at
slot start[b], and M also hides the padding keys, M_ij = -inf for j < start[b]
(padded_causal_mask). A padding query keeps its own key, so that its row of scores is
never all -inf: softmax would give NaN there, and in the next layer the real queries'
weight 0 on that NaN value is still NaN (0 * NaN), which would poison every row.

Two implementations of the middle step, chosen by GPTConfig.attention:
  "manual": the formula above written out, the readable reference;
  "sdpa":   torch.nn.functional.scaled_dot_product_attention, which computes the same
            with a fused kernel (flash attention on GPUs). tests/ proves they agree.

Since GPT-2 (options of the same module, all off for GPT-2; docs/model.md):
  grouped-query attention (n_kv_head < n_head): fewer key/value heads than query heads;
      query head h reads key/value head h // (n_head / n_kv_head). c_attn then makes
      C query features and n_kv_head * d key and value features each (C -> C + 2 n_kv d),
      and the KV cache holds n_kv_head heads: n_head / n_kv_head times less to store and read.
  QK-norm (qk_norm): Q_h <- RMSNorm(Q_h), K_h <- RMSNorm(K_h) over each head's d features,
      one weight of width d for all heads, before the rotary embedding (Qwen3's order).
  rotary embeddings (`rope` given): Q_h and K_h turned by their positions
      (model/rotary.py) before the scores, and before the keys enter the cache.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPTConfig
from .kv_cache import KVCache
from .norm import RMSNorm
from .rotary import apply_rotary


def causal_mask(t_q: int, t_k: int, device: torch.device) -> torch.Tensor:
    """Boolean (t_q, t_k) mask, True where query i may attend to key j.

    The queries are the last t_q of the t_k positions, so query i sits at position
    t_k - t_q + i and may see keys j <= t_k - t_q + i.
    """
    ones = torch.ones(t_q, t_k, dtype=torch.bool, device=device)
    return torch.tril(ones, diagonal=t_k - t_q)


def padded_causal_mask(start: torch.Tensor, t_q: int, t_k: int) -> torch.Tensor:
    """Boolean (B, 1, t_q, t_k) mask for left-padded rows: causal, and no padding keys.

    start: (B,) the first real slot of each row. Query i (slot t_k - t_q + i) of row b may
    see key j when j <= its slot and j >= start[b]; a query always sees itself, so that a
    padding query has one finite score (see the module docstring). The head dim is 1 and
    broadcasts over the heads.
    """
    keys = torch.arange(t_k, device=start.device)  # (t_k,) key slots
    real = keys[None, :] >= start[:, None]  # (B, t_k) key j is not padding
    causal = causal_mask(t_q, t_k, start.device)  # (t_q, t_k)
    itself = keys[None, :] == keys[t_k - t_q :, None]  # (t_q, t_k) key slot == query slot
    return ((causal[None] & real[:, None, :]) | itself[None])[:, None]  # (B, 1, t_q, t_k)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int = 0) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.kv_heads  # n_head unless grouped-query attention
        self.head_dim = config.head_dim
        self.layer = layer  # which slot of a KVCache is ours
        self.attention = config.attention
        self.dropout = config.dropout
        kv_width = self.n_kv_head * self.head_dim
        self.qkv_widths = (config.n_embd, kv_width, kv_width)  # c_attn's rows: Q, K, V
        self.c_attn = nn.Linear(config.n_embd, sum(self.qkv_widths), bias=config.bias)  # X -> Q,K,V
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # W_o
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        if config.qk_norm:  # one gain of width d, shared by the heads
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C). With a cache, x holds only the new positions.

        mask: None for the plain causal mask, or (B, 1, T, T_k) bool, True where a query
        may attend (padded_causal_mask, for left-padded rows).
        rope: None (GPT-2: positions are in x already), or the rotary tables cos, sin of the
        T new positions, (B|1, 1, T, D) each (model/rotary.py: rotary_tables).
        """
        B, T, C = x.shape
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim

        # One matmul for all three projections, then split and give each head its slice.
        q, k, v = self.c_attn(x).split(self.qkv_widths, dim=2)  # (B, T, C), 2 x (B, T, H_kv D)
        q = q.view(B, T, H, D)
        k = k.view(B, T, H_kv, D)
        if self.q_norm is not None:  # QK-norm: each head's query and key to unit RMS, x gain
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)  # (B, H, T, D)
        k = k.transpose(1, 2)  # (B, H_kv, T, D)
        v = v.view(B, T, H_kv, D).transpose(1, 2)  # (B, H_kv, T, D)
        if rope is not None:  # turn queries and keys by their positions
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)

        if cache is not None:  # prepend the keys and values of earlier positions
            k, v = cache.append(self.layer, k, v)  # (B, H_kv, T_k, D), T_k = cache.pos + T

        if self.attention == "manual":
            y = self._manual(q, k, v, mask)
        else:
            y = self._sdpa(q, k, v, mask)  # (B, H, T, D)

        y = y.transpose(1, 2).contiguous().view(B, T, C)  # merge heads: (B, T, C)
        return self.resid_dropout(self.c_proj(y))

    def _manual(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The formula, step by step. q: (B, H, T_q, D); k, v: (B, H_kv, T_k, D)."""
        if self.n_kv_head != self.n_head:  # query head h reads key/value head h // group
            group = self.n_head // self.n_kv_head
            k = k.repeat_interleave(group, dim=1)  # (B, H, T_k, D)
            v = v.repeat_interleave(group, dim=1)  # (B, H, T_k, D)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, T_q, T_k)
        if mask is None:
            mask = causal_mask(q.size(2), k.size(2), q.device)  # (T_q, T_k)
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = F.softmax(scores, dim=-1)  # each row sums to 1 over visible keys
        weights = self.attn_dropout(weights)
        return weights @ v  # (B, H, T_q, D)

    def _sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The same through torch's fused kernel (which maps query heads to key/value
        heads itself: enable_gqa)."""
        t_q, t_k = q.size(2), k.size(2)
        options = {"dropout_p": self.dropout if self.training else 0.0}
        if self.n_kv_head != self.n_head:
            options["enable_gqa"] = True
        if mask is not None:  # left-padded rows: the mask says everything
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **options)
        if t_q == t_k:  # a whole sequence: the standard causal mask
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, **options)
        if t_q == 1:  # one new token after a cache: it may see every key
            return F.scaled_dot_product_attention(q, k, v, **options)
        mask = causal_mask(t_q, t_k, q.device)  # several new tokens after a cache
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **options)
