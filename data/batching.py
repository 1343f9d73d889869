"""Batches of token sequences of different lengths: right padding, the (x, y) collate, and
the length-grouped loader that SFT uses and the reward model and DPO are to share.

Padding, not packing. Sequences are padded on the right to the longest of their batch (ids
with pad_id, targets with -100). With causal attention, padding on the right never changes
what the real positions compute, so a training sequence is exactly what evaluation and chat
see: one conversation from position 0 after <bos>. Packing several into one row would let
each attend to the unrelated ones before it (the model has no per-document mask) and put
them at positions it never sees when chatting. The cost, the pad positions, is kept small
by batching sequences of about the same length together (LengthGroupedLoader); what that
buys is measured in docs/training.md ("How SFT batches").
"""

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from errors import UserError
from model import IGNORE_INDEX

Example = tuple[list[int], list[int]]  # (ids, mask): a rendered conversation, tokenizer/chat.py


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids padded on the right to the longest: (ids (B, T), lengths (B,)).

    ids[i, t] = rows[i][t] for t < lengths[i], else pad_id; T = max(lengths). Both int64.
    """
    if not rows:
        raise ValueError("pad_rows needs at least one row")
    lengths = torch.tensor([len(row) for row in rows], dtype=torch.long)  # (B,)
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)  # (B, T)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    return ids, lengths


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (x, y), int64 (B, T) with T the longest example's length - 1.

    x[i, t] = ids[t]; y[i, t] = ids[t + 1] where mask[t + 1] is 1, else -100. Pad
    positions are x = pad_id, y = -100.
    """
    x, _ = pad_rows([ids[:-1] for ids, _ in examples], pad_id)  # (B, T)
    y, _ = pad_rows([ids[1:] for ids, _ in examples], IGNORE_INDEX)  # (B, T)
    trained, _ = pad_rows([mask[1:] for _, mask in examples], 0)  # (B, T), 0 on the pads
    return x, y.masked_fill(trained == 0, IGNORE_INDEX)


class LengthGroupedLoader:
    """Padded batches of units, grouped by length; deterministic, resumable, per rank.

    A unit is what `collate` takes a list of, and length(unit) the length it pads to. A
    unit is never split between batches, so a unit can be a group of sequences that a loss
    must see together; its length is then that of its longest member:
      - SFT: one (ids, mask) example, length len(ids) (SFTLoader below);
      - reward model: the K responses of one prompt; collate pads all B*K of a batch's
        rows with pad_rows into one (B*K, T) batch, row b*K + k response k of prompt b;
      - DPO: a pair (chosen, rejected); rows 2b and 2b + 1 of one (2B, T) batch.

    The stream of units is epoch after epoch, each epoch a permutation drawn from (seed,
    epoch). Batches come in windows of `group` batches: window w holds the next group *
    batch_size units of the stream, sorted by length, cut into batches and put in an order
    drawn from (seed, w). Rank r of world_size W reads global batch g = step * W + r, so W
    ranks read together what one process reads. A batch depends on (seed, g) only, and
    state_dict() = {"seed", "step"}: plain ints, so a resumed run continues exactly.
    """

    def __init__(
        self,
        units: Sequence,
        length: Callable[[Any], int],
        collate: Callable[[list], tuple[torch.Tensor, ...]],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        group: int = 8,
    ):
        if batch_size < 1 or group < 1:
            raise ValueError(f"batch_size and group must be >= 1, got {batch_size}, {group}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if not units:
            raise UserError("no training examples; nothing to train on")
        self.units = list(units)
        self.lengths = np.array([length(u) for u in self.units])
        self.collate = collate
        self.batch_size, self.group = batch_size, group
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0  # batches this rank has drawn
        self._window: tuple[int, list[np.ndarray]] | None = None  # cache of the last window
        self._epochs: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> float:
        """Units drawn by all ranks so far, in epochs."""
        seen = self.step * self.world_size * self.batch_size
        return seen / len(self.units)

    def _stream(self, start: int, count: int) -> np.ndarray:
        """Unit indices at stream positions start .. start + count - 1."""
        n = len(self.units)
        positions = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(positions // n):
            if epoch not in self._epochs:
                if len(self._epochs) > 2:
                    self._epochs.pop(min(self._epochs))
                self._epochs[epoch] = np.random.default_rng([self.seed, 0, epoch]).permutation(n)
            here = positions // n == epoch
            out[here] = self._epochs[epoch][positions[here] % n]
        return out

    def _batch_indices(self, g: int) -> np.ndarray:
        """Unit indices of global batch g."""
        w, j = divmod(g, self.group)
        if self._window is None or self._window[0] != w:
            size = self.group * self.batch_size
            idx = self._stream(w * size, size)
            idx = idx[np.argsort(self.lengths[idx], kind="stable")]  # shortest first
            order = np.random.default_rng([self.seed, 1, w]).permutation(self.group)
            batches = np.split(idx, self.group)
            self._window = (w, [batches[k] for k in order])
        return self._window[1][j]

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        """collate of this rank's next batch_size units: CPU tensors."""
        g = self.step * self.world_size + self.rank
        self.step += 1
        return self.collate([self.units[i] for i in self._batch_indices(g)])

    def state_dict(self) -> dict:
        """The stream's position: plain ints, safe for torch.load(weights_only=True)."""
        return {"seed": int(self.seed), "step": int(self.step)}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])
        self._window, self._epochs = None, {}


def example_length(example: Example) -> int:
    """The length an (ids, mask) example pads to: its number of ids."""
    return len(example[0])


class SFTLoader(LengthGroupedLoader):
    """SFT's batches: (x, y) int64 (batch_size, T) from (ids, mask) examples, T the batch's
    longest - 1 (collate), grouped by len(ids); TokenLoader's interface (data/loader.py)."""

    def __init__(
        self,
        examples: Sequence[Example],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pad_id: int = 0,
        group: int = 8,
    ):
        pad = functools.partial(collate, pad_id=pad_id)
        super().__init__(examples, example_length, pad, batch_size, seed, rank, world_size, group)
        self.pad_id = pad_id


def eval_batches(
    examples: Sequence[Example], batch_size: int, pad_id: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every example once, in order, in padded batches (the last may be smaller): for a
    validation loss on held-out conversations."""
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size], pad_id)
