"""Held-out accuracy on instruction items: does the model follow instructions?

Each item ({"task", "messages", "answer"}, see data/tasks.py) is asked in the chat format
(tokenizer/chat.py: render_prompt of every message before the final answer), the model
replies by greedy decoding (temperature 0) until it writes the end-of-turn token, and the
reply is judged against the item's answer by data/judge.py under the item's match rule:
exact (surrounding whitespace aside) for repeat and, unless they say otherwise, the
user's eval files; normalised (case, surrounding quotes, final punctuation aside) for the
other built-in tasks. The rule is named per task in eval.json and in the table.

Scores: accuracy per task, overall (every item counts once), and `form_average`, the mean
of the per-task accuracies of FORM_AVERAGE_TASKS (repeat, first word, last word: the
instruction-following target); these count the items asked alone (the built-in held-out
items, the user's eval files). Built-in items asked as the 2nd or 3rd question of a
conversation (data/multiturn.py) are scored per position, "turns": answer 1 (asked alone),
answer 2, answer 3, and those after a system line, each later-answer figure beside the
same items' single-turn figure ("single_turn"). The same items and the same decoding
score every model, and `item_set` (a count and a fingerprint of the items) says which
items these were, so that figures from different item sets are never put side by side.

Decoding stops at the end-of-turn (or end-of-text) token, or after 2 * n + 8 tokens, n the
reference reply's length in tokens (a reply that needs more than twice that plus eight is
not going to match it; a base model that never stops would otherwise run on), and never
after max_new_tokens when that is set: an answer longer than max_new_tokens can never
score, which check_budget warns about. Items are decoded in batches whatever their prompts'
lengths (left padding, model/generate.py), and each row computes what it would alone.
"""

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from data.instruct import load_instruction_data, prompt_messages, reference_tokens, reply_budgets
from data.judge import MATCH_RULES, is_correct, match_rule
from data.records import file_entry
from errors import UserError
from model.generate import complete
from tokenizer.chat import render_prompt

from ..core.runtime import precision_name

FORM_AVERAGE_TASKS = ("repeat", "first_word", "last_word")


def check_budget(tok, items: Sequence[dict], max_new_tokens: int | None) -> str | None:
    """A warning when some reference replies are longer than max_new_tokens (they can never
    score), with their count; None when all fit."""
    if not max_new_tokens:
        return None
    lengths = [reference_tokens(tok, item) for item in items]
    over = [n for n in lengths if n > max_new_tokens]
    if not over:
        return None
    return (
        f"{len(over)} of {len(items)} held-out answers are longer than eval_max_new_tokens="
        f"{max_new_tokens} tokens (the longest {max(over)}), so they can never score; "
        "raise it, or set it to null to follow the answers"
    )


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
    max_new_tokens: int | None = None,
    progress: bool = True,
    batch_size: int = 32,
) -> dict:
    """Accuracy of the model on items, per task, overall and per turn position.

    Decodes with the model on its own device, in eval mode; wrap the call in the run's
    autocast for reduced precision. Returns tally's figures and
    "items": [{"task", "prompt", "answer", "reply", "correct", "match", ...}, ...].
    """
    prompts = [render_prompt(tok, prompt_messages(item)) for item in items]
    budgets = reply_budgets(tok, items, max_new_tokens)
    was_training = model.training
    model.eval()
    replies = greedy_replies(model, tok, prompts, budgets, batch_size, progress)
    model.train(was_training)
    return results_for(items, replies)


def results_for(items: Sequence[dict], replies: Sequence[str]) -> dict:
    """Each item's reply judged by its match rule: tally's figures and
    "items": [{"task", "prompt", "answer", "reply", "correct", "match", ...}, ...]."""
    records = []
    for item, reply in zip(items, replies, strict=True):
        messages = prompt_messages(item)
        rule = match_rule(item)
        record = {
            "task": item["task"],
            "prompt": messages[-1]["content"] if messages else "",
            "answer": item["answer"],
            "reply": reply,
            "correct": is_correct(reply, item["answer"], rule),
            "match": rule,
        }
        for key in ("turn", "system", "source"):
            if key in item:
                record[key] = item[key]
        records.append(record)
    return {**tally(records), "item_set": item_set(items), "items": records}


def item_set(items: Sequence[dict]) -> dict:
    """What identifies a set of items: their count and a fingerprint of their contents."""
    digest = hashlib.sha256()
    for item in items:
        text = [item["task"], item["answer"], [(m["role"], m["content"]) for m in item["messages"]]]
        digest.update(json.dumps(text, ensure_ascii=False).encode())
    return {"count": len(items), "fingerprint": digest.hexdigest()[:16]}


def _accuracy(records: Sequence[dict]) -> dict:
    correct = sum(int(r["correct"]) for r in records)
    return {
        "accuracy": correct / len(records) if records else 0.0,
        "correct": correct,
        "total": len(records),
    }


def tally(records: Sequence[dict]) -> dict:
    """Accuracy per task (with its match rule), overall (each item once) and the form
    average of the items asked alone; the turn-position figures of the built-in items."""
    alone = [r for r in records if r.get("turn", 1) == 1]
    per_task: dict[str, list[dict]] = {}
    for r in alone:
        per_task.setdefault(r["task"], []).append(r)
    tasks = {
        t: {**_accuracy(rs), "match": "/".join(sorted({r["match"] for r in rs}))}
        for t, rs in per_task.items()
    }
    form = [tasks[t]["accuracy"] for t in FORM_AVERAGE_TASKS if t in tasks]
    return {
        "tasks": tasks,
        "overall": _accuracy(alone),
        "form_average": sum(form) / len(form) if form else None,
        "form_tasks": [t for t in FORM_AVERAGE_TASKS if t in tasks],
        "turns": turn_figures(records),
        "match_rules": MATCH_RULES,
    }


