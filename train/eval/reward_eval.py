"""How good a reward model is: does it order held-out replies as the judge does?

    pairwise accuracy      share of held-out pairs with r(better) > r(worse), all pairs,
                           overall and per task
    right vs wrong         the same over the pairs whose better reply is right (judge score
                           1) and worse reply wrong: the distinction that matters most
    rank correlation       Spearman's rho between the reward model's scores and the judge's
                           over every held-out reply (each reply once)
    mean reward            the mean score over the replies (after normalisation, the SFT
                           model's samples average 0)

The held-out pairs come from held-out prompts only (train/rl/preference_data.py).
"""

from collections.abc import Sequence

import numpy as np
import torch

from data.preferences import RenderedGroup, collate_groups


@torch.no_grad()
def group_rewards(model, groups: Sequence[RenderedGroup], pad_id: int, device, batch_size=16):
    """The reward of every row of every group: a list of (rows,) float tensors on the CPU.
    The caller sets eval mode and autocast (the training loop does)."""
    out = []
    for first in range(0, len(groups), batch_size):
        chunk = groups[first : first + batch_size]
        batch = collate_groups(chunk, pad_id)
        rewards = model(batch["ids"].to(device), batch["lengths"].to(device)).float().cpu()
        sizes = [len(g.rows) for g in chunk]
        out += list(torch.split(rewards, sizes))
    return out


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties get their average rank); None if undefined."""
    if len(a) < 2:
        return None
    ra, rb = _ranks(np.asarray(a, dtype=float)), _ranks(np.asarray(b, dtype=float))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):  # ties: the average of their ranks
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def _accuracy(hits: list[bool]) -> dict:
    return {"accuracy": sum(hits) / len(hits) if hits else None, "pairs": len(hits)}


def reward_metrics(model, groups: Sequence[RenderedGroup], pad_id: int, device) -> dict:
    """The figures of the module docstring, for eval.json."""
    rewards = group_rewards(model, groups, pad_id, device)
    per_task: dict[str, list[bool]] = {}
    right_vs_wrong, model_scores, judge_scores = [], [], []
    for group, r in zip(groups, rewards, strict=True):
        for a, b in group.pairs:
            hit = bool(r[a] > r[b])
            per_task.setdefault(group.task, []).append(hit)
            if group.scores[a] == 1.0 and (group.scores[b] or 0.0) < 1.0:
                right_vs_wrong.append(hit)
        for i, score in enumerate(group.scores):
            if score is not None:
                model_scores.append(float(r[i]))
                judge_scores.append(score)
    hits = [h for task_hits in per_task.values() for h in task_hits]
    all_rewards = torch.cat(rewards) if rewards else torch.zeros(0)
    return {
        "pairwise_accuracy": _accuracy(hits)["accuracy"],
        "pairs": len(hits),
        "tasks": {t: _accuracy(h) for t, h in sorted(per_task.items())},
        "right_vs_wrong": _accuracy(right_vs_wrong),
        "rank_correlation": spearman(model_scores, judge_scores),
        "mean_reward": float(all_rewards.mean()) if len(all_rewards) else None,
        "replies": len(all_rewards),
    }


def format_reward_table(metrics: dict) -> str:
    """Per-task pairwise accuracy and the summary figures, for the console."""
    lines = [f"{'task':<20} {'pairs':>6} {'accuracy':>9}"]
    for task, m in metrics["tasks"].items():
        lines.append(f"{task:<20} {m['pairs']:>6} {100 * m['accuracy']:>8.1f}%")
    lines.append(
        f"{'all pairs':<20} {metrics['pairs']:>6} {100 * metrics['pairwise_accuracy']:>8.1f}%"
    )
    rvw = metrics["right_vs_wrong"]
    if rvw["accuracy"] is not None:
        lines.append(f"{'right vs wrong':<20} {rvw['pairs']:>6} {100 * rvw['accuracy']:>8.1f}%")
    if metrics["rank_correlation"] is not None:
        lines.append(f"rank correlation with the judge: {metrics['rank_correlation']:.3f}")
    return "\n".join(lines)
