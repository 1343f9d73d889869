"""python -m train.sft: supervised instruction fine-tuning (make sft), InstructGPT's step 1.

load the pretrained checkpoint (model + tokenizer)
conversations: the built-in tasks (data/tasks.py) and/or Alpaca, Dolly, chat files
render each with the chat format; loss only on the assistant's tokens (-100 elsewhere)
score the base model on the held-out task items (greedy, chat format, data/judge.py's rules)
fine-tune with the shared loop (train/core/stage.py, train/core/trainer.py)
score the tuned model on the same items; print both side by side; write eval.json
"""

import json
from functools import partial
from pathlib import Path

import torch.distributed as dist

from command import entry_point
from data.batching import SFTLoader, eval_batches
from data.instruct import load_instruction_data, mix, render_examples
from data.records import file_entry
from data.tasks import builtin_tasks
from errors import UserError
from model import GPT
from tokenizer.chat import render_prompt

from .core.checkpoint import CHECKPOINT_NAME, load_model, load_policy
from .core.stage import Stage
from .core.trainer import next_token_step
from .eval.compare import format_paired
from .eval.lm_eval import language_model_metrics, sample_text
from .eval.sampled import sampling_entry
from .eval.task_eval import check_budget, eval_file_items, format_table, score
from .settings import SFTSettings


def instruction_data(s: SFTSettings, log=print) -> tuple[list, list, list]:
    """(training conversations, validation items, test items) from the built-in tasks and
    files: the validation items (the built-in set's validation split, else the eval files)
    give the held-out loss that picks best.pt; the test items are scored at the start and
    the end only."""
    parts, test_items, val_items, builtin = [], [], [], []
    if s.tasks.weight > 0:
        tasks = builtin_tasks(s.tasks, s.data)
        log(
            f"built-in tasks: {len(tasks.train)} training conversations; {len(tasks.val)} "
            f"validation items; {len(tasks.test)} test items, and {len(tasks.test_turns)} of "
            "them asked again as a later question"
        )
        parts.append(([item["messages"] for item in tasks.train], s.tasks.weight))
        test_items, val_items = tasks.test + tasks.test_turns, tasks.val
        builtin = tasks.tasks()
    conversations = mix(parts, s.seed) if parts else []
    from_files = []
    if s.files:
        from_files = load_instruction_data(s.files, s.max_bad_fraction, s.seed, log)
    held_out = eval_file_items(s.eval_files, s.max_bad_fraction, builtin, log)
    for warning in overlap_warnings(s.files, s.eval_files, from_files, held_out):
        log(f"warning: {warning}")
    if not conversations and not from_files:
        raise UserError("no instruction data: set tasks.weight > 0 or give files=[...]")
    return conversations + from_files, val_items or held_out, test_items + held_out


def overlap_warnings(files, eval_files, training: list, held_out: list[dict]) -> list[str]:
    """Eval files that are also training files, and held-out items whose conversation is
    also in the training files: their scores would measure memory, not generalisation."""
    warnings = []
    trained = {Path(file_entry(e, "files")[0]).resolve() for e in files}
    for entry in eval_files:
        path = file_entry(entry, "eval_files", ("match", "name"))[0]
        if Path(path).resolve() in trained:
            warnings.append(f"{path} is both a training file and an eval file")
    seen = {_key(c) for c in training}
    per_task: dict[str, list[int]] = {}
    for item in held_out:
        counts = per_task.setdefault(item["task"], [0, 0])
        counts[0] += _key(item["messages"]) in seen
        counts[1] += 1
    warnings += [
        f"{n} of the {total} items of eval file task '{task}' are also in the training files"
        for task, (n, total) in per_task.items()
        if n
    ]
    return warnings


def _key(messages: list[dict]) -> str:
    return json.dumps([(m["role"], m["content"].strip()) for m in messages], ensure_ascii=False)


def run(settings: SFTSettings) -> dict:
    s = settings
    with Stage("sft", s) as stage:
        rt = stage.runtime
        model, tok, init = load_policy(s.init_from)
        if stage.resumed is not None:  # the run's own model and tokenizer, not init_from's
            model, tok, _ = load_model(stage.resumed["path"])
        block_size = model.config.block_size
        stage.log(f"fine-tuning {init['path']} ({model.num_params() / 1e6:.2f}M parameters)")

        conversations, val_items, test_items = instruction_data(s, stage.log)
        examples, report = render_examples(tok, conversations, block_size)
        stage.log(f"training data: {report.summary()}")
        for line in report.details(block_size):
            stage.log(line)
        warning = check_budget(tok, test_items, s.eval_max_new_tokens)
        if warning:
            stage.log(f"warning: {warning}")
        loader = SFTLoader(examples, s.batch_size, s.seed, rt.rank, rt.world_size, tok.pad_id)
        held_out = [item["messages"] for item in val_items]
        val_examples = render_examples(tok, held_out, block_size)[0] if held_out else []

        def evaluate(m: GPT) -> dict:
            if not val_examples:
                return {}
            batches = eval_batches(val_examples, s.batch_size, tok.pad_id)
            return language_model_metrics(m, batches, None, rt)

        prompt = render_prompt(tok, held_out[0][:-1]) if held_out else [tok.bos_id]

        def sample(m: GPT) -> str:
            reply = sample_text(m, tok, prompt, 48, temperature=0.0)
            return f"{tok.decode(prompt)!r} -> {reply!r}"

        model.to(rt.device)
        base = score(model, tok, test_items, rt, s.eval_max_new_tokens) if not stage.resumed else {}
        if base:
            stage.log(f"base model, held-out accuracy: {base['overall']['accuracy']:.1%}")
        step = partial(next_token_step, pad_id=tok.pad_id)
        result = stage.train(
            model,
            tok,
            loader,
            step,
            evaluate=evaluate,
            sample=sample,
            flops_per_token=model.flops_per_token(block_size),
            init_from=init["path"],
        )
        tuned = score(model, tok, test_items, rt, s.eval_max_new_tokens)
        checkpoint = str(stage.out_dir / CHECKPOINT_NAME)
        if tuned and s.sampled_k:  # cached beside the checkpoint: the RL stages read it
            tuned["sampling"] = sampling_entry(
                model, tok, test_items, s.sampled_k, s.sampled_per_task, rt, s.seed, checkpoint
            )
        if tuned:
            results = {"sft": tuned} if not base else {"base": base, "sft": tuned}
            stage.log("held-out accuracy (greedy, chat format):\n" + format_table(results))
            if base:
                stage.log(format_paired(results, "base"))
            stage.save_eval({"checkpoint": checkpoint, **results})
        if rt.distributed:
            dist.barrier()
        return {**result, "eval": tuned}


@entry_point("sft", SFTSettings)
def main(settings: SFTSettings) -> None:
    run(settings)


if __name__ == "__main__":
    main()
