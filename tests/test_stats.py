"""When a difference is real: McNemar's exact test on hand-made paired answers, and the
sampled figures (one sample's accuracy, pass@k) on hand-made counts."""

import pytest

from train.eval.sampled import subset, tally
from train.eval.stats import mcnemar_p, paired


def test_mcnemar_by_hand():
    # b = 1, c = 9: P(X <= 1) for X ~ Bin(10, 1/2) is (1 + 10) / 1024; two-sided: twice that
    assert mcnemar_p(1, 9) == pytest.approx(22 / 1024)
    assert mcnemar_p(9, 1) == mcnemar_p(1, 9)  # symmetric
    assert mcnemar_p(0, 0) == 1.0  # no item tells the models apart
    assert mcnemar_p(5, 5) == 1.0  # an even split: capped at 1
    assert mcnemar_p(0, 6) == pytest.approx(2 / 64)  # 6 wins out of 6: p = 0.031


def test_paired_counts_the_items_the_models_disagree_on():
    def records(task, answers):
        return [{"task": task, "correct": a} for a in answers]

    first = records("repeat", [1, 1, 0, 0, 1]) + records("count", [0, 0, 0, 0])
    second = records("repeat", [1, 0, 1, 1, 1]) + records("count", [1, 1, 1, 1])
    first.append({"task": "count", "correct": 0, "turn": 2})  # a later question: left out
    second.append({"task": "count", "correct": 1, "turn": 2})
    r = paired(first, second)
    assert r["repeat"]["only_first"] == 1 and r["repeat"]["only_second"] == 2
    assert r["repeat"]["difference"] == pytest.approx(0.2)
    assert r["count"]["only_second"] == 4 and r["count"]["p"] == pytest.approx(2 / 16)
    assert r["overall"]["items"] == 9
    assert r["overall"]["only_first"] == 1 and r["overall"]["only_second"] == 6
    assert r["overall"]["p"] == pytest.approx(mcnemar_p(1, 6))
    with pytest.raises(ValueError, match="not the same items"):
        paired(first, second[:-1])


def test_sampled_figures_by_hand():
    items = [{"task": "a"}, {"task": "a"}, {"task": "b"}, {"task": "b"}]
    right = [8, 0, 3, 0]  # right replies out of k = 8
    r = tally(items, right, k=8)
    assert r["tasks"]["a"]["t1"] == pytest.approx(8 / 16) and r["tasks"]["a"]["pass"] == 0.5
    assert r["tasks"]["b"]["t1"] == pytest.approx(3 / 16) and r["tasks"]["b"]["mixed"] == 0.5
    assert r["overall"]["pass"] == 0.5 and r["overall"]["t1"] == pytest.approx(11 / 32)


def test_the_sampled_subset_is_the_first_single_turn_items_of_each_task():
    items = [
        {"task": t, "turn": turn, "n": i}
        for i, (t, turn) in enumerate([("a", 1), ("a", 2), ("a", 1), ("b", 1), ("a", 1)])
    ]
    assert [i["n"] for i in subset(items, per_task=2)] == [0, 2, 3]
