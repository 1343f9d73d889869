"""The built-in preference set: the SFT model's own replies, ranked by the tasks' judge.

InstructGPT's labellers ranked K samples of the SFT model per prompt. Here a program does
the ranking, on the built-in tasks whose answers can be checked:

    for each prompt (training items of every task; validation and test items for the
    validation and held-out sets):
        K replies sampled from the SFT model, temperature 1, batched (model/generate.py):
        K = `samples` (4) for the held-out sets, `train_samples` for training
        each reply scored by data/judge.py: grade (1 = right, graded below for wrong ones)
        pairs of replies with different scores -> (better, worse): in the held-out sets
        every pair; for training every right-over-wrong pair and at most `wrong_pairs`
        pairs of two wrong replies (choose_pairs)

Replies that do not end their turn within the budget are left out (the reward model reads
a reply's end-of-turn token). Prompts whose replies all score the same give no pair.
Validation pairs come only from validation prompts (what the reward model is chosen and
normalised on), held-out pairs only from test prompts (scored once, at the end).

Off-task replies (`preferences.borrowed`, training split only): the SFT model answers the
question it is asked, so its samples never show the reward model a reply to another
question, and a reward model that never saw one cannot score it low. PPO finds that gap at
once: against a reward model trained on the samples alone, the policy learnt to answer a
play's title to every question (greedy exact match 37.7% -> 0.9%). So each training prompt
also gets `borrowed` replies sampled for a prompt of another task, judged against this
prompt's answer like the rest. The held-out set keeps the SFT model's own samples only, so
the reward model's held-out accuracy measures what it did before.

The set is written as JSONL in the pair layout (data/preferences.py) with the judge's
scores, `train.jsonl`, `val.jsonl` and `test.jsonl` in `preferences.dir`, with a meta.json
holding the key of everything it depends on (the SFT checkpoint's bytes, the judge's
version, the task settings, K, the number of prompts, the pairs chosen, temperature,
budget, seed). When the key matches, the
files are read back instead of sampled again: the reward model and DPO train on the same
file, and users can read exactly what they learn from.
"""

import hashlib
import json
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import checks
from checks import TRAINING_FILES, Settings, file_list, flag, integer, number, setting
from data import judge
from data.instruct import prompt_messages
from data.judge import grade
from data.preferences import (
    PreferenceGroup,
    load_preference_data,
    pair_records,
    read_preference_file,
    render_group,
)
from data.sources import DataConfig, sha256_file
from data.tasks import TasksConfig, TaskSet, builtin_tasks
from errors import UserError
from model.generate import complete
from tokenizer.chat import render_prompt

from ..core.files import atomic_write_text

FORMAT = 3  # 3: a validation split; training pairs right-over-wrong first
SPLITS = ("train", "val", "test")


@dataclass
class PreferencesConfig(Settings):
    """The built-in preference set's settings; conf/preferences/builtin.yaml gives and
    explains each value."""

    builtin: bool = setting(flag())
    dir: str = setting(checks.text())
    samples: int = setting(integer(2))
    train_samples: int = setting(integer(2))
    prompts: int = setting(integer(1))
    temperature: float = setting(number(above=0))
    borrowed: int = setting(integer(0))
    wrong_pairs: int = setting(integer(0))
    max_new_tokens: int = setting(integer(1))
    batch_size: int = setting(integer(1))
    seed: int = setting(integer())

    def prefix(self) -> str:
        return "preferences."


@dataclass
class PreferenceSources(Settings):
    """Where a preference stage's comparisons come from: the built-in set (made from the
    tasks of the `data` corpus) and the user's files. The reward model and DPO share it."""

    files: list[Any] = setting(TRAINING_FILES)
    eval_files: list[Any] = setting(file_list())
    max_bad_fraction: float = setting(number(0, 1))
    data: DataConfig
    tasks: TasksConfig
    preferences: PreferencesConfig


