"""Batches from a token file: shuffled windows for training, sequential ones for evaluation.

A token file (train.bin, val.bin) is one flat array of ids, memory-mapped so that a corpus
larger than RAM costs nothing to open. A training example is a window of block_size + 1
consecutive tokens: x is its first block_size tokens, y the last block_size, so y[t] is the
token that follows x[..t] (the model predicts every position of the window at once).

    loader = TokenLoader("out/data/shakespeare/train.bin", block_size=256, batch_size=32,
                         seed=1337, rank=0, world_size=1)
    x, y = loader.next_batch()          # two int64 tensors of shape (32, 256)

Training windows are drawn epoch by epoch, without replacement. An epoch cuts the split
into its n = (N - 1) // T non-overlapping windows of T + 1 tokens, starting at a random
offset o (0 <= o < T, so the cut points move from epoch to epoch), and visits them in a
random order:

    window j of the stream:  epoch e = j // n,  start = o_e + T * perm_e[j % n]

with o_e and perm_e drawn from a generator seeded with (seed, e). Every token is trained on
once per epoch. Drawing each window's start at random instead (with replacement) leaves
e^-k of the text unseen after k epochs' worth of draws (8% after the CPU demo's 2.5) and
shows other parts 5 times; on the demo the epochs lower the validation loss by 0.02 bits
per byte.

The stream is counter-based. Batch number g holds windows g * B ... g * B + B - 1. Rank r
of world_size W takes batches g = step * W + r, so every rank draws its own windows, and W
processes together see exactly the batches that one process with W-step gradient
accumulation would see (the distributed test relies on this). The whole position of the
stream is one integer: `state_dict()` is {"seed", "step"}, and a resumed run continues
exactly where it stopped.
"""

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from errors import UserError
from model import IGNORE_INDEX


def open_tokens(path: str | Path, dtype=None) -> np.ndarray:
    """Memory-map a token file. The dtype comes from meta.json beside it, else uint16."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"token file {path} does not exist; run `python -m data.prepare` first")
    if dtype is None:
        try:
            dtype = json.loads((path.parent / "meta.json").read_text())["dtype"]
        except (OSError, ValueError, KeyError, TypeError):
            dtype = np.uint16
    dtype = np.dtype(dtype)
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise UserError(
            f"token file {path} is {size} bytes, not a whole number of {dtype.name} ids; "
            "it is damaged: delete its folder and prepare the data again"
        )
    if size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _check_length(tokens: np.ndarray, block_size: int, path) -> None:
    if len(tokens) < block_size + 1:
        split = "raise" if Path(path).name.startswith("val") else "lower"
        raise UserError(
            f"{path} has {len(tokens)} tokens, fewer than one window of block_size + 1 = "
            f"{block_size + 1}; give the corpus more text, {split} data.val_fraction, "
            "or use a model with a smaller block_size"
        )


class TokenLoader:
    """Shuffled contiguous windows, epoch by epoch; deterministic under (seed, rank), resumable."""

    def __init__(
        self,
        path: str | Path,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        dtype=None,
    ):
        if block_size < 1 or batch_size < 1:
            raise ValueError(
                f"block_size and batch_size must be >= 1, got {block_size}, {batch_size}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.path = Path(path)
        self.tokens = open_tokens(path, dtype)
        _check_length(self.tokens, block_size, path)
        self.block_size, self.batch_size = block_size, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0  # batches drawn so far
        self._offsets = np.arange(block_size + 1)
        self.windows_per_epoch = (len(self.tokens) - 1) // block_size  # n >= 1
        self._epoch = None  # (e, o_e, perm_e) of the last epoch used

    def _epoch_order(self, epoch: int) -> tuple[int, np.ndarray]:
        """Epoch e's offset o_e and window order perm_e."""
        if self._epoch is None or self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            n, T = self.windows_per_epoch, self.block_size
            spare = len(self.tokens) - 1 - n * T  # tokens left after n windows: 0 .. T-1
            self._epoch = (epoch, int(rng.integers(0, spare + 1)), rng.permutation(n))
        return self._epoch[1], self._epoch[2]

    def window_starts(self, g: int) -> np.ndarray:
        """Where the windows of global batch g start: (batch_size,) token positions."""
        n, starts = self.windows_per_epoch, []
        for j in range(g * self.batch_size, (g + 1) * self.batch_size):
            offset, perm = self._epoch_order(j // n)
            starts.append(offset + self.block_size * perm[j % n])
        return np.array(starts)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 CPU tensors of shape (batch_size, block_size); y is x shifted by one."""
        g = self.step * self.world_size + self.rank  # this batch's number in the global stream
        starts = self.window_starts(g)
        windows = self.tokens[starts[:, None] + self._offsets].astype(np.int64)  # (B, T+1)
        self.step += 1
        w = torch.from_numpy(windows)
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    def state_dict(self) -> dict:
        """The stream's position: plain ints, safe for torch.load(weights_only=True)."""
        return {"seed": int(self.seed), "step": int(self.step)}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])


def eval_windows(
    path: str | Path,
    block_size: int,
    batch_size: int,
    max_tokens: int | None = None,
    dtype=None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Sequential, non-overlapping windows over a split, in batches: the validation loss.

    Window i is tokens[i*T : i*T + T + 1], so every token after the first is predicted
    exactly once; the tail shorter than a window is left out. `max_tokens` limits how many
    tokens are covered (at least one window). The last batch may be smaller.
    """
    tokens = open_tokens(path, dtype)
    _check_length(tokens, block_size, path)  # now, not when the first batch is asked for
    n_windows = (len(tokens) - 1) // block_size
    if max_tokens is not None:
        n_windows = max(1, min(n_windows, int(max_tokens) // block_size))
    return sequential_windows(tokens, block_size, batch_size, n_windows)


def sequential_windows(
    tokens: np.ndarray, block_size: int, batch_size: int, n_windows: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows over tokens (N ids), batch_size at a time.

    Window i reads x = tokens[i*T : i*T + T] and predicts y = tokens[i*T + 1 : i*T + T + 1],
    so windows 0 .. n_windows-1 predict every token of tokens[1 : n_windows*T + 1] once.
    n_windows: None covers them all, ceil((N - 1) / T) windows. A window that runs past the
    end is padded: x with 0, y with -100 (no target). Yields (x, y), int64 (b, T), b <=
    batch_size. Batch by batch, so a memory-mapped split is read only as far as needed.
    """
    T = block_size
    if n_windows is None:
        n_windows = -(-(len(tokens) - 1) // T)  # ceil
    for first in range(0, n_windows, batch_size):
        b = min(batch_size, n_windows - first)
        span = np.asarray(tokens[first * T : (first + b) * T + 1], dtype=np.int64)  # <= b*T + 1
        x = np.zeros(b * T, dtype=np.int64)
        y = np.full(b * T, IGNORE_INDEX, dtype=np.int64)
        x[: len(span) - 1] = span[:-1]  # consecutive windows are one contiguous span
        y[: len(span) - 1] = span[1:]
        yield torch.from_numpy(x).view(b, T), torch.from_numpy(y).view(b, T)
