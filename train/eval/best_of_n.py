"""Best-of-n: the cheapest optimiser of a reward, and the plainest test of a reward model.

    for each held-out item: n replies sampled from the SFT model at temperature 1 (as
    rollouts sample), each scored; the reply scored highest is the answer (ties: the first)

No training. With the reward model as the scorer the accuracy says what the reward model
is worth: it can only pick among replies the SFT model already writes, so best-of-n with
the judge as the scorer (a right reply whenever any of the n is right: pass@n) is its
ceiling, and the SFT model's greedy accuracy the floor it must beat. The policy best-of-n
amounts to is at a KL from the SFT model of (Stiennon et al. 2020; Gao et al. 2022)

    KL(best-of-n || SFT) = log n - (n - 1) / n        nats, whatever the task

which is far less than RL spends for the same gain of reward.
"""

import math

import torch

from .replies import Sampler
from .task_eval import results_for


def best_of_n_kl(n: int) -> float:
    """log n - (n - 1) / n: the KL of best-of-n sampling from the policy it samples."""
    return math.log(n) - (n - 1) / n


def pick_best(scores: torch.Tensor) -> torch.Tensor:
    """scores (n, I): reply j's score for item i -> (I,) the index of the best reply to each
    item, the first of equal ones."""
    return scores.argmax(dim=0)


def best_of_n(sampler: Sampler, items: list[dict], n: int) -> dict[str, dict]:
    """{"reward model": results, "judge": results}: the task results (task_eval.results_for)
    of the reply picked among n by the sampler's reward model (its reward must be "model")
    and by the judge's grade, each with "sampled": the KL (the formula) and the picked
    replies' mean reward-model score and judge's grade, as compare.sampled reports them."""
    size, texts, scores, gold = sampler.s.sample_batch, [], [], []
    for stream in range(n):  # reply `stream` to every item
        row_texts, row_scores, row_gold = [], [], []
        for first in range(0, len(items), size):
            chunk = items[first : first + size]
            with torch.no_grad(), sampler.autocast():
                replies = sampler.sample(chunk, stream)
                s, g, _ = sampler.score(chunk, replies)
            row_texts += [sampler.tok.decode(c.text_tokens) for _, c in replies]
            row_scores.append(s)
            row_gold.append(g)
        texts.append(row_texts)
        scores.append(torch.cat(row_scores))
        gold.append(torch.cat(row_gold))
    scores, gold = torch.stack(scores), torch.stack(gold)  # (n, I) each
    out = {}
    for scorer, table in (("reward model", scores), ("judge", gold)):
        best = pick_best(table)  # (I,)
        chosen = [texts[j][i] for i, j in enumerate(best.tolist())]
        picked = {
            "kl": best_of_n_kl(n),
            "score": float(scores.gather(0, best[None]).mean()),
            "gold": float(gold.gather(0, best[None]).mean()),
        }
        out[scorer] = {**results_for(items, chosen), "sampled": picked, "n": n}
    return out