def preference_key(sources: PreferenceSources, sft_path: str) -> str:
    """What the set depends on, hashed."""
    p, t = sources.preferences, sources.tasks
    settings = {
        "format": FORMAT,
        "judge": judge.VERSION,
        "sft": sha256_file(sft_path),
        "tasks": {
            "seed": t.seed,
            "n_train": str(t.n_train),
            "n_test": t.n_test,
            "multi_turn": t.multi_turn,
            "system_share": t.system_share,
        },
        "data": sources.data.name,
        "samples": p.samples,
        "train_samples": p.train_samples,
        "prompts": p.prompts,
        "temperature": p.temperature,
        "max_new_tokens": p.max_new_tokens,
        "seed": p.seed,
        "borrowed": p.borrowed,
        "wrong_pairs": p.wrong_pairs,
        "n_val": t.n_val,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def training_prompts(tasks: TaskSet, n: int) -> list[dict]:
    """n training items spread evenly over the tasks (the first of each task's items)."""
    names = sorted({item["task"] for item in tasks.train})
    per_task = {name: [i for i in tasks.train if i["task"] == name] for name in names}
    share = -(-n // max(1, len(names)))  # ceil
    return [item for name in names for item in per_task[name][:share]][:n]


def sample_groups(
    model,
    tok,
    items: list[dict],
    p: PreferencesConfig,
    device,
    borrowed: int = 0,
    log=print,
    wrong_pairs: int | None = None,
) -> list[PreferenceGroup]:
    """K sampled replies per item (and `borrowed` replies of other tasks' items), judged,
    as groups of ranked pairs (choose_pairs: every pair, or with wrong_pairs the
    right-over-wrong ones and at most that many between two wrong replies)."""
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
        done += complete(
            model,
            repeated[chunk],
            budgets[chunk],
            temperature=p.temperature,
            stop_ids=(tok.end_id, tok.eos_id),
            generator=generator,
        )
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
        group.pairs = choose_pairs(group.scores, wrong_pairs)
        if group.pairs:
            groups.append(group)
    return groups


def choose_pairs(scores: list[float], wrong_pairs: int | None) -> list[tuple[int, int]]:
    """(better, worse) index pairs of replies with different scores: all of them (None), or
    every right-over-wrong pair (a score of 1 over one below) and at most `wrong_pairs`
    pairs of two wrong replies, those the judge sets furthest apart first. A pair of two
    mistakes ranked by partial credit teaches the form of an answer, not its correctness:
    the reward model trained on every pair ordered right-versus-wrong pairs no better than
    56% of the time."""
    pairs = [(a, b) for a, sa in enumerate(scores) for b, sb in enumerate(scores) if sa > sb]
    if wrong_pairs is None:
        return pairs
    right = [(a, b) for a, b in pairs if scores[a] == 1.0]
    wrong = sorted(
        (p for p in pairs if scores[p[0]] < 1.0), key=lambda p: scores[p[1]] - scores[p[0]]
    )
    return right + wrong[:wrong_pairs]


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
    sources: PreferenceSources, model, tok, tasks: TaskSet, sft_path: str, device, log=print
) -> dict[str, list[PreferenceGroup]]:
    """{"train": groups, "test": groups}: read from preferences.dir when up to date, else
    sampled, judged and written there."""
    p = sources.preferences
    out = Path(p.dir)
    key = preference_key(sources, sft_path)
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        meta = {}
    if meta.get("key") == key and all((out / f"{s}.jsonl").is_file() for s in SPLITS):
        log(f"preference data up to date in {out}")
        return {s: read_preference_file(out / f"{s}.jsonl", log=log) for s in SPLITS}
    items = {"train": training_prompts(tasks, p.prompts), "val": tasks.val, "test": tasks.test}
    was_training = model.training
    model.eval()
    borrowed = {"train": p.borrowed, "val": 0, "test": 0}  # held out: its own samples only
    k = {"train": p.train_samples, "val": p.samples, "test": p.samples}
    pairs = {"train": p.wrong_pairs, "val": None, "test": None}  # held out: every pair
    groups = {
        s: sample_groups(
            model, tok, items[s], replace(p, samples=k[s]), device, borrowed[s], log, pairs[s]
        )
        for s in SPLITS
    }
    model.train(was_training)
    for split in SPLITS:
        records = [r for g in groups[split] for r in pair_records(g)]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        atomic_write_text(out / f"{split}.jsonl", text)
    summary = {
        s: {
            "prompts": len(items[s]),
            "groups": len(groups[s]),
            "pairs": sum(len(g.pairs) for g in groups[s]),
        }
        for s in SPLITS
    }
    atomic_write_text(out / "meta.json", json.dumps({"key": key, **summary}, indent=1) + "\n")
    log(f"preference data written to {out}: {summary}")
    return groups


def preference_groups(
    sources: PreferenceSources, stage, sft, tok, sft_path: str, keep_builtin=None
) -> dict:
    """{"train": groups, "val": groups, "test": groups}: the built-in set (made on rank 0
    first) and the user's files (training files, and held-out ones as eval_files, which
    also serve as the validation set when the built-in set has none); keep_builtin(groups),
    when given, selects among the built-in training groups (DPO's min_chosen_score: the
    judge's scores, which users' files do not share)."""
    sets = {"train": [], "val": [], "test": []}
    if sources.preferences.builtin:
        tasks = builtin_tasks(sources.tasks, sources.data)
        device = stage.runtime.device
        build = partial(
            builtin_preferences, sources, sft.to(device), tok, tasks, sft_path, device, stage.log
        )
        sets = stage.main_first(build)
        if keep_builtin is not None:
            sets["train"] = keep_builtin(sets["train"])
    if sources.files:
        sets["train"] += load_preference_data(
            sources.files, sources.max_bad_fraction, stage.settings.seed, stage.log
        )
    for path in sources.eval_files:
        sets["test"] += load_preference_data(
            [path], sources.max_bad_fraction, stage.settings.seed, stage.log, setting="eval_files"
        )
    if not sets["train"]:
        raise UserError("no preference data: set preferences.builtin=true or give files=[...]")
    sets["val"] = sets["val"] or sets["test"]
    return sets


def rendered(tok, groups, block_size: int, what: str, log) -> list:
    """The groups rendered with the chat format (those that fit the context), counted."""
    out = [r for r in (render_group(tok, g, block_size) for g in groups) if r is not None]
    pairs = sum(len(r.pairs) for r in out)
    log(f"{what}: {len(out)} prompts, {sum(len(r.rows) for r in out)} replies, {pairs} pairs")
    return out
