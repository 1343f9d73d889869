"""Several models side by side on the same held-out items: the table `make align` ends with.

For each checkpoint (any kind but a reward model: its language model is scored):
    accuracy       greedy replies to the held-out task items, per task and overall,
                   each task judged by its match rule (data/judge.py)
                   (train/eval/task_eval.py), the same items for every model
    sampled        one reply per held-out prompt at temperature 1: the KL to the SFT model
                   (sum over the reply's tokens of log pi - log pi_sft, mean over replies),
                   the reward model's mean score, and the judge's mean grade (the gold)
    sampling       k replies per item of a fixed subset: one sample's accuracy and pass@k
                   (train/eval/sampled.py), when sampled_k > 0
and, with a reward model and best_of > 0, two rows more: best-of-n from the SFT model picked
by the reward model and by the judge (train/eval/best_of_n.py). Every model is then compared
with SFT item by item (McNemar's paired test: paired_report).

    python -m train.evaluate checkpoints=[out/pretrain,out/sft,out/ppo,out/dpo]
"""

from pathlib import Path

from ..core.checkpoint import load_kind, load_policy, resolve_checkpoint_path
from .best_of_n import best_of_n
from .plots import accuracy_bars
from .replies import Sampler, SamplingSettings
from .sampled import sampling_entry
from .stats import paired
from .task_eval import format_table, score

SAMPLED_REPLY_TOKENS = 48  # the sampled replies' budget when the greedy one follows the answers
SAMPLE_BATCH = 64  # prompts decoded together
UNFINISHED = -1.0  # the reward model's figure for a reply that never ends its turn (as PPO's)


def sampler(policy, reference, reward_model, tok, rt, reply_tokens: int, seed: int) -> Sampler:
    """Replies sampled as rollouts sample them, scored by the reward model (or the judge)."""
    reward = "model" if reward_model is not None else "tasks"
    settings = SamplingSettings(
        reply_tokens=reply_tokens,
        sample_batch=SAMPLE_BATCH,
        reward=reward,
        partial_credit=True,
        unfinished_penalty=UNFINISHED,
        seed=seed,
    )
    models = {"policy": policy, "reference": reference, "reward": reward_model}
    return Sampler(models, tok, settings, rt.device, rt.autocast)


def sampled(policy, reference, reward_model, tok, items, rt, reply_tokens: int, seed: int) -> dict:
    """Mean reward-model score, gold and KL to the reference of one sampled reply per item."""
    return sampler(policy, reference, reward_model, tok, rt, reply_tokens, seed).measure(items)


def compare(
    checkpoints: dict,
    sft: str,
    reward: str | None,
    items,
    rt,
    max_new_tokens=48,
    seed=0,
    sampled_k: int = 0,
    per_task: int = 60,
    best_of: int = 0,
) -> dict:
    """{name: held-out accuracy results with a "sampled" entry (and "sampling" with
    sampled_k)} for each named checkpoint, then the best-of-n rows (module docstring)."""
    reference, tok, _ = load_policy(sft)
    reference.to(rt.device)
    rm = load_kind(reward, "reward")[0].to(rt.device) if reward else None
    reply_tokens = max_new_tokens or SAMPLED_REPLY_TOKENS
    results = {}
    for name, path in checkpoints.items():
        model, _, _ = load_policy(path)
        model.to(rt.device)
        results[name] = score(model, tok, items, rt, max_new_tokens)
        results[name]["sampled"] = sampled(model, reference, rm, tok, items, rt, reply_tokens, seed)
        results[name]["checkpoint"] = str(path)
        if sampled_k:  # a finished stage's checkpoint does not change: cached beside it
            cache = str(resolve_checkpoint_path(path))
            results[name]["sampling"] = sampling_entry(
                model, tok, items, sampled_k, per_task, rt, seed, cache
            )
    if best_of and rm is not None:
        picker = sampler(reference, reference, rm, tok, rt, reply_tokens, seed)
        for scorer, figures in best_of_n(picker, items, best_of).items():
            results[f"best-of-{best_of} ({scorer})"] = figures
    return results


