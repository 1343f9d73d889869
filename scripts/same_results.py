"""Every stage's figures from short, seeded runs: to show that a change of the code's shape
changed nothing it computes.

    python scripts/same_results.py run before.json      # pretrain, sft, rm, ppo, grpo, dpo
    ...change the code...
    python scripts/same_results.py run after.json
    python scripts/same_results.py compare before.json after.json

Each stage runs tens to hundreds of steps on the CPU in float32 on one thread (the same arithmetic
every time), from the Shakespeare corpus and the built-in tasks with small held-out sets.
What is kept: every line of metrics.jsonl and eval.json, except timings (tokens/s, MFU,
seconds), which differ from run to run. `compare` prints the first values that differ.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["device=cpu", "precision=float32", "max_minutes=null", "log_interval=1"]
SMALL_TASKS = ["tasks.n_test=6", "tasks.n_test_turns=2"]
PREFS = ["preferences.prompts=48", "preferences.batch_size=48"]


def stages(work: Path) -> list[tuple[str, str, list[str]]]:
    """(name, module, overrides) in the order they run; each starts from the ones before."""
    sft, rm = f"init_from={work}/sft", f"reward_model={work}/rm"
    prefs = [*PREFS, f"preferences.dir={work}/prefs"]
    ppo = [
        sft,
        rm,
        *SMALL_TASKS,
        "iterations=3",
        "rollout_prompts=8",
        "minibatch_size=4",
        "eval_interval=6",
    ]
    return [
        ("pretrain", "train.pretrain", ["max_iters=200", "eval_interval=100", "eval_tokens=8192"]),
        (
            "sft",
            "train.sft",
            [
                f"init_from={work}/pretrain",
                "max_iters=150",
                "eval_interval=75",
                "batch_size=16",
                *SMALL_TASKS,
            ],
        ),
        ("rm", "train.reward", [sft, "max_iters=20", "eval_interval=10", *SMALL_TASKS, *prefs]),
        ("ppo", "train.ppo", ppo),
        (
            "grpo",
            "train.ppo",
            [*ppo, "reward=tasks", "advantage=group", "group_size=4", "rollout_prompts=2"],
        ),
        ("dpo", "train.dpo", [sft, "max_iters=20", "eval_interval=10", *SMALL_TASKS, *prefs]),
    ]


TIMING = ("tokens_per_sec", "mfu", "optimizer_mfu", "training_seconds", "seconds")


def without_timings(value):
    """The value with every timing entry (at any depth) left out."""
    if isinstance(value, dict):
        return {
            k: without_timings(v)
            for k, v in value.items()
            if k not in TIMING and not k.endswith("_seconds") and k != "checkpoint"
        }
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def run_all(out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    results = {}
    with tempfile.TemporaryDirectory(prefix="same-results-") as tmp:
        work = Path(tmp)
        for name, module, overrides in stages(work):
            args = [*COMMON, *overrides, f"out_dir={work}/{name}"]
            print(f"{name}: python -m {module} {' '.join(args)}", flush=True)
            subprocess.run(
                [sys.executable, "-m", module, *args],
                cwd=ROOT,
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
            )
            lines = (work / name / "metrics.jsonl").read_text().splitlines()
            evaluation = work / name / "eval.json"
            text = evaluation.read_text() if evaluation.exists() else "null"
            results[name] = without_timings(
                {
                    "metrics": [json.loads(line) for line in lines],
                    "eval": json.loads(text.replace(str(work), "<work>")),
                }
            )
    out.write_text(json.dumps(results, indent=1) + "\n")
    counts = ", ".join(f"{k} {len(v['metrics'])} lines" for k, v in results.items())
    print(f"written to {out}: {counts}")


def by_kind(metrics: list[dict]) -> dict:
    """The log's records as {"steps": update and evaluation records, "rollouts": each PPO
    rollout's figures once}: rollout figures are logged once per rollout, or (earlier
    versions) repeated on every update of the rollout; both read the same here."""
    steps, rollouts = [], []
    for record in metrics:
        figures = {k: v for k, v in record.items() if k.startswith("rollout_")}
        rest = {k: v for k, v in record.items() if not k.startswith("rollout")}
        if figures and (not rollouts or rollouts[-1] != figures):
            rollouts.append(figures)
        if set(rest) - {"step"}:
            steps.append(rest)
    return {"steps": steps, "rollouts": rollouts}


def differences(a, b, where: str = "") -> list[str]:
    """Every place where a and b differ, as 'path: a != b'."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{where}.{k}: only in one" for k in sorted(set(a) ^ set(b))]
        for k in a.keys() & b.keys():
            out += differences(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} entries != {len(b)}"]
        pairs = enumerate(zip(a, b, strict=True))
        return [d for i, (x, y) in pairs for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def count_values(value) -> int:
    if isinstance(value, dict):
        return sum(count_values(v) for v in value.values())
    if isinstance(value, list):
        return sum(count_values(v) for v in value)
    return 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run").add_argument("out", type=Path)
    cmp = sub.add_parser("compare")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "run":
        return run_all(args.out)
    before, after = (json.loads(p.read_text()) for p in (args.before, args.after))
    for results in (before, after):
        for stage in results.values():
            stage["metrics"] = by_kind(stage["metrics"])
    found = differences(before, after)
    for stage in before:
        n = count_values(before[stage])
        same = n - sum(d.startswith(f".{stage}.") for d in found)
        print(f"{stage}: {same} of {n} values equal")
    print("\n".join(found[:40]) or "every value equal")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
