"""python -m train.evaluate: score a checkpoint.

Bits per byte of a text file (train/eval/lm_eval.py: loss per token and per byte, which
compares across tokenizers):

    python -m train.evaluate checkpoint=out/pretrain text_file=some.txt

The same entry point scores instruction following: accuracy on the held-out built-in
task items and on the user's eval files (train/eval/task_eval.py; each task judged by its
match rule, exact or normalised, data/judge.py), the same items for any checkpoint, so a
base model and its SFT model compare; results go to eval.json beside the checkpoint.

    python -m train.evaluate checkpoint=out/sft
    python -m train.evaluate checkpoint=out/sft eval_files=[qa.jsonl,{path:b.json,match:normalised}]

eval.json keeps one entry per model (base, sft, ...), each naming its item set (count and
fingerprint). Scores of another item set are not kept beside the new ones: when the items
changed (other eval_files, other task settings), the entries scored on the old items are
dropped from eval.json, with a note, so that its base and sft always compare.

A reward model's checkpoint is scored on held-out comparisons instead (pairwise accuracy,
right vs wrong, rank correlation with the judge: train/eval/reward_eval.py), the built-in
held-out pairs it was trained beside and any preference files given as eval_files:

    python -m train.evaluate checkpoint=out/rm eval_files=[my_prefs.jsonl]

Several checkpoints side by side (make align's table), with each one's KL to the
reference (default out/sft) and the reward model's mean score of its sampled replies:

    python -m train.evaluate checkpoints=[out/pretrain,out/sft,out/ppo,out/dpo]
"""

import sys
from pathlib import Path

import torch

from command import entry_point
from data.preferences import read_preference_file, render_group
from data.records import file_entry
from data.tasks import builtin_tasks
from errors import UserError

from .core.checkpoint import (
    BEST_NAME,
    CHECKPOINT_NAME,
    language_model,
    load_checkpoint,
    load_kind,
    require_policy,
)
from .core.files import load_eval, save_eval
from .core.runtime import replay_precision, resolve_device, runtime_session
from .eval.compare import compare, format_comparison, format_paired, write_report
from .eval.lm_eval import file_bits_per_byte
from .eval.reward_eval import format_reward_table, reward_metrics
from .eval.task_eval import check_budget, eval_file_items, format_table, score
from .settings import EvaluateSettings


def held_out_items(s: EvaluateSettings) -> list[dict]:
    """The built-in held-out items (alone and as later questions) and the eval files'."""
    items, names = [], []
    if s.tasks.weight > 0:
        tasks = builtin_tasks(s.tasks, s.data)
        items, names = tasks.test + tasks.test_turns, tasks.tasks()
    return items + eval_file_items(s.eval_files, s.max_bad_fraction, names)


def precision_for(requested: str, device: str, checkpoints: list[dict]) -> str:
    """The precision to score at (runtime.replay_precision: the one the checkpoints were
    trained at, when they agree and this device runs it natively), printed with why."""
    recorded = {c.get("precision") for c in checkpoints}
    common = recorded.pop() if len(recorded) == 1 else None
    precision, why = replay_precision(requested, common, resolve_device(device))
    print(f"precision: {precision} ({why})")
    return precision


def nothing_to_score(what: str) -> UserError:
    return UserError(
        f"nothing to score: tasks.weight=0 and no eval_files; give eval_files=[...] (held-out "
        f"questions){what}, or tasks.weight > 0 (the built-in tasks' held-out items)"
    )


def run(s: EvaluateSettings) -> dict:
    if s.checkpoints:  # every checkpoint checked before any model is scored
        recorded = [load_checkpoint(p) for p in [*s.checkpoints, s.reference]]
        for ckpt in recorded:
            require_policy(ckpt)
        precision = precision_for(s.precision, s.device, recorded[:-1])
        with runtime_session(s.device, precision, s.seed) as rt:
            return side_by_side(s, rt)
    ckpt = load_checkpoint(s.checkpoint)
    with runtime_session(s.device, precision_for(s.precision, s.device, [ckpt]), s.seed) as rt:
        if ckpt["model_kind"] == "reward":
            return score_reward_model(s, rt, ckpt["path"])
        task_eval = s.task_eval if s.task_eval is not None else not s.text_file
        items = held_out_items(s) if task_eval else []
        if task_eval and not items:
            raise nothing_to_score(", text_file=... (bits per byte)")
        model, tok = language_model(ckpt)
        model.to(rt.device)
        results: dict = {"checkpoint": ckpt["path"]}
        if s.text_file:
            results["text"] = {
                "file": str(s.text_file),
                **file_bits_per_byte(model, tok, rt, s.text_file),
            }
        if task_eval:
            warning = check_budget(tok, items, s.eval_max_new_tokens)
            if warning:
                print(f"warning: {warning}", file=sys.stderr)
            stage = ckpt.get("stage", "model")
            results[stage] = score(model, tok, items, rt, s.eval_max_new_tokens)
            if results[stage]:
                print(f"{ckpt['path']}: held-out accuracy (greedy, chat format)")
                print(format_table({stage: results[stage]}))
                if ckpt.get("huggingface"):  # a Hugging Face model has no run directory
                    print("(a Hugging Face model: the results are not written to disk)")
                else:
                    write_beside(ckpt["path"], results)
        return results


