"""GPT: token ids in, next-token logits (and optionally the loss) out.

    h_0 = W_te[idx] + W_pe[positions]                       (Embeddings)
    h_l = Block_l(h_{l-1})            for l = 1 .. n_layer  (Block)
    logits = LN_f(h_L) W_te^T                               (LM head tied to W_te)
    loss = mean over targets != -100 of  -log softmax(logits)[target]

Prompts of different lengths go in one batch by left padding: `start` (B,) says where
each row's real tokens begin; they then get positions 0 .. n-1 and attend to nothing before
their start, so each row computes what it would alone (model/embedding.py,
model/attention.py). Without `start` (None) nothing of this runs: the unpadded forward,
the one training uses, is unchanged.

Initialisation follows GPT-2: every weight ~ N(0, 0.02), biases 0, LayerNorm gain 1,
and the projections that write into the residual stream (attn.c_proj, mlp.c_proj)
~ N(0, 0.02 / sqrt(2 n_layer)), so the stream's variance does not grow with depth.

The Llama family is the same model with other parts (GPTConfig; docs/model.md, "Since
GPT-2"): no W_pe but rotary embeddings, whose tables hidden() computes once per forward
from the same positions and hands to every block; RMSNorm for LN; SwiGLU; fewer key/value
heads; and, with tie_embeddings=false, an LM head of its own:

    logits = LN_f(h_L) W_head^T                            W_head: V x C, not W_te
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import padded_causal_mask
from .block import Block
from .config import GPTConfig
from .embedding import Embeddings, positions
from .kv_cache import KVCache
from .norm import make_norm
from .rotary import rotary_tables

IGNORE_INDEX = -100  # targets with this id do not count towards the loss


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        learned = config.position == "learned"
        self.embed = Embeddings(
            config.vocab_size, config.block_size, config.n_embd, config.dropout, learned
        )
        self.h = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.wte.weight  # weight tying: one matrix, two uses
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.h:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden(
        self,
        idx: torch.Tensor,
        cache: KVCache | None = None,
        start: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final normalised hidden states. idx: (B, T) -> (B, T, C).

        With a cache, idx holds only the new tokens; they fill slots
        cache.pos .. cache.pos+T-1, and the cache moves on by T.
        start: (B,) int64, row b's first real slot when rows are left-padded, else None.
        A cache carries its own (cache.start, set by new_cache or reset); pass it there.
        """
        offset = 0
        if cache is not None:
            if start is not None:
                raise ValueError("with a KV cache, give start to new_cache/reset, not here")
            offset, start = cache.pos, cache.start
        mask = None
        if start is not None:  # left padding: causal, and no padding keys
            mask = padded_causal_mask(start, idx.size(1), offset + idx.size(1))  # (B,1,T,T_k)
        x = self.embed(idx, offset, start)  # (B, T, C)
        rope = None
        if self.config.position == "rope":  # cos, sin: (B|1, 1, T, D), for every block
            pos = positions(offset, idx.size(1), start, idx.device)  # (T,) or (B, T)
            rope = rotary_tables(pos, self.config.head_dim, self.config.rope_theta)
        for block in self.h:
            x = block(x, cache, mask, rope)  # (B, T, C)
        if cache is not None:
            cache.advance(idx.size(1))
        return self.ln_f(x)  # (B, T, C)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx: (B, T) token ids; targets: (B, T) next-token ids or -100.

        start: (B,) first real slot of each left-padded row, or None (see `hidden`); the
        logits of padding slots mean nothing: give them targets -100.
        Returns logits (B, T, vocab_size) and, given targets, the mean cross-entropy in
        nats over the targets that are not -100 (else None).
        """
        logits = self.lm_head(self.hidden(idx, cache, start))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(
            logits.view(-1, logits.size(-1)).float(),  # (B*T, V)
            targets.reshape(-1),  # (B*T,)
            ignore_index=IGNORE_INDEX,
        )
        return logits, loss

    def new_cache(
        self, batch_size: int, max_len: int | None = None, start: torch.Tensor | None = None
    ) -> KVCache:
        """An empty KV cache for this model, on its device and in its dtype.

        start: (batch_size,) first real slot of each left-padded row, or None.
        """
        c = self.config
        w = self.embed.wte.weight
        n = max_len or c.block_size
        return KVCache(c.n_layer, batch_size, c.kv_heads, c.head_dim, n, w.device, w.dtype, start)

    def num_params(self, include_position_embedding: bool = True) -> int:
        """Number of distinct parameters (the tied LM head counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if not include_position_embedding and self.embed.wpe is not None:
            n -= self.embed.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token, for MFU.

        Each parameter in a matmul costs 2 FLOPs forward and 4 backward: 6 N, with N the
        parameters excluding position embeddings (a lookup, not a matmul). Attention adds
        Q K^T and A V: 2 * 2 * T * C per layer forward, times 3 for backward: 12 L T C.
        An untied token table is a lookup too: only the LM head's own matrix counts then.
        """
        c = self.config
        T = seq_len or c.block_size
        n = self.num_params(include_position_embedding=False)
        if not c.tie_embeddings:
            n -= self.embed.wte.weight.numel()
        return 6 * n + 12 * c.n_layer * T * c.n_embd
