"""Best-of-n (train/eval/best_of_n.py): the pick, the KL formula, and the rows it makes."""

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch

from train.eval.best_of_n import best_of_n, best_of_n_kl, pick_best


def test_the_highest_score_is_picked_and_the_first_of_equals():
    scores = torch.tensor([[0.1, 2.0, 0.5], [0.9, 2.0, -1.0], [0.3, 1.0, 0.5]])  # (n=3, I=3)
    assert pick_best(scores).tolist() == [1, 0, 0]


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
def test_the_kl_formula_is_the_exact_kl_of_best_of_n_over_many_outcomes(n):
    """A policy uniform over M outcomes with distinct scores: best-of-n picks outcome i (the
    i-th lowest) with probability (i/M)^n - ((i-1)/M)^n; its KL from the uniform policy
    tends to log n - (n-1)/n as M grows."""
    M = 200_000
    cdf = torch.arange(M + 1, dtype=torch.float64) / M
    p = cdf[1:] ** n - cdf[:-1] ** n  # (M,)
    exact = float((p * torch.log(p * M)).sum())
    assert best_of_n_kl(n) == pytest.approx(exact, abs=1e-3)
    assert best_of_n_kl(1) == 0.0 and best_of_n_kl(8) == pytest.approx(math.log(8) - 7 / 8)


class FakeSampler:
    """Reply `stream` to an item is the word REPLIES[stream]; the reward model likes
    stream 2 best, whatever it says."""

    REPLIES = ["yes", "no", "maybe", "yes"]

    def __init__(self):
        self.s = SimpleNamespace(sample_batch=2)
        self.tok = SimpleNamespace(decode=lambda tokens: tokens)
        self.autocast = contextlib.nullcontext

    def sample(self, items, stream):
        return [(None, SimpleNamespace(text_tokens=self.REPLIES[stream])) for _ in items]

    def score(self, items, replies):
        text = replies[0][1].text_tokens
        stream = self.REPLIES.index(text)
        scores = torch.full((len(items),), 5.0 if stream == 2 else float(stream))
        gold = torch.tensor([1.0 if text == i["answer"] else 0.0 for i in items])
        return scores, gold, torch.ones(len(items), dtype=torch.bool)


def test_best_of_n_rows_pick_by_the_reward_model_and_by_the_judge():
    items = [
        {"task": "t", "messages": [{"role": "user", "content": "Say no"}], "answer": "no"},
        {"task": "t", "messages": [{"role": "user", "content": "Say yes"}], "answer": "yes"},
        {"task": "t", "messages": [{"role": "user", "content": "Say it"}], "answer": "never"},
    ]
    rows = best_of_n(FakeSampler(), items, n=4)
    by_rm, by_judge = rows["reward model"], rows["judge"]
    assert [r["reply"] for r in by_rm["items"]] == ["maybe"] * 3  # the reward model's favourite
    assert by_rm["overall"]["accuracy"] == 0.0 and by_rm["sampled"]["score"] == 5.0
    assert [r["reply"] for r in by_judge["items"]] == ["no", "yes", "yes"]  # first of equals
    assert by_judge["overall"]["correct"] == 2 and by_judge["sampled"]["gold"] == pytest.approx(
        2 / 3
    )
    assert by_rm["sampled"]["kl"] == by_judge["sampled"]["kl"] == pytest.approx(best_of_n_kl(4))
