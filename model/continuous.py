"""Continuous batching: one decoding batch whose rows join and leave between steps.

model/generate.py's `completions` decodes a batch that is fixed from its first step to its
last, with one set of sampling settings. A server gets requests at any moment, each with
settings of its own: were each batch run to its end before the next began, a newcomer
would wait for the longest reply in the batch, and a finished (or abandoned) reply would
keep its place until then. Here every step is

    leave:  rows that were cancelled go
    join:   rows that wait come in, their prompts prefilled together (one forward)
    sample: every row draws one token with its own settings (sample_next, in groups)
    finish: a row that drew one of its stop ids, or spent its budget, goes
    feed:   the other rows' tokens go in, one position each, in one forward of B rows

Shared slots. The rows live in one pair of KV buffers, (n_layer, capacity, n_head,
block_size, head_dim), and share one clock `pos`: the next token of every row goes into
slot pos. Row b's tokens fill slots start[b] .. pos-1 and the slots before start[b] are
hidden padding, as with left padding in model/generate.py (positions count from start[b],
model/embedding.py). So a newcomer whose prompt has L tokens is prefilled straight into
slots pos-L .. pos-1 of a free row (when pos < L, every live row first moves right by
L - pos). When pos reaches block_size, every row moves left by the smallest start, the
slots no row uses. There always are some: a row's prompt and budget fit the context
(len(prompt) + max_new_tokens <= block_size, the caller's promise; the server clamps a
reply's budget to it), and a row with start 0 would have written block_size - L + 1
tokens by then, one more than its budget allows. Moving a row keeps its positions, so what
a row computes depends neither on its slots nor on the rows beside it: a greedy row writes
what `complete` writes for its prompt alone (tests/test_continuous.py). There is no
sliding window: rows never outgrow the context.

Leaving: the last live row moves into the hole (its slots are copied), so rows 0 .. B-1
are the live ones and the model runs on views of the buffers, never on free rows.

Sampling: temperature, top-p, generator and stop ids are per row; top-k is the batch's.
Rows with equal settings draw together, one sample_next call per group: greedy rows, the
rows without a generator of their own at one (temperature, top_p) (from the batch's
generator), and each row that has its own generator alone, so that it draws from it
exactly the tokens it would draw alone.
"""

from dataclasses import dataclass, field

import torch

from .generate import last_logits, left_pad, sample_next
from .gpt import GPT
from .kv_cache import KVCache


@dataclass(eq=False)  # rows are told apart by identity: two rows may hold the same prompt
class Row:
    """One reply being written: its prompt, settings, and the tokens so far."""

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float | None = None
    generator: torch.Generator | None = None  # None: the batch's; on the model's device
    stop_ids: frozenset[int] = frozenset()
    tokens: list[int] = field(default_factory=list)  # a stop id, when drawn, is the last
    finish: str | None = None  # "stop" (a stop id), "length" (the budget), "cancelled"

    @property
    def text_tokens(self) -> list[int]:
        """The tokens without the stop id: what to decode as the reply's text."""
        return self.tokens[:-1] if self.finish == "stop" else self.tokens


