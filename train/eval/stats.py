"""When a difference between two models is real: McNemar's test on paired items.

Two models answer the same n items. Only the items they disagree on say which is better:
b items the first gets right and the second wrong, c the other way round. If the two were
equally good, each of those b + c items would go either way with probability 1/2, so

    p = min(1, 2 * P(X <= min(b, c))),      X ~ Binomial(b + c, 1/2)

is the chance of a split at least this lopsided by luck alone (exact, two-sided). On the
1,001 held-out items one model's accuracy has a standard error of about 1.5 points, but a
paired difference only about 1 point: the items both models get right (or wrong) cancel.
"""

import math
from collections.abc import Sequence


def mcnemar_p(b: int, c: int) -> float:
    """The exact two-sided McNemar p-value of b discordant items one way and c the other."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(first: Sequence[dict], second: Sequence[dict]) -> dict:
    """Per task and overall: both accuracies, the difference (second - first), the items
    only the first got right (b) and only the second (c), and McNemar's p. Records are
    task_eval's {"task", "correct", ...}, the same items in the same order; later
    questions of a conversation (turn > 1) are left out, as the overall figure leaves them."""
    if len(first) != len(second):
        raise ValueError(f"{len(first)} and {len(second)} records: not the same items")
    by_task: dict[str, list[tuple[bool, bool]]] = {}
    for a, z in zip(first, second, strict=True):
        if a.get("turn", 1) == 1:
            by_task.setdefault(a["task"], []).append((bool(a["correct"]), bool(z["correct"])))
    out = {task: _figures(pairs) for task, pairs in by_task.items()}
    out["overall"] = _figures([p for pairs in by_task.values() for p in pairs])
    return out


def _figures(pairs: list[tuple[bool, bool]]) -> dict:
    n = len(pairs)
    b = sum(a and not z for a, z in pairs)
    c = sum(z and not a for a, z in pairs)
    first, second = sum(a for a, _ in pairs) / n, sum(z for _, z in pairs) / n
    return {
        "first": first,
        "second": second,
        "difference": second - first,
        "items": n,
        "only_first": b,
        "only_second": c,
        "p": mcnemar_p(b, c),
    }
