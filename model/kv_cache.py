"""KVCache: the keys and values of positions already seen, for incremental decoding.

Without a cache, generating token t+1 reruns the model over all t previous tokens.
With one, the prompt is run once (the "prefill"), every layer's keys and values are
kept, and each new token then only computes its own query, key and value and attends
to the stored ones: one position's work per token.

Layout: one preallocated tensor for keys and one for values,
    k, v: (n_layer, B, n_head, max_len, head_dim)
and `pos`, the number of slots filled so far (the same for every layer and row). n_head is
the number of key/value heads: with grouped-query attention (GPTConfig.n_kv_head) fewer
than the query heads, and the cache is that much smaller.

Prompts of different lengths share a cache by left padding: row b's real tokens start at
slot start[b] (`start`, a (B,) tensor, or None when no row is padded). Its slots before
that hold padding, which the model gives no position and its real tokens never attend to
(model/gpt.py). The cache remembers `start`, so that every decoding step after the prefill
uses the same one.
"""

import torch


class KVCache:
    def __init__(
        self,
        n_layer: int,
        batch_size: int,
        n_head: int,
        head_dim: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        start: torch.Tensor | None = None,
    ) -> None:
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)  # only filled slots are read
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0  # slots 0 .. pos-1 are filled
        self.start = start  # (B,) first real slot of each row, or None: no padding

    @classmethod
    def over(cls, k: torch.Tensor, v: torch.Tensor, start: torch.Tensor | None) -> "KVCache":
        """An empty cache that writes into given buffers (views of larger ones, say), each
        (n_layer, B, n_head, max_len, head_dim): model/continuous.py keeps every row of a
        server's batch in one pair of buffers and hands the model views of them."""
        cache = cls.__new__(cls)
        cache.k, cache.v, cache.max_len, cache.pos, cache.start = k, v, k.size(3), 0, start
        return cache

    def append(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one layer's new keys/values and return all of that layer's so far.

        k, v: (B, n_head, T, head_dim) for the T new slots pos .. pos+T-1.
        Returns keys and values of slots 0 .. pos+T-1: (B, n_head, pos+T, head_dim).
        `pos` itself moves on only in `advance`, once every layer has appended.
        """
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot append up to {end}")
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """Mark n more slots as filled (called by the model after its last layer)."""
        self.pos += n

    def reset(self, start: torch.Tensor | None = None) -> None:
        """Forget everything (the buffers are reused); `start` is the new rows' padding."""
        self.pos = 0
        self.start = start