class ContinuousBatch:
    """Up to `capacity` rows decoding together; add and cancel between steps."""

    def __init__(
        self,
        model: GPT,
        capacity: int,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        c = model.config
        w = model.embed.wte.weight
        self.model, self.capacity, self.block_size = model, capacity, c.block_size
        self.top_k, self.generator = top_k or None, generator
        self.device = w.device
        shape = (c.n_layer, capacity, c.n_head, c.block_size, c.head_dim)
        # Zeros, not torch.empty: a row's hidden slots get attention weight 0, and 0 * NaN
        # (what uninitialised memory may hold) is NaN. Slots only ever receive keys and
        # values after this, so every slot stays finite.
        self.k = torch.zeros(shape, device=w.device, dtype=w.dtype)
        self.v = torch.zeros(shape, device=w.device, dtype=w.dtype)
        self.rows: list[Row] = []  # live rows: row i of the buffers is rows[i]
        self.starts: list[int] = []  # rows[i]'s first slot
        self.waiting: list[Row] = []  # join at the next step
        self.logits: torch.Tensor | None = None  # (B, V) each live row's next-token logits
        self.pos = 0  # the slot every live row's next token goes into

    def __len__(self) -> int:
        return len(self.rows) + len(self.waiting)

    def room(self) -> int:
        """How many more rows may be added."""
        return self.capacity - len(self)

    def add(self, row: Row) -> None:
        """Queue a row; it joins at the next step."""
        if not 1 <= len(row.prompt) or row.max_new_tokens < 1:
            raise ValueError("a row needs a prompt of at least one token and a budget >= 1")
        if len(row.prompt) + row.max_new_tokens > self.block_size:
            raise ValueError(
                f"prompt ({len(row.prompt)}) + max_new_tokens ({row.max_new_tokens}) exceed "
                f"the context ({self.block_size}); clamp the budget"
            )
        if self.room() < 1:
            raise ValueError(f"the batch is full ({self.capacity} rows)")
        self.waiting.append(row)

    def cancel(self, row: Row) -> None:
        """Stop a row (it leaves at the next step); a finished row stays finished."""
        row.finish = row.finish or "cancelled"

    @torch.inference_mode()
    def step(self) -> list[Row]:
        """One token for every live row. Returns the rows that got one (row.tokens[-1]);
        those whose `finish` is now set have left the batch."""
        self._leave([r for r in self.rows if r.finish])
        self.waiting = [r for r in self.waiting if not r.finish]
        if self.waiting:
            self._join()
        if not self.rows:
            return []
        stepped = list(self.rows)
        for row, token in zip(stepped, self._sample(), strict=True):
            row.tokens.append(token)
            if token in row.stop_ids:
                row.finish = "stop"
            elif len(row.tokens) == row.max_new_tokens:
                row.finish = "length"
        self._leave([r for r in self.rows if r.finish])
        if self.rows:
            self._feed()
        return stepped

    # ------------------------------------------------------------------ the steps' parts

    def _start(self, rows: slice) -> torch.Tensor | None:
        """(B,) first slots of those rows, or None when none has padding (the plain path)."""
        starts = self.starts[rows]
        return torch.tensor(starts, device=self.device) if any(starts) else None

    def _join(self) -> None:
        """Prefill the waiting rows' prompts, left-padded together, into free rows so that
        each prompt ends at slot pos - 1."""
        new, self.waiting = self.waiting, []
        L = max(len(r.prompt) for r in new)
        if self.pos < L:
            self._move(L - self.pos)
        idx, pad = left_pad([r.prompt for r in new], device=self.device)  # (n, L), (n,)
        B, n, first = len(self.rows), len(new), self.pos - L
        cache = KVCache.over(  # rows B .. B+n-1 of the buffers, from slot pos - L on
            self.k[:, B : B + n, :, first:],
            self.v[:, B : B + n, :, first:],
            pad if bool(pad.any()) else None,
        )
        logits = last_logits(self.model, idx, cache)  # (n, V)
        self.rows += new
        self.starts += [first + int(s) for s in pad.tolist()]
        self.logits = logits if B == 0 else torch.cat([self.logits[:B], logits])

    def _sample(self) -> list[int]:
        """One token per live row, drawn in groups of equal settings (module docstring)."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(self.rows):
            own = r.generator is not None
            key = (0.0,) if r.temperature == 0 else (r.temperature, r.top_p, id(r.generator) * own)
            groups.setdefault(key, []).append(i)
        if len(groups) == 1:  # the common case: no gathering
            r = self.rows[0]
            return sample_next(
                self.logits, r.temperature, self.top_k, r.top_p, self._gen(r)
            ).tolist()
        tokens = torch.empty(len(self.rows), dtype=torch.long, device=self.device)  # (B,)
        for members in groups.values():
            r, idx = self.rows[members[0]], torch.tensor(members, device=self.device)
            tokens[idx] = sample_next(
                self.logits[idx], r.temperature, self.top_k, r.top_p, self._gen(r)
            )
        return tokens.tolist()

    def _gen(self, row: Row) -> torch.Generator | None:
        return row.generator if row.generator is not None else self.generator

    def _feed(self) -> None:
        """Run each live row's last token through the model, in slot pos."""
        B = len(self.rows)
        if self.pos == self.block_size:  # full: drop the slots no row uses
            self._move(-min(self.starts))
        tokens = torch.tensor([r.tokens[-1] for r in self.rows], device=self.device)  # (B,)
        cache = KVCache.over(self.k[:, :B], self.v[:, :B], self._start(slice(0, B)))
        cache.pos = self.pos
        self.logits = last_logits(self.model, tokens[:, None], cache)  # (B, V)
        self.pos += 1

    def _leave(self, gone: list[Row]) -> None:
        """Take rows out; the last live row moves into each hole."""
        for row in gone:
            i, last = self.rows.index(row), len(self.rows) - 1
            if i != last:
                self.k[:, i, :, : self.pos] = self.k[:, last, :, : self.pos]
                self.v[:, i, :, : self.pos] = self.v[:, last, :, : self.pos]
                self.logits[i] = self.logits[last]
                self.rows[i], self.starts[i] = self.rows[last], self.starts[last]
            self.rows.pop()
            self.starts.pop()
        if self.logits is not None:
            self.logits = self.logits[: len(self.rows)]
        if not self.rows:
            self.pos, self.logits = 0, None

    def _move(self, d: int) -> None:
        """Move every live row d slots (right when d > 0); positions stay as they were."""
        B = len(self.rows)
        if B:
            src, dst = slice(max(0, -d), self.pos), slice(max(0, d), self.pos + d)
            self.k[:, :B, :, dst] = self.k[:, :B, :, src].clone()
            self.v[:, :B, :, dst] = self.v[:, :B, :, src].clone()
            self.starts = [s + d for s in self.starts]
        self.pos += d