def score_reward_model(s: EvaluateSettings, rt, path: str) -> dict:
    """A reward checkpoint: its held-out comparisons (the built-in set it was trained
    beside, and the user's eval_files) scored as train/eval/reward_eval.py describes."""
    model, tok, ckpt = load_kind(path, "reward")
    model.to(rt.device)
    held_out = Path(ckpt.get("preferences") or ".") / "test.jsonl"
    groups = read_preference_file(held_out) if s.tasks.weight > 0 and held_out.is_file() else []
    for entry in s.eval_files:
        file, _ = file_entry(entry, "eval_files", ("match", "name"))
        groups += read_preference_file(file, s.max_bad_fraction)
    block = model.config.block_size
    rendered = [r for r in (render_group(tok, g, block) for g in groups) if r is not None]
    if not rendered:
        raise UserError(f"no held-out comparisons for {path}: give eval_files=[...]")
    with torch.no_grad(), rt.autocast():
        figures = reward_metrics(model.eval(), rendered, tok.pad_id, rt.device)
    print(f"{path}: held-out comparisons\n" + format_reward_table(figures))
    write_beside(path, {"checkpoint": path, "reward": figures})
    return figures


def run_name(path: str) -> str:
    """out/ppo -> "ppo"; out/ppo/best.pt -> "ppo"; models/tuned.pt -> "tuned"."""
    p = Path(path)
    if p.is_dir():
        return p.name
    return p.parent.name if p.name in (CHECKPOINT_NAME, BEST_NAME) else p.stem


def side_by_side(s: EvaluateSettings, rt) -> dict:
    """Several checkpoints on the same held-out items, with their KL to the reference and
    the reward model's mean score (train/eval/compare.py): make align's table, for any models."""
    paths = [str(p) for p in s.checkpoints]
    names = [run_name(p) for p in paths]
    if len(set(names)) < len(names):
        names = paths  # two runs of one name: tell them apart by their paths
    items = builtin_tasks(s.tasks, s.data).test if s.tasks.weight > 0 else []
    items += eval_file_items(s.eval_files)
    if not items:
        raise nothing_to_score("")
    reward = s.reward_model if s.reward_model and Path(s.reward_model).exists() else None
    results = compare(
        dict(zip(names, paths, strict=True)),
        s.reference,
        reward,
        items,
        rt,
        s.eval_max_new_tokens,
        s.seed,
        s.sampled_k,
        s.sampled_per_task,
    )
    print(format_comparison(results))
    print(format_paired(results, names[0]))  # each model against the first
    if s.report_dir:
        print(f"written to {write_report(results, s.report_dir, save_eval, names[0])}")
    return results


def write_beside(checkpoint: str, results: dict) -> None:
    """Merge results into eval.json beside the checkpoint, keeping what is there (SFT
    writes the base model's scores beside its own) when it was scored on the same items;
    entries scored on other items are dropped, and said so."""
    run_dir = Path(checkpoint).parent
    before = load_eval(run_dir)
    new_sets = {_item_set(v) for v in results.values()} - {None}
    for key, value in list(before.items()):
        old = _item_set(value)
        if old is not None and key not in results and old not in new_sets:
            print(f"note: eval.json's '{key}' was scored on other items; dropped", file=sys.stderr)
            del before[key]
    path = save_eval({**before, **results}, run_dir)
    print(f"written to {path}")


def _item_set(entry) -> str | None:
    """The fingerprint of the items an eval.json entry was scored on, if it says."""
    if isinstance(entry, dict) and isinstance(entry.get("item_set"), dict):
        return entry["item_set"].get("fingerprint")
    return None


@entry_point("evaluate", EvaluateSettings)
def main(settings: EvaluateSettings) -> None:
    run(settings)


if __name__ == "__main__":
    main()
