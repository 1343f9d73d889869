"""The built-in preference set: the SFT model's own replies, ranked by the tasks' judge.

InstructGPT's labellers ranked K samples of the SFT model per prompt. Here a program does
the ranking, on the built-in tasks whose answers can be checked:

    for each prompt (training items of every task; held-out items for the held-out set):
        K replies sampled from the SFT model, temperature 1, batched (model/generate.py)
        each reply scored by data/judge.py: grade (1 = right, graded below for wrong ones)
        every pair of distinct replies with different scores -> (better, worse)

Replies that do not end their turn within the budget are left out (the reward model reads
a reply's end-of-turn token). Prompts whose replies all score the same give no pair.
Held-out pairs come only from held-out prompts.

Off-task replies (`preferences.borrowed`, training split only): the SFT model answers the
question it is asked, so its samples never show the reward model a reply to another
question, and a reward model that never saw one cannot score it low. PPO finds that gap at
once: against a reward model trained on the samples alone, the policy learnt to answer a
play's title to every question (greedy exact match 37.7% -> 0.9%). So each training prompt
also gets `borrowed` replies sampled for a prompt of another task, judged against this
prompt's answer like the rest. The held-out set keeps the SFT model's own samples only, so
the reward model's held-out accuracy measures what it did before.

The set is written as JSONL in the pair layout (data/preferences.py) with the judge's
scores, `train.jsonl` and `test.jsonl` in `preferences.dir`, with a meta.json holding the
key of everything it depends on (the SFT checkpoint's bytes, the judge's version, the task
settings, K, the number of prompts, temperature, budget, seed). When the key matches, the
files are read back instead of sampled again: the reward model and DPO train on the same
file, and users can read exactly what they learn from.
"""

import hashlib
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data import judge
from data.judge import grade
from data.preferences import PreferenceGroup, pair_records, read_preference_file
from data.sources import sha256_file
from data.tasks import TaskSet
from model.generate import complete
from tokenizer.chat import render_prompt

from ..core.files import atomic_write_text
from ..eval.task_eval import prompt_messages

FORMAT = 2  # 2: names held out from every task, conversations of several questions
SPLITS = ("train", "test")


def preference_key(cfg, sft_path: str) -> str:
    """What the set depends on, hashed."""
    p, t = cfg.preferences, cfg.tasks
    settings = {
        "format": FORMAT,
        "judge": judge.VERSION,
        "sft": sha256_file(sft_path),
        "tasks": {
            "seed": t.seed,
            "n_train": str(t.n_train),
            "n_test": t.n_test,
            "multi_turn": t.get("multi_turn", 0.0),
            "system_share": t.get("system_share", 0.0),
        },
        "data": cfg.data.name,
        "samples": p.samples,
        "prompts": p.prompts,
        "temperature": p.temperature,
        "max_new_tokens": p.max_new_tokens,
        "seed": p.seed,
        "borrowed": p.get("borrowed", 0),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def training_prompts(tasks: TaskSet, n: int) -> list[dict]:
    """n training items spread evenly over the tasks (the first of each task's items)."""
    names = sorted({item["task"] for item in tasks.train})
    per_task = {name: [i for i in tasks.train if i["task"] == name] for name in names}
    share = -(-n // max(1, len(names)))  # ceil
    return [item for name in names for item in per_task[name][:share]][:n]


def sample_groups(
    model, tok, items: list[dict], cfg, device, borrowed: int = 0, log=print
) -> list[PreferenceGroup]:
    """K sampled replies per item (and `borrowed` replies of other tasks' items), judged,
    as groups of ranked pairs."""
    p = cfg.preferences
    prompts = [render_prompt(tok, prompt_messages(item)) for item in items]
    budgets = [min(p.max_new_tokens, 2 * len(tok.encode(i["answer"])) + 8) for i in items]
    generator = torch.Generator(device=device).manual_seed(p.seed)
    k = p.samples
    start = time.perf_counter()
    repeated = [x for x in prompts for _ in range(k)]  # each prompt k times in a row
    budgets = [b for b in budgets for _ in range(k)]
    done = []
    for first in tqdm(range(0, len(repeated), p.batch_size), desc="sampling", leave=False):
        chunk = slice(first, first + p.batch_size)
        done += complete(model, repeated[chunk], budgets[chunk], temperature=p.temperature,
                         stop_ids=(tok.end_id, tok.eos_id), generator=generator)  # fmt: skip
    log(f"sampled {len(done)} replies in {time.perf_counter() - start:.0f}s")
    finished = [
        tok.decode(c.text_tokens) if c.stopped and c.tokens[-1] == tok.end_id else None
        for c in done
    ]  # None: the reply did not end its turn
    groups = []
    for n, item in enumerate(items):
        group = PreferenceGroup(prompt_messages(item), task=item["task"])
        replies = finished[n * k : (n + 1) * k] + off_task_replies(items, finished, n, k, borrowed)
        for text in replies:
            if text is not None:
                group.add([{"role": "assistant", "content": text}], grade(item, text))
        group.pairs = [
            (a, b)
            for a, sa in enumerate(group.scores)
            for b, sb in enumerate(group.scores)
            if sa > sb
        ]
        if group.pairs:
            groups.append(group)
    return groups


def off_task_replies(items: list[dict], finished: list, n: int, k: int, count: int) -> list:
    """`count` replies sampled for items of other tasks than item n: the first reply of
    the items 1/(count+1), 2/(count+1), ... of the list away (items come grouped by task)."""
    replies = []
    for j in range(1, count + 1):
        other = (n + j * len(items) // (count + 1)) % len(items)
        if items[other]["task"] != items[n]["task"]:
            replies.append(finished[other * k])
    return replies


def builtin_preferences(
    cfg, model, tok, tasks: TaskSet, sft_path: str, device, log=print
) -> dict[str, list[PreferenceGroup]]:
    """{"train": groups, "test": groups}: read from preferences.dir when up to date, else
    sampled, judged and written there."""
    out = Path(cfg.preferences.dir)
    key = preference_key(cfg, sft_path)
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        meta = {}
    if meta.get("key") == key and all((out / f"{s}.jsonl").is_file() for s in SPLITS):
        log(f"preference data up to date in {out}")
        return {s: read_preference_file(out / f"{s}.jsonl", log=log) for s in SPLITS}
    items = {"train": training_prompts(tasks, cfg.preferences.prompts), "test": tasks.test}
    was_training = model.training
    model.eval()
    borrowed = {"train": cfg.preferences.get("borrowed", 0), "test": 0}  # held out: own samples
    groups = {s: sample_groups(model, tok, items[s], cfg, device, borrowed[s], log) for s in SPLITS}
    model.train(was_training)
    for split in SPLITS:
        records = [r for g in groups[split] for r in pair_records(g)]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        atomic_write_text(out / f"{split}.jsonl", text)
    summary = {s: {"prompts": len(items[s]), "groups": len(groups[s]),
                   "pairs": sum(len(g.pairs) for g in groups[s])} for s in SPLITS}  # fmt: skip
    atomic_write_text(out / "meta.json", json.dumps({"key": key, **summary}, indent=1) + "\n")
    log(f"preference data written to {out}: {summary}")
    return groups
