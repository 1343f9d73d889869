"""Sampling at temperature 1, k replies per held-out item: what the model sometimes knows.

    t1 accuracy = mean over items of (right replies / k)       one sample's expected accuracy
    pass@k      = share of items with at least one right reply among the k

Greedy accuracy is what the evaluation scores; pass@k is the ceiling that sharpening can
reach. Reinforcement learning mostly concentrates probability on answers the model already
gives sometimes: it raises greedy and one-sample accuracy towards pass@k, and does little
where pass@k is near 0. The figures are taken on a fixed subset (the first `per_task`
single-turn items of each task) and, for a checkpoint that does not change (the SFT
model), computed once and kept beside it (cached_sampled).
"""

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from checks import Settings, integer, setting
from data.instruct import prompt_messages, reply_budgets
from data.judge import is_correct, match_rule
from data.sources import sha256_file
from model.generate import complete
from tokenizer.chat import render_prompt

from ..core.files import load_eval, save_eval
from ..core.runtime import precision_name

CACHE = "sampled.json"  # beside the checkpoint: {key: figures}


@dataclass
class SampledSettings(Settings):
    """How many replies per item, on how many items of each task (conf/heldout.yaml)."""

    sampled_k: int = setting(integer(0))  # 0: no sampled figures
    sampled_per_task: int = setting(integer(1))


def subset(items: Sequence[dict], per_task: int) -> list[dict]:
    """The first per_task items of each task asked alone (a fixed subset of the items)."""
    taken: dict[str, int] = {}
    out = []
    for item in items:
        if item.get("turn", 1) == 1 and taken.get(item["task"], 0) < per_task:
            taken[item["task"]] = taken.get(item["task"], 0) + 1
            out.append(item)
    return out


@torch.no_grad()
def sampled_accuracy(model, tok, items: Sequence[dict], k: int, runtime, seed: int) -> dict:
    """t1 accuracy and pass@k per task and overall, over k replies per item sampled at
    temperature 1 with the evaluation's budgets (module docstring)."""
    prompts = [render_prompt(tok, prompt_messages(item)) for item in items]
    budgets = reply_budgets(tok, items, None)
    generator = torch.Generator(device=runtime.device).manual_seed(seed)
    stops, right = (tok.end_id, tok.eos_id), []
    model.eval()
    with runtime.autocast():
        for first in range(0, len(items), 8):
            chunk = range(first, min(first + 8, len(items)))  # 8 items x k replies a batch
            done = complete(
                model,
                [prompts[i] for i in chunk for _ in range(k)],
                [budgets[i] for i in chunk for _ in range(k)],
                temperature=1.0,
                stop_ids=stops,
                generator=generator,
            )
            for n, i in enumerate(chunk):
                replies = [tok.decode(c.text_tokens) for c in done[n * k : (n + 1) * k]]
                rule = match_rule(items[i])
                right.append(sum(is_correct(r, items[i]["answer"], rule) for r in replies))
    return {"k": k, "seed": seed, **tally(items, right, k)}


def tally(items: Sequence[dict], right: Sequence[int], k: int) -> dict:
    """Per task and overall: t1 accuracy, pass@k, and the share of items with both right and
    wrong replies (where reinforcement learning has something to sharpen)."""
    by_task: dict[str, list[int]] = {}
    for item, r in zip(items, right, strict=True):
        by_task.setdefault(item["task"], []).append(r)

    def figures(rs: list[int]) -> dict:
        return {
            "t1": sum(rs) / (k * len(rs)),
            "pass": sum(r > 0 for r in rs) / len(rs),
            "mixed": sum(0 < r < k for r in rs) / len(rs),
            "items": len(rs),
        }

    tasks = {t: figures(rs) for t, rs in by_task.items()}
    return {"tasks": tasks, "overall": figures(list(right)), "right": list(right)}


def cached_sampled(checkpoint: str, model, tok, items, k: int, runtime, seed: int) -> dict:
    """sampled_accuracy of an unchanging checkpoint, computed once: kept in CACHE beside it
    under a key of everything it depends on (the checkpoint's bytes, the items, k, the seed,
    the precision)."""
    path = Path(checkpoint)
    items_key = hashlib.sha256(json.dumps([i["messages"] for i in items]).encode()).hexdigest()
    parts = [sha256_file(path), items_key, k, seed, precision_name(runtime.dtype)]
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    cache = load_eval(path.parent, CACHE)
    if key not in cache:
        cache[key] = sampled_accuracy(model, tok, items, k, runtime, seed)
        if runtime.is_main:
            save_eval(cache, path.parent, CACHE)
    return cache[key]


def sampling_entry(
    model,
    tok,
    items: Sequence[dict],
    k: int,
    per_task: int,
    runtime,
    seed: int,
    checkpoint: str | None = None,
) -> dict:
    """The "sampling" entry of a model's results on `items`: sampled_accuracy on the fixed
    subset (cached beside `checkpoint` when the model is that unchanging checkpoint's), and
    the subset's indices into the items (to compare greedy figures on the same items)."""
    wanted = {id(item) for item in subset(items, per_task)}
    chosen = [i for i, item in enumerate(items) if id(item) in wanted]
    picked = [items[i] for i in chosen]
    if checkpoint is not None and runtime.is_main:
        figures = cached_sampled(checkpoint, model, tok, picked, k, runtime, seed)
    else:
        figures = sampled_accuracy(model, tok, picked, k, runtime, seed)
    return {**figures, "subset": chosen}