def paired_report(results: dict, baseline: str = "sft") -> dict:
    """For every model but the baseline: McNemar's test of its greedy answers against the
    baseline's on the same items (train/eval/stats.py), per task and overall."""
    base = results[baseline]["items"]
    return {name: paired(base, r["items"]) for name, r in results.items() if name != baseline}


def format_paired(results: dict, baseline: str = "sft") -> str:
    """Per task: each model's difference from the baseline in points, its p-value, and the
    items only each got right; then, where the results hold them (sampled_accuracy), one
    sample's accuracy and pass@k, and the share of the baseline's greedy-to-pass@k gap
    each model closed."""
    report = paired_report(results, baseline)
    lines = []
    for name, figures in report.items():
        lines.append(f"{name} against {baseline} (greedy, paired: McNemar's exact test)")
        for task, f in figures.items():
            sign = "*" if f["p"] < 0.05 else " "
            lines.append(
                f"  {task:<18} {100 * f['first']:5.1f} -> {100 * f['second']:5.1f}%  "
                f"{100 * f['difference']:+5.1f} pts  p={f['p']:.3g}{sign} "
                f"(only {baseline} right: {f['only_first']}, only {name}: {f['only_second']})"
            )
        lines += _sampled_lines(results[baseline], results[name], baseline, name)
    return "\n".join(lines)


def _sampled_lines(base: dict, other: dict, baseline: str, name: str) -> list[str]:
    """t1 accuracy and pass@k of both, and the gap closed (greedy on the same subset)."""
    a, b = base.get("sampling"), other.get("sampling")
    if not a or not b:
        return []
    k, lines = a["k"], [f"  sampled at temperature 1, {a['overall']['items']} items x {a['k']}:"]
    for task in [*a["tasks"], "overall"]:
        fa = a["overall"] if task == "overall" else a["tasks"][task]
        fb = b["overall"] if task == "overall" else b["tasks"].get(task, {})
        gap = _gap_closed(base, other, task, a["subset"], fa["pass"])
        lines.append(
            f"  {task:<18} one sample {100 * fa['t1']:5.1f} -> {100 * fb.get('t1', 0):5.1f}%  "
            f"pass@{k} {100 * fa['pass']:5.1f} -> {100 * fb.get('pass', 0):5.1f}%  "
            f"gap closed {gap}"
        )
    return lines


def _gap_closed(base: dict, other: dict, task: str, subset: list[int], ceiling: float) -> str:
    """(greedy of the other - greedy of the baseline) / (the baseline's pass@k - its greedy),
    all on the sampled subset's items (indices into the records)."""
    rows = [i for i in subset if task == "overall" or base["items"][i]["task"] == task]
    if not rows:
        return "-"
    g0 = sum(base["items"][i]["correct"] for i in rows) / len(rows)
    g1 = sum(other["items"][i]["correct"] for i in rows) / len(rows)
    return f"{(g1 - g0) / (ceiling - g0):+.0%}" if ceiling > g0 else "- (no gap)"


def format_comparison(results: dict) -> str:
    """The accuracy table, then each model's KL to SFT, reward and gold."""
    lines = [format_table(results), ""]
    lines.append(f"{'sampled replies':<16} " + "  ".join(f"{n:>8}" for n in results))
    for key, label in (("kl", "KL to SFT"), ("score", "reward model"), ("gold", "judge (gold)")):
        cells = [f"{r['sampled'][key]:8.3f}" for r in results.values()]
        lines.append(f"{label:<16} " + "  ".join(cells))
    return "\n".join(lines)


def write_report(results: dict, out_dir: str | Path, save_eval, baseline: str = "sft") -> Path:
    """report.json (with the paired tests against the baseline) and a bar chart of accuracy
    per task, each bar marked with its p-value against the baseline (accuracy.png)."""
    out_dir = Path(out_dir)
    paired = paired_report(results, baseline) if baseline in results else {}
    path = save_eval({**results, "paired": paired}, out_dir, name="report.json")
    accuracy_bars(results, out_dir / "accuracy.png", paired)
    return path
