"""The evaluation windows (data/loader.py sequential_windows), shared by the validation loss
of a token file and the bits per byte of a text (train/eval/lm_eval.py)."""

import numpy as np
import torch

from data.loader import sequential_windows
from model import IGNORE_INDEX


def test_windows_predict_every_token_once_and_pad_the_last():
    ids = np.arange(1, 12, dtype=np.int64)  # 11 ids: 10 targets, windows of 4: 4 + 4 + 2
    batches = list(sequential_windows(ids, block_size=4, batch_size=2))
    assert [len(x) for x, _ in batches] == [2, 1]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
    assert y.tolist() == [[2, 3, 4, 5], [6, 7, 8, 9], [10, 11, IGNORE_INDEX, IGNORE_INDEX]]
    targets = y[y != IGNORE_INDEX]
    assert sorted(targets.tolist()) == ids[1:].tolist()  # each exactly once
    assert x.dtype == y.dtype == torch.int64


def test_a_given_number_of_windows_leaves_the_tail_out():
    ids = np.arange(11, dtype=np.uint16)  # a memory-mapped split's dtype
    ((x, y),) = sequential_windows(ids, block_size=4, batch_size=8, n_windows=2)
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert y.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
