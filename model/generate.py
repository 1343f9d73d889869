"""The inference engine: turn a GPT's next-token logits into text, one token at a time.

Kept apart from the model definition (model/gpt.py only says what the network computes);
this file says how we *use* it to write:

    logits_t = GPT(x_1 .. x_t)[-1]                              (B, V)
    p_t      = softmax( filter(logits_t) / temperature )        (B, V)
    x_{t+1} ~ p_t                     (or argmax logits_t when temperature == 0)
    logprob  = log softmax( logits_t / temperature )[x_{t+1}]   (on request, see below)

Filtering (filter_logits):
    top-k:    keep the k largest logits, set the rest to -inf
    top-p:    "nucleus": sort by probability, keep the smallest prefix whose total
              probability reaches p (always at least the most likely token)

The log-probability of a drawn token is that of the *unfiltered* distribution at the
sampling temperature (temperature 1 when decoding greedily), in float32. At temperature 1
without top-k/top-p it is exactly what a training forward of [prompt + reply] gives for the
reply's tokens (PPO recomputes it so; tests/test_generate.py checks they agree in float32).

Batches (complete): prompts of different lengths decode together by left padding. Row b's
prompt fills the right end of the rows, its first real token at slot start[b]; positions
count from there and attention hides the padding (model/gpt.py), so within the context a
row computes what it would alone: greedy decoding of a batch gives each prompt exactly the
tokens it gets alone (a sampled batch draws other random numbers than its rows alone).
Why left padding rather than grouping prompts of equal length: the 480 held-out built-in
task prompts have 26 lengths, so grouping makes many small batches, and one decode step of
32 rows costs far less than 32 steps of one; padding only adds a few masked slots per row
(docs/model.md has the figures).

The window (what the model reads), one policy with or without the KV cache:
    the prompt, cropped to its last block_size tokens, then each new token appended.
    The model has learned positions 0 .. block_size-1 only, so when all block_size slots
    are full and a token comes, the window keeps its last block_size // 2 - 1 tokens plus
    the new one (block_size // 2 in all) and goes on from there.
    With the cache (prefill the prompt once, then one position per token) a slide empties
    the cache and prefills the kept tokens again: one prefill every block_size // 2 tokens,
    cheap amortised, and the model always sees at least block_size // 2 tokens. Without the
    cache every step reruns the model on the whole window. So use_cache changes the speed
    only: in float32 both write the same tokens, past the context too (tested). In bfloat16
    the two paths round differently and do not agree exactly (on a random model greedy
    tokens diverged after 18-44 steps). The rows of a batch share the window's slots and
    slide together: when the longest row fills the context, every row drops as many slots
    (its padding first), so past the context a shorter row reads less than it would alone.

Stops: a completion ends with the first stop token (which it includes) or when its budget
of new tokens is spent; `completions` is the one place that decides this.
"""

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

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


def reply_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log pi(ids[t+1] | ids[..t]) at every position: logits (B, T, V), ids (B, T) -> (B, T-1)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature)[token] per row, in float32. logits: (B, V) -> (B,).

    The unfiltered distribution (top-k and top-p play no part); temperature 0 counts as 1.
    """
    t = temperature if temperature > 0 else 1.0
    logp = F.log_softmax(logits.float() / t, dim=-1)  # (B, V)
    return logp.gather(-1, tokens[:, None]).squeeze(-1)  # (B,)


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int = 0, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists of different lengths as one left-padded batch.

    Returns idx: (B, T) int64 with T the longest length and row b = [pad_id] * start[b] +
    prompts[b], and start: (B,) int64, start[b] = T - len(prompts[b]), the slot where row
    b's real tokens begin (model/gpt.py). An empty prompt is a ValueError.
    """
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(
                f"prompt {i} is empty: generation continues a prompt of at least one token "
                "(to start a fresh document, give the end-of-text token)"
            )
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for row, p in enumerate(prompts):
        idx[row, T - len(p) :] = torch.tensor(p, dtype=torch.long)
    start = torch.tensor([T - len(p) for p in prompts], dtype=torch.long)
    return idx.to(device), start.to(device)


