"""Exact-match evaluation on held-out instruction items: does the model follow instructions?

Each item ({"task", "messages", "answer"}, see data/tasks.py) is asked in the chat format
(tokenizer/chat.py: render_prompt of every message before the final answer), the model
replies by greedy decoding (temperature 0) until it writes the end-of-turn token, and the
reply is compared with the item's answer after normalisation:

    repeat (the line must come back exactly):
        both sides: surrounding whitespace removed; nothing else changes.
    every other task (a word, a name, a title, a number):
        both sides: surrounding whitespace removed, inner runs of whitespace made one
        space, double quotes around it removed, trailing . , ; : ! ? removed (repeatedly),
        and compared case-insensitively (str.casefold), so "Hamlet." matches "hamlet".

Scores: accuracy per task, overall (every item counts once), and `form_average`, the mean
of the per-task accuracies of FORM_AVERAGE_TASKS (repeat, first word, last word: the
instruction-following target). The same items and the same decoding score the base model
and the SFT model, so their numbers compare.

Decoding stops at the end-of-turn (or end-of-text) token, or after
min(max_new_tokens, 2 * len(encode(answer)) + 8) tokens: a reply that needs more than
twice the answer's tokens plus eight is not going to match it, and a base model that
never stops would otherwise cost max_new_tokens per item. Items whose prompts have the
same length are decoded together in a batch (no padding, so each row computes what it
would alone).
"""

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from data.instruct import load_instruction_data
from data.sources import load_documents
from data.tasks import TaskSet, build_tasks, task_sizes
from errors import UserError
from model.generate import generate
from tokenizer.chat import render_prompt

EXACT_TASKS = ("repeat",)
FORM_AVERAGE_TASKS = ("repeat", "first_word", "last_word")
EVAL_FILE = "eval.json"
_TRAILING = ".,;:!?"


def normalize(text: str, task: str) -> str:
    """The form in which a reply and an answer are compared (see the module docstring)."""
    text = text.strip()
    if task in EXACT_TASKS:
        return text
    text = " ".join(text.split())
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].strip()
    return text.rstrip(_TRAILING).strip().casefold()


def is_correct(reply: str, answer: str, task: str) -> bool:
    return normalize(reply, task) == normalize(answer, task)


def prompt_messages(item: dict) -> list[dict]:
    """The conversation up to the reply the model must write (the final assistant answer
    is left out when the item carries it)."""
    messages = list(item["messages"])
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    return messages


@torch.no_grad()
def greedy_replies(
    model, tok, prompts: Sequence[list[int]], budgets: Sequence[int], device, batch_size: int = 32
) -> list[str]:
    """Greedy replies to rendered prompts; reply i is at most budgets[i] tokens, cut before
    the first end-of-turn (or end-of-text) token.

    Prompts of the same length are decoded together, up to batch_size at a time: no
    padding is needed, so each row computes what it would alone.
    """
    stops = (tok.end_id, tok.eos_id)
    replies: list[str] = [""] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    groups = [
        g[k : k + batch_size] for g in by_length.values() for k in range(0, len(g), batch_size)
    ]
    for group in groups:
        idx = torch.tensor([prompts[i] for i in group], dtype=torch.long, device=device)  # (B, T)
        budget = max(budgets[i] for i in group)
        out: list[list[int]] = [[] for _ in group]
        done = [False] * len(group)
        steps = generate(model, idx, budget, temperature=0.0, stop_ids=stops)
        for step, tokens in enumerate(steps):
            for row, token in enumerate(tokens.tolist()):
                if done[row] or step >= budgets[group[row]] or token in stops:
                    done[row] = True
                else:
                    out[row].append(token)
        for row, i in enumerate(group):
            replies[i] = tok.decode(out[row])
    return replies


def reply(model, tok, messages: Sequence[dict], device, max_new_tokens: int) -> str:
    """The model's greedy reply to one conversation, up to its end-of-turn token."""
    return greedy_replies(model, tok, [render_prompt(tok, messages)], [max_new_tokens], device)[0]


def evaluate_tasks(
    model,
    tok,
    items: Sequence[dict],
    device,
    max_new_tokens: int = 48,
    progress: bool = True,
    batch_size: int = 32,
) -> dict:
    """Exact-match accuracy of the model on items, per task and overall.

    The model should be in eval mode on `device`; wrap the call in the run's autocast for
    reduced precision. Items whose prompts have the same length are decoded batch_size
    at a time. Returns
        {"tasks": {task: {"accuracy", "correct", "total"}}, "overall": {...},
         "form_average": float or None, "form_tasks": [...],
         "items": [{"task", "prompt", "answer", "reply", "correct"}, ...]}
    """
    was_training = model.training
    model.eval()
    prompts = [render_prompt(tok, prompt_messages(item)) for item in items]
    budgets = [min(max_new_tokens, 2 * len(tok.encode(item["answer"])) + 8) for item in items]
    texts: list[str] = []
    chunk = 8 * batch_size  # decode in chunks so that the progress bar moves
    for start in tqdm(
        range(0, len(items), chunk), desc="task eval", disable=not progress, leave=False
    ):
        end = start + chunk
        texts += greedy_replies(model, tok, prompts[start:end], budgets[start:end], device,
                                batch_size)  # fmt: skip
    model.train(was_training)

    per_task: dict[str, list[int]] = {}
    records = []
    for item, text in zip(items, texts, strict=True):
        task, answer = item["task"], item["answer"]
        ok = is_correct(text, answer, task)
        per_task.setdefault(task, [0, 0])
        per_task[task][0] += int(ok)
        per_task[task][1] += 1
        messages = prompt_messages(item)
        prompt = messages[-1]["content"] if messages else ""
        records.append(
            {"task": task, "prompt": prompt, "answer": answer, "reply": text, "correct": ok}
        )

    tasks = {t: {"accuracy": c / n, "correct": c, "total": n} for t, (c, n) in per_task.items()}
    correct = sum(c for c, _ in per_task.values())
    total = sum(n for _, n in per_task.values())
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
        "items": records,
    }


def load_eval(run_dir: str | Path, name: str = EVAL_FILE) -> dict:
    """The results in run_dir/eval.json; {} when there is none or it cannot be read."""
    try:
        results = json.loads((Path(run_dir) / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return results if isinstance(results, dict) else {}


def save_eval(results: dict, run_dir: str | Path, name: str = EVAL_FILE) -> Path:
    """Write results as JSON to run_dir/eval.json (temporary name, then rename)."""
    path = Path(run_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


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
        return evaluate_tasks(model, tok, items, runtime.device, max_new_tokens)