def turn_figures(records: Sequence[dict]) -> dict:
    """{"1": figures of the built-in items asked alone, "2", "3": of those asked as that
    question, "system": of the later answers after a system line}; each later figure with
    "single_turn": the accuracy of the same items asked alone."""
    positioned = [r for r in records if "turn" in r]
    alone = {(r["task"], r.get("source")): r for r in positioned if r["turn"] == 1}
    groups: dict[str, list[dict]] = {}
    for r in positioned:
        groups.setdefault(str(r["turn"]), []).append(r)
        if r["turn"] > 1 and r.get("system"):
            groups.setdefault("system", []).append(r)
    figures = {}
    for name, rs in groups.items():
        figures[name] = _accuracy(rs)
        twins = [alone[key] for r in rs if (key := (r["task"], r.get("source"))) in alone]
        if name != "1" and twins:
            figures[name]["single_turn"] = _accuracy(twins)["accuracy"]
    return figures


TURN_ROWS = {
    "1": "answer 1 (alone)",
    "2": "answer 2",
    "3": "answer 3",
    "system": "after a system line",
}


def format_table(results: dict[str, dict]) -> str:
    """A side-by-side accuracy table, one column per result: {"base": r1, "sft": r2}; the
    match rule of each task, then the figures per turn position (with the same items'
    single-turn figure in parentheses)."""
    names = list(results)
    tasks: list[str] = []
    for r in results.values():
        tasks += [t for t in r["tasks"] if t not in tasks]
    width = max([len("after a system line"), *map(len, tasks)])
    lines = [f"{'task':<{width}}  {'match':<10}  " + "  ".join(f"{n:>17}" for n in names)]

    def cell(value, single=None) -> str:
        text = "-" if value is None else f"{100 * value:.1f}%"
        return f"{text:>7} ({100 * single:5.1f}%)" if single is not None else f"{text:>17}"

    def row(label: str, match: str, cells: list[str]) -> str:
        return f"{label:<{width}}  {match:<10}  " + "  ".join(cells)

    for t in tasks:
        match = next((r["tasks"][t]["match"] for r in results.values() if t in r["tasks"]), "")
        lines.append(
            row(t, match, [cell(r["tasks"].get(t, {}).get("accuracy")) for r in results.values()])
        )
    lines.append(row("form average", "", [cell(r["form_average"]) for r in results.values()]))
    lines.append(row("overall", "", [cell(r["overall"]["accuracy"]) for r in results.values()]))
    for key, label in TURN_ROWS.items():
        figures = [r.get("turns", {}).get(key) for r in results.values()]
        if any(f and key != "1" for f in figures):
            lines.append(
                row(
                    label,
                    "",
                    [
                        cell(f["accuracy"], f.get("single_turn")) if f else cell(None)
                        for f in figures
                    ],
                )
            )
        elif key == "1" and any(len(r.get("turns", {})) > 1 for r in results.values()):
            lines.append(
                row(label, "", [cell(f["accuracy"]) if f else cell(None) for f in figures])
            )
    if len(lines) > len(tasks) + 4:
        lines.append(
            "(answer k: held-out items asked k-th in a conversation; in parentheses, "
            "the same items asked alone)"
        )
    return "\n".join(lines)


# ------------------------------------------------------------- shared by SFT and evaluate


def eval_file_items(
    entries: Sequence, max_bad_fraction: float = 0.05, taken: Sequence[str] = (), log=print
) -> list[dict]:
    """Held-out items from the user's instruction files (any layout data/instruct.py
    reads), one task per file; the final assistant reply of each conversation is the answer.

    Each entry is a path or {path, match, name}: the task is named by `name`, else by the
    file's stem; a stem already taken (by a built-in task in `taken`, or an earlier file)
    names the task by the path instead, with a note, so that two files never merge. The
    match rule is exact unless the entry says match: normalised."""
    items, names = [], set(taken)
    for entry in entries:
        path, options = file_entry(entry, "eval_files", ("match", "name"))
        name = options.get("name") or Path(path).stem
        if name in names and "name" not in options:
            log(f"note: eval file {path} is scored as task '{path}' ('{name}' is taken)")
            name = path
        if name in names:
            raise UserError(
                f"eval_files: two files are scored as task '{name}'; give each its own "
                f"name, e.g. eval_files=[{{path: {path}, name: other}}], or list a file once"
            )
        names.add(name)
        rule = options.get("match", "exact")
        if rule not in MATCH_RULES:
            raise UserError(f"eval_files: match {rule!r} of {path}; use exact or normalised")
        for messages in load_instruction_data(
            [path], max_bad_fraction, log=log, setting="eval_files"
        ):
            answer = messages[-1]["content"]
            items.append({"task": name, "messages": messages, "answer": answer, "match": rule})
    return items


def score(model, tok, items: Sequence[dict], runtime, max_new_tokens: int | None) -> dict:
    """evaluate_tasks on rank 0, in eval mode under the run's autocast ({} elsewhere),
    with the precision it ran at (figures in bf16 and float32 differ a little)."""
    if not items or not runtime.is_main:
        return {}
    model.eval()
    with torch.no_grad(), runtime.autocast():
        results = evaluate_tasks(model, tok, items, max_new_tokens)
    return {**results, "precision": precision_name(runtime.dtype)}
