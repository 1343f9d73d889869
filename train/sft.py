"""python -m train.sft: supervised instruction fine-tuning (make sft), InstructGPT's step 1.

load the pretrained checkpoint (model + tokenizer)
conversations: the built-in tasks (data/tasks.py) and/or Alpaca, Dolly, chat files
render each with the chat format; loss only on the assistant's tokens (-100 elsewhere)
score the base model on the held-out task items (exact match, greedy, chat format)
fine-tune with the shared loop (train/stage.py, train/loop.py)
score the tuned model on the same items; print both side by side; write eval.json
"""

from functools import partial

import hydra
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from data.batching import SFTLoader, eval_batches
from data.instruct import load_instruction_data, mix, render_examples
from errors import UserError, report_user_errors
from model import GPT
from tokenizer.chat import render_prompt

from .checkpoint import CHECKPOINT_NAME, load_model
from .lm_eval import language_model_metrics, sample_text
from .losses import next_token_step
from .settings import integer, number
from .stage import Stage
from .task_eval import builtin_tasks, eval_file_items, format_table, score

RULES = {
    "batch_size": integer(1),
    "max_bad_fraction": number(0, 1),
    "eval_max_new_tokens": integer(1),
}


def instruction_data(cfg: DictConfig, log=print) -> tuple[list, list]:
    """(training conversations, held-out task items) from the built-in tasks and files."""
    parts, test_items = [], []
    if cfg.tasks.weight > 0:
        tasks = builtin_tasks(cfg)
        log(f"built-in tasks: {len(tasks.train)} training and {len(tasks.test)} held-out items")
        parts.append(([item["messages"] for item in tasks.train], cfg.tasks.weight))
        test_items = tasks.test
    conversations = mix(parts, cfg.seed) if parts else []
    if cfg.files:
        sources = OmegaConf.to_container(cfg.files, resolve=True)
        conversations += load_instruction_data(sources, cfg.max_bad_fraction, cfg.seed, log)
    test_items += eval_file_items(cfg.eval_files, cfg.max_bad_fraction)
    if not conversations:
        raise UserError("no instruction data: set tasks.weight > 0 or give files=[...]")
    return conversations, test_items


def run(cfg: DictConfig) -> dict:
    with Stage("sft", cfg, RULES) as stage:
        rt = stage.runtime
        model, tok, init = load_model(cfg.init_from)
        if stage.resumed is not None:  # the run's own model and tokenizer, not init_from's
            model, tok, _ = load_model(stage.resumed["path"])
        block_size = model.config.block_size
        stage.log(f"fine-tuning {init['path']} ({model.num_params() / 1e6:.2f}M parameters)")

        conversations, test_items = instruction_data(cfg, stage.log)
        examples, report = render_examples(tok, conversations, block_size)
        stage.log(f"training data: {report.summary()}")
        loader = SFTLoader(examples, cfg.batch_size, cfg.seed, rt.rank, rt.world_size, tok.pad_id)
        held_out = [item["messages"] for item in test_items]
        val_examples = render_examples(tok, held_out, block_size)[0] if held_out else []

        def evaluate(m: GPT) -> dict:
            if not val_examples:
                return {}
            batches = eval_batches(val_examples, cfg.batch_size, tok.pad_id)
            return language_model_metrics(m, batches, None, rt)

        prompt = render_prompt(tok, held_out[0][:-1]) if held_out else [tok.bos_id]

        def sample(m: GPT) -> str:
            reply = sample_text(m, tok, prompt, 48, temperature=0.0)
            return f"{tok.decode(prompt)!r} -> {reply!r}"

        model.to(rt.device)
        base = (
            score(model, tok, test_items, rt, cfg.eval_max_new_tokens) if not stage.resumed else {}
        )
        if base:
            stage.log(f"base model, held-out exact match: {base['overall']['accuracy']:.1%}")
        step = partial(next_token_step, pad_id=tok.pad_id)
        result = stage.train(model, tok, loader, step, evaluate=evaluate, sample=sample,
                             flops_per_token=model.flops_per_token(block_size),
                             init_from=init["path"])  # fmt: skip
        tuned = score(model, tok, test_items, rt, cfg.eval_max_new_tokens)
        if tuned:
            results = {"sft": tuned} if not base else {"base": base, "sft": tuned}
            stage.log("held-out exact match (greedy, chat format):\n" + format_table(results))
            stage.save_eval({"checkpoint": str(stage.out_dir / CHECKPOINT_NAME), **results})
        if rt.distributed:
            dist.barrier()
        return {**result, "eval": tuned}


@hydra.main(version_base=None, config_path="../conf", config_name="sft")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
