"""The inference engine: turn a GPT's next-token logits into text, one token at a time.

Kept apart from the model definition (model/gpt.py only says what the network computes);
this file says how we *use* it to write:

    logits_t = GPT(x_1 .. x_t)[-1]                              (B, V)
    p_t      = softmax( filter(logits_t) / temperature )        (B, V)
    x_{t+1} ~ p_t                     (or argmax logits_t when temperature == 0)

Filtering (filter_logits):
    top-k:    keep the k largest logits, set the rest to -inf
    top-p:    "nucleus": sort by probability, keep the smallest prefix whose total
              probability reaches p (always at least the most likely token)

Generation (generate) with the KV cache:
    prefill:  run the prompt once; the cache keeps every layer's keys and values
    decode:   each new token is one position: its query attends to the cached keys
    slide:    the model has learned positions 0 .. block_size-1 only, so a cache that
              is full cannot simply move on. We then keep the last block_size // 2 tokens,
              empty the cache and prefill them again at positions 0 .. block_size//2 - 1.
              That costs one prefill every block_size // 2 tokens: cheap amortised, and the
              model always sees at least block_size // 2 tokens of context.
Without the cache every step reruns the model on the last block_size tokens: simple, and
the reference the cached path is tested against (within the context they agree exactly).
"""

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .gpt import GPT
from .kv_cache import KVCache


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Keep the top-k logits, then the nucleus of probability top_p; the rest become -inf.

    logits: (B, V). top_k: None or 0 means no top-k; top_p: None or 1.0 means no nucleus.
    Returns a new (B, V) tensor; kept entries are unchanged.
    """
    V = logits.size(-1)
    out = logits
    if top_k is not None and 0 < top_k < V:
        vals, idx = torch.topk(logits, top_k, dim=-1)  # (B, k) each, largest first
        vals = _nucleus(vals, top_p)  # nucleus on the k survivors only: no sort over V
        return torch.full_like(logits, float("-inf")).scatter_(-1, idx, vals)
    if top_p is not None and top_p < 1.0:
        vals, idx = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        out = torch.full_like(logits, float("-inf")).scatter_(-1, idx, _nucleus(vals, top_p))
    return out


def _nucleus(sorted_logits: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """Nucleus filter on logits sorted in descending order along the last dim.

    With probabilities p_1 >= p_2 >= ..., token i is kept when the mass before it,
    sum_{j<i} p_j, is still below top_p: the kept prefix is the smallest whose total
    reaches top_p. Token 1 has zero mass before it, so it is always kept.
    """
    if top_p is None or top_p >= 1.0:
        return sorted_logits
    probs = F.softmax(sorted_logits.float(), dim=-1)  # (B, n)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # exclusive cumulative sum
    return sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw one token per row. logits: (B, V) -> (B,) int64.

    temperature == 0 is greedy decoding (argmax; top_k and top_p do not matter).
    Otherwise x ~ softmax(filter(logits) / temperature). The generator, if given, must live
    on the logits' device; the same generator state gives the same tokens.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    V = logits.size(-1)
    if top_k is not None and 0 < top_k < V:
        # Fast path: sample among the k candidates directly, never touching the other V - k.
        # Dividing by temperature > 0 keeps the order, so top-k may come first.
        vals, idx = torch.topk(logits, top_k, dim=-1)  # (B, k), largest first
        vals = vals.float() / temperature
        probs = F.softmax(_nucleus(vals, top_p), dim=-1)  # (B, k)
        choice = torch.multinomial(probs, 1, generator=generator)  # (B, 1) positions in 0..k-1
        return idx.gather(-1, choice).squeeze(-1)  # (B,) token ids
    logits = logits.float() / temperature  # (B, V)
    probs = F.softmax(filter_logits(logits, None, top_p), dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def prepare_for_decoding(model: GPT) -> GPT:
    """Store the widening Linear weights transposed in memory, for batch-1 decoding on a CPU.

    A decode step is a row vector times each weight matrix, y = x W^T (W: out x in), so it
    is bound by reading W. nn.Linear keeps W row-major (out, in). MKL's CPU kernels read a
    widening matrix (out >= in: c_attn, c_fc and the LM head) faster as (in, out) row-major,
    the layout GPT-2's Conv1D uses, and the narrowing mlp.c_proj (in = 4 out) faster as it
    is. Measured on a 2-core AMD EPYC, 2 threads, GB/s of weights read:

        (out, in)        row-major   transposed
        3072 x 768          12.5        20.3
        2304 x 768          12.3        16.7
         768 x 768          11.9        12.7
         768 x 3072         16.4        13.4
        50257 x 768 (LM head): 12.8 vs 6.6 ms per token

    `w.t().contiguous().t()` has the same shape and values, only its strides change, so
    the model computes exactly the same function, and the tied LM head / token embedding
    stays one tensor. Applied only on the CPU in float32, where it was measured; returns
    the model, changed in place.
    """
    w = model.embed.wte.weight
    if w.device.type != "cpu" or w.dtype != torch.float32:
        return model
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.out_features >= module.in_features:
                module.weight.data = module.weight.data.t().contiguous().t()
    return model


def _last_logits(model: GPT, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """Logits of the last position only. idx: (B, T) -> (B, V).

    The LM head (C x V, the largest matrix of a small GPT) runs on one position, not T.
    """
    h = model.hidden(idx, cache)  # (B, T, C)
    return model.lm_head(h[:, -1])  # (B, V)


@torch.inference_mode()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] = (),
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield new tokens, one (B,) int64 tensor per step, for the prompts idx: (B, T).

    Stops after max_new_tokens steps, or as soon as every row has produced one of stop_ids.
    A row that has stopped while others go on keeps yielding the stop token it ended with,
    so callers can cut each row at its first stop token. The stop token itself is yielded.

    A prompt longer than the context (block_size) is cropped to its last block_size tokens.
    Past the context, the cached path slides (see the module docstring); the uncached path
    reruns the model on the last block_size tokens at every step.

    Runs under torch.inference_mode: the yielded tensors are inference tensors; clone them
    outside inference mode before using them in anything that needs gradients. The model
    should be in eval mode (dropout off); its weights' dtype is the compute dtype.
    """
    if max_new_tokens < 1:
        return
    block_size = model.config.block_size
    B = idx.size(0)
    device = idx.device
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)  # rows that produced a stop id

    # The tokens the model currently sees: a fixed buffer, never re-allocated per step.
    window = torch.empty(B, block_size, dtype=torch.long, device=device)  # (B, block_size)
    prompt = idx[:, -block_size:]  # crop from the left
    n = prompt.size(1)  # tokens in the window
    window[:, :n] = prompt

    cache = model.new_cache(B, block_size) if use_cache else None
    logits = _last_logits(model, prompt, cache)  # prefill: (B, V)
    prev = None
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        if stops.numel():
            if prev is not None:
                nxt = torch.where(done, prev, nxt)  # finished rows repeat their stop token
            done |= torch.isin(nxt, stops)
        yield nxt
        if step == max_new_tokens - 1 or (stops.numel() and bool(done.all())):
            return
        prev = nxt

        # Feed the token back: append it to the window, or make room when the window is full.
        if n < block_size:
            window[:, n] = nxt
            n += 1
            # with the cache only the new position is run; without, the whole window again
            fresh = window[:, n - 1 : n] if cache is not None else window[:, :n]
        else:  # full: keep the last `keep` tokens (the newest included) at the front
            keep = max(1, block_size // 2) if cache is not None else block_size
            window[:, : keep - 1] = window[:, n - keep + 1 : n].clone()
            window[:, keep - 1] = nxt
            n = keep
            fresh = window[:, :n]  # with the cache: re-prefill them from position 0
            if cache is not None:
                cache.reset()
        logits = _last_logits(model, fresh, cache)  # (B, V)
