"""Pictures of a run, written as PNG files beside its metrics (matplotlib, no screen needed).

reward_vs_kl   PPO's overoptimisation picture (Gao et al. 2022): the reward model's score
               (the proxy) and the judge's grade (the gold) of each rollout against its KL
               to the reference. While the two rise together the policy is getting
               better; a proxy that keeps rising while the gold stalls or falls is reward
               hacking: the policy found what the reward model likes, not what is right.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def reward_vs_kl(records: list[dict], path: str | Path, title: str = "") -> Path:
    """Plot rollout_score and rollout_gold against rollout_kl from metrics.jsonl records."""
    rows = [r for r in records if r.get("rollout_kl") is not None]
    kl = [r["rollout_kl"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(kl, [r["rollout_score"] for r in rows], "o-", ms=3, label="reward model (proxy)")
    ax.plot(kl, [r["rollout_gold"] for r in rows], "s-", ms=3, label="judge (gold)")
    ax.set_xlabel("KL to the reference, nats per reply")
    ax.set_ylabel("mean score of the rollout")
    ax.set_title(title or "PPO: proxy and gold reward against KL")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def accuracy_bars(results: dict[str, dict], path: str | Path) -> Path:
    """Grouped bars: held-out accuracy per task (and overall) for each model."""
    names = list(results)
    tasks = [t for t in next(iter(results.values()))["tasks"]] + ["overall"]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(tasks)), 4))
    for i, name in enumerate(names):
        r = results[name]
        values = [r["tasks"].get(t, {}).get("accuracy", 0.0) for t in tasks[:-1]]
        values.append(r["overall"]["accuracy"])
        ax.bar([x + i * width for x in range(len(tasks))], [100 * v for v in values], width,
               label=name)  # fmt: skip
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))])
    ax.set_xticklabels(tasks, rotation=30, ha="right")
    ax.set_ylabel("held-out accuracy, %")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