class Window:
    """The tokens the model reads: slots 0 .. n-1 of a (B, block_size) buffer.

    Row b's real tokens are slots start[b] .. n-1 (start None: no row is padded). New
    tokens go into slot n; when all block_size slots are full, `push` first slides the
    window as the module docstring says, all rows together.
    """

    def __init__(self, idx: torch.Tensor, start: torch.Tensor | None, block_size: int) -> None:
        B, T = idx.shape
        crop = max(0, T - block_size)  # a prompt longer than the context loses its start
        self.ids = torch.zeros(B, block_size, dtype=torch.long, device=idx.device)
        self.n = T - crop
        self.ids[:, : self.n] = idx[:, crop:]
        self.start = self._shifted(start, crop)
        self.keep = max(1, block_size // 2)  # tokens left after a slide, the new one included

    @staticmethod
    def _shifted(start: torch.Tensor | None, dropped: int) -> torch.Tensor | None:
        """Each row's start once the first `dropped` slots are gone; None if no padding is left."""
        if start is None:
            return None
        start = (start - dropped).clamp(min=0)  # (B,)
        return start if bool(start.any()) else None  # no padding: the plain causal path

    def tokens(self) -> torch.Tensor:
        return self.ids[:, : self.n]  # (B, n)

    def push(self, tokens: torch.Tensor) -> bool:
        """Append tokens (B,) in slot n; returns True when the window slid to make room."""
        slid = self.n == self.ids.size(1)
        if slid:  # full: keep the last keep - 1 tokens at the front, the new one follows
            dropped = self.n - (self.keep - 1)
            self.ids[:, : self.keep - 1] = self.ids[:, dropped : self.n].clone()
            self.n = self.keep - 1
            self.start = self._shifted(self.start, dropped)
        self.ids[:, self.n] = tokens
        self.n += 1
        return slid


def last_logits(
    model: GPT, idx: torch.Tensor, cache: KVCache | None, start: torch.Tensor | None = None
) -> torch.Tensor:
    """Logits of the last slot only. idx: (B, T) -> (B, V).

    The LM head (C x V, the largest matrix of a small GPT) runs on one position, not T.
    """
    h = model.hidden(idx, cache, start)  # (B, T, C)
    return model.lm_head(h[:, -1])  # (B, V)


@torch.inference_mode()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens, logprobs), both (B,), for each of max_new_tokens steps.

    idx: (B, T) prompts; start: (B,) first real slot of each row when they are left-padded
    (left_pad), else None. tokens are int64, logprobs float32 (token_logprobs). Knows no
    stop tokens: the caller stops iterating (completions does). The window and use_cache:
    see the module docstring.

    Runs under torch.inference_mode: the yielded tensors are inference tensors; clone them
    outside inference mode before using them in anything that needs gradients. The model
    should be in eval mode (dropout off); its weights' dtype is the compute dtype.
    """
    if idx.size(1) == 0 or (start is not None and int(start.max()) >= idx.size(1)):
        raise ValueError("a prompt is empty: generation continues at least one token")
    if max_new_tokens < 1:
        return
    window = Window(idx, start, model.config.block_size)
    # the window never holds more than block_size slots, nor more than the prompt and the
    # new tokens: a cache of that size (Llama-family models come with long contexts)
    slots = min(model.config.block_size, window.n + max_new_tokens)
    cache = model.new_cache(idx.size(0), slots, window.start) if use_cache else None
    logits = last_logits(model, window.tokens(), cache, window.start if cache is None else None)
    for step in range(max_new_tokens):
        tokens = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        yield tokens, token_logprobs(logits, tokens, temperature)
        if step == max_new_tokens - 1:
            return
        slid = window.push(tokens)
        if cache is None:  # rerun the whole window
            logits = last_logits(model, window.tokens(), None, window.start)
        elif slid:  # prefill the kept tokens again, from slot 0
            cache.reset(window.start)
            logits = last_logits(model, window.tokens(), cache)
        else:  # only the new slot
            logits = last_logits(model, window.tokens()[:, -1:], cache)


@dataclass
class Completion:
    """One prompt's new tokens, as complete / completions return them."""

    tokens: list[int] = field(default_factory=list)  # the stop token included, last, if any
    stopped: bool = False  # True: tokens[-1] is a stop token; False: the budget ran out
    logprobs: list[float] | None = None  # per token of `tokens`, when asked for

    @property
    def text_tokens(self) -> list[int]:
        """The tokens without the stop token: what to decode as the reply's text."""
        return self.tokens[:-1] if self.stopped else self.tokens


def _budgets(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    budgets = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != n or any(b < 0 for b in budgets):
        raise ValueError(f"max_new_tokens: give one int >= 0, or one per prompt ({n})")
    return budgets


def completions(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] = (),
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    logprobs: bool = False,
) -> Iterator[list[Completion]]:
    """Decode one batch of prompts, yielding its completions after every step.

    The same Completion objects are yielded each time, each grown by the step's token
    while it is live (not stopped, budget not spent); the last yield holds the finished
    ones. Streaming reads tokens[-1] as it comes; `complete` keeps only the end.
    Arguments as for `complete`; at least one yield, even with nothing to do.
    """
    budgets = _budgets(max_new_tokens, len(prompts))
    out = [Completion(logprobs=[] if logprobs else None) for _ in prompts]
    live = [b > 0 for b in budgets]
    if not any(live):
        yield out
        return
    device = model.embed.wte.weight.device
    idx, start = left_pad(prompts, device=device)  # (B, T), (B,)
    stops = set(stop_ids)
    steps = generate(
        model, idx, max(budgets), temperature, top_k, top_p, use_cache, generator, start
    )
    for tokens, lps in steps:
        tokens, lps = tokens.tolist(), lps.tolist()  # one device sync per step
        for row, c in enumerate(out):
            if live[row]:
                c.tokens.append(tokens[row])
                if c.logprobs is not None:
                    c.logprobs.append(lps[row])
                c.stopped = tokens[row] in stops
                live[row] = not c.stopped and len(c.tokens) < budgets[row]
        yield out
        if not any(live):
            return


def complete(
    model: GPT,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int | Sequence[int],
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_ids: Sequence[int] = (),
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    logprobs: bool = False,
    batch_size: int | None = None,
) -> list[Completion]:
    """Run prompts (token id lists, any lengths >= 1) to completion: one Completion each.

    A completion ends at its first token in stop_ids (kept as its last token, stopped=True)
    or after max_new_tokens tokens (an int, or one budget per prompt). With logprobs=True
    each completion carries its tokens' log-probabilities (module docstring). The prompts
    go batch_size at a time (None: all in one batch), left-padded; within the context each
    greedy reply is what the prompt gets alone. Same generator state, same completions.
    """
    budgets = _budgets(max_new_tokens, len(prompts))
    size = batch_size or max(1, len(prompts))
    results: list[Completion] = []
    for first in range(0, len(prompts), size):
        batch = slice(first, first + size)
        *_, final = completions(  # the last yield holds the finished completions
            model,
            prompts[batch],
            budgets[batch],
            temperature,
            top_k,
            top_p,
            stop_ids,
            use_cache,
            generator,
            logprobs,
        )
        results += final
    return results
