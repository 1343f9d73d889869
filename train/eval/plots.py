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
    """Plot rollout_score and rollout_gold against rollout_kl (left) and against the rollout
    number (right), from metrics.jsonl records."""
    rows = [r for r in records if r.get("rollout_kl") is not None]
    window = max(1, len(rows) // 15)  # one rollout's figures are noisy: running means
    kl = _running_mean([r["rollout_kl"] for r in rows], window)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style, label in (
        ("rollout_score", "o-", "reward model (proxy)"),
        ("rollout_gold", "s-", "judge (gold)"),
    ):
        values = [r[key] if r.get(key) is not None else float("nan") for r in rows]
        left.plot(kl, _running_mean(values, window), style, ms=3, label=label)
        right.plot(range(1, len(values) + 1), values, style, ms=2, lw=0.8, label=label)
    left.set_xlabel(f"KL to the reference, nats per reply (running mean of {window})")
    right.set_xlabel("rollout")
    for ax in (left, right):
        ax.set_ylabel("mean score of the rollout's replies")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or "PPO: proxy and gold reward against KL")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _running_mean(values: list[float], window: int) -> list[float]:
    """The mean of each value and the window - 1 before it (fewer at the start)."""
    return [
        sum(values[max(0, i - window + 1) : i + 1]) / min(window, i + 1) for i in range(len(values))
    ]


def accuracy_bars(results: dict[str, dict], path: str | Path, paired: dict | None = None) -> Path:
    """Grouped bars: held-out accuracy per task (and overall) for each model; with `paired`
    ({model: {task: {"p": ...}}}, compare.paired_report) each bar of a model compared with
    the baseline carries its p-value, bold where p < 0.05."""
    names = list(results)
    tasks = [t for t in next(iter(results.values()))["tasks"]] + ["overall"]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(8, 1.5 * len(tasks)), 4.5))
    for i, name in enumerate(names):
        r = results[name]
        values = [r["tasks"].get(t, {}).get("accuracy", 0.0) for t in tasks[:-1]]
        values.append(r["overall"]["accuracy"])
        xs = [x + i * width for x in range(len(tasks))]
        ax.bar(xs, [100 * v for v in values], width, label=name)
        tests = (paired or {}).get(name, {})
        for x, v, task in zip(xs, values, tasks, strict=True):
            if task in tests:
                p = tests[task]["p"]
                weight = "bold" if p < 0.05 else "normal"
                label = f"p={p:.2g}"
                ax.text(x, 100 * v + 1, label, rotation=90, ha="center", fontsize=6, weight=weight)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(tasks))])
    ax.set_xticklabels(tasks, rotation=30, ha="right")
    ax.set_ylabel("held-out accuracy, %")
    ax.set_ylim(0, 125 if paired else 100)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
