"""Exact-match evaluation on held-out instruction items: does the model follow instructions?

Each item ({"task", "messages", "answer"}, see data/tasks.py) is asked in the chat format
(tokenizer/chat.py: render_prompt of every message before the final answer), the model
replies by greedy decoding (temperature 0) until it writes the end-of-turn token, and the
reply is compared with the item's answer by the tasks' judge (data/judge.py: is_correct,
the rule that also labels the reward model's preference data): exact for repeat,
normalised (case, surrounding quotes and final punctuation forgiven) for the others.

Scores: accuracy per task, overall (every item counts once), and `form_average`, the mean
of the per-task accuracies of FORM_AVERAGE_TASKS (repeat, first word, last word: the
instruction-following target). The same items and the same decoding score the base model
and the SFT model, so their numbers compare.

Decoding stops at the end-of-turn (or end-of-text) token, or after
min(max_new_tokens, 2 * len(encode(answer)) + 8) tokens: a reply that needs more than
twice the answer's tokens plus eight is not going to match it, and a base model that
never stops would otherwise cost max_new_tokens per item. Items are decoded in batches
whatever their prompts' lengths (left padding, model/generate.py), and each row computes
what it would alone.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from data.instruct import load_instruction_data
from data.judge import is_correct
from data.sources import load_documents
from data.tasks import TaskSet, build_tasks, task_sizes
from errors import UserError
from model.generate import complete
from tokenizer.chat import render_prompt

from .files import atomic_write_text

FORM_AVERAGE_TASKS = ("repeat", "first_word", "last_word")
EVAL_FILE = "eval.json"


def prompt_messages(item: dict) -> list[dict]:
    """The conversation up to the reply the model must write (the final assistant answer
    is left out when the item carries it)."""
    messages = list(item["messages"])
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    return messages


def greedy_replies(
    model,
    tok,
    prompts: Sequence[list[int]],
    budgets: Sequence[int],
    batch_size: int = 32,
    progress: bool = False,
) -> list[str]:
    """Greedy replies to rendered prompts; reply i is at most budgets[i] tokens, cut before
    the first end-of-turn (or end-of-text) token.

    Prompts are decoded batch_size at a time whatever their lengths (left padding,
    model/generate.py complete): each reply is what its prompt gets alone.
    """
    stops = (tok.end_id, tok.eos_id)
    replies: list[str] = []
    batches = range(0, len(prompts), batch_size)
    for first in tqdm(batches, desc="task eval", disable=not progress, leave=False):
        batch = slice(first, first + batch_size)
        done = complete(model, prompts[batch], budgets[batch], temperature=0.0, stop_ids=stops)
        replies += [tok.decode(c.text_tokens) for c in done]
    return replies


def evaluate_tasks(
    model,
    tok,
    items: Sequence[dict],
    max_new_tokens: int = 48,
    progress: bool = True,
    batch_size: int = 32,
) -> dict:
    """Exact-match accuracy of the model on items, per task and overall.

    Decodes with the model on its own device, in eval mode; wrap the call in the run's
    autocast for reduced precision. Returns
        {"tasks": {task: {"accuracy", "correct", "total"}}, "overall": {...},
         "form_average": float or None, "form_tasks": [...],
         "items": [{"task", "prompt", "answer", "reply", "correct"}, ...]}
    """
    prompts = [render_prompt(tok, prompt_messages(item)) for item in items]
    budgets = [min(max_new_tokens, 2 * len(tok.encode(item["answer"])) + 8) for item in items]
    was_training = model.training
    model.eval()
    replies = greedy_replies(model, tok, prompts, budgets, batch_size, progress)
    model.train(was_training)
    records = []
    for item, reply in zip(items, replies, strict=True):
        messages = prompt_messages(item)
        records.append(
            {
                "task": item["task"],
                "prompt": messages[-1]["content"] if messages else "",
                "answer": item["answer"],
                "reply": reply,
                "correct": is_correct(reply, item["answer"], item["task"]),
            }
        )
    return {**tally(records), "items": records}


def tally(records: Sequence[dict]) -> dict:
    """Accuracy per task, overall (each item once) and the form average of scored records."""
    per_task: dict[str, list[int]] = {}  # task -> [correct, total]
    for r in records:
        counts = per_task.setdefault(r["task"], [0, 0])
        counts[0] += int(r["correct"])
        counts[1] += 1
    tasks = {t: {"accuracy": c / n, "correct": c, "total": n} for t, (c, n) in per_task.items()}
    correct, total = sum(int(r["correct"]) for r in records), len(records)
    form = [tasks[t]["accuracy"] for t in FORM_AVERAGE_TASKS if t in tasks]
    return {
        "tasks": tasks,
        "overall": {
            "accuracy": correct / total if total else 0.0,
            "correct": correct,
            "total": total,
        },
        "form_average": sum(form) / len(form) if form else None,
        "form_tasks": [t for t in FORM_AVERAGE_TASKS if t in tasks],
    }


def load_eval(run_dir: str | Path, name: str = EVAL_FILE) -> dict:
    """The results in run_dir/eval.json; {} when there is none or it cannot be read."""
    try:
        results = json.loads((Path(run_dir) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


def save_eval(results: dict, run_dir: str | Path, name: str = EVAL_FILE) -> Path:
    """Write results as JSON to run_dir/eval.json, atomically (train/files.py)."""
    text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    return atomic_write_text(Path(run_dir) / name, text)


def format_table(results: dict[str, dict]) -> str:
    """A side-by-side accuracy table, one column per result: {"base": r1, "sft": r2}."""
    names = list(results)
    tasks: list[str] = []
    for r in results.values():
        tasks += [t for t in r["tasks"] if t not in tasks]
    width = max([len("form average"), *map(len, tasks)])
    lines = [f"{'task':<{width}}  " + "  ".join(f"{n:>8}" for n in names)]

    def row(label: str, values: list) -> str:
        cells = ["       -" if v is None else f"{100 * v:7.1f}%" for v in values]
        return f"{label:<{width}}  " + "  ".join(cells)

    for t in tasks:
        lines.append(row(t, [r["tasks"].get(t, {}).get("accuracy") for r in results.values()]))
    lines.append(row("form average", [r["form_average"] for r in results.values()]))
    lines.append(row("overall", [r["overall"]["accuracy"] for r in results.values()]))
    return "\n".join(lines)


# ------------------------------------------------------------- shared by SFT and evaluate


def builtin_tasks(cfg) -> TaskSet:
    """The built-in tasks from the `data` corpus, as conf/tasks/builtin.yaml sets them."""
    t = cfg.tasks
    try:
        sizes = task_sizes(t.n_train)
    except ValueError as e:
        raise UserError(f"tasks.n_train: {e}") from None
    return build_tasks(load_documents(cfg.data), t.seed, sizes, t.n_test)


def eval_file_items(paths: Sequence[str], max_bad_fraction: float = 0.05) -> list[dict]:
    """Held-out items from the user's instruction files (Alpaca, Dolly, chat), one task per
    file named by its stem; the final assistant reply of each conversation is the answer."""
    items = []
    for path in paths:
        for messages in load_instruction_data([path], max_bad_fraction):
            items.append({"task": Path(path).stem, "messages": messages})
            items[-1]["answer"] = messages[-1]["content"]
    return items


def score(model, tok, items: Sequence[dict], runtime, max_new_tokens: int) -> dict:
    """evaluate_tasks on rank 0, in eval mode under the run's autocast ({} elsewhere)."""
    if not items or not runtime.is_main:
        return {}
    model.eval()
    with torch.no_grad(), runtime.autocast():
        return evaluate_tasks(model, tok, items, max_new_tokens)
