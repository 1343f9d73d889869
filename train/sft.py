"""python -m train.sft: supervised instruction fine-tuning (make sft), InstructGPT's step 1.

    load the pretrained checkpoint (model + tokenizer)
    conversations: the built-in tasks (data/tasks.py) and/or Alpaca, Dolly, chat files
    render each with the chat format; loss only on the assistant's tokens (-100 elsewhere)
    score the base model on the held-out task items (exact match, greedy, chat format)
    fine-tune with the shared loop (train/loop.py): same optimizer, schedule, checkpoints
    score the tuned model on the same items; print both side by side; write eval.json

Nothing here is a second training loop: the stage supplies a model, batches of padded
conversations (data/instruct.py), and an evaluation of the held-out loss.
"""

from pathlib import Path

import hydra
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from data.instruct import SFTLoader, collate, load_instruction_data, mix, render_examples
from errors import UserError
from model import GPT, GPTConfig
from tokenizer.chat import render_prompt

from .checkpoint import CHECKPOINT_NAME, load_checkpoint, load_model
from .cli import report_user_errors
from .lm_eval import language_model_metrics, sample_text
from .loop import LoopConfig, Trainer
from .optim import check_optimizer, optimizer_from_config
from .runtime import peak_flops, runtime_session
from .task_eval import builtin_tasks, eval_file_items, format_table, save_eval, score


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
    check_optimizer(cfg.optimizer)  # before any work
    with runtime_session(cfg.device, cfg.precision, cfg.seed) as rt:
        return _train(cfg, rt)


def _train(cfg: DictConfig, rt) -> dict:
    out_dir = Path(cfg.out_dir)
    log = print if rt.is_main else (lambda *_: None)
    model, tok, init = load_model(cfg.init_from)
    ckpt = load_checkpoint(out_dir / CHECKPOINT_NAME) if cfg.resume else None
    if ckpt is not None:
        model = GPT(GPTConfig(**ckpt["model_config"]))
    config = model.config
    model.to(rt.device)
    log(f"fine-tuning {init['path']} ({model.num_params() / 1e6:.2f}M parameters)")

    conversations, test_items = instruction_data(cfg, log)
    examples, report = render_examples(tok, conversations, config.block_size)
    log(f"training data: {report.summary()}")
    loader = SFTLoader(examples, cfg.batch_size, cfg.seed, rt.rank, rt.world_size, tok.pad_id)
    held_out = [item["messages"] for item in test_items]
    val_examples = render_examples(tok, held_out, config.block_size)[0] if held_out else []

    def evaluate(m: GPT) -> dict:
        if not val_examples:
            return {}
        B = cfg.batch_size
        batches = (
            collate(val_examples[i : i + B], tok.pad_id) for i in range(0, len(val_examples), B)
        )
        return language_model_metrics(m, batches, None, rt)

    sample_prompt = render_prompt(tok, held_out[0][:-1]) if held_out else [tok.bos_id]

    def sample(m: GPT) -> str:
        reply = sample_text(m, tok, sample_prompt, 48, temperature=0.0)
        return f"{tok.decode(sample_prompt)!r} -> {reply!r}"

    base = score(model, tok, test_items, rt, cfg.eval_max_new_tokens) if ckpt is None else {}
    if base:
        log(f"base model, held-out exact match: {base['overall']['accuracy']:.1%}")

    trainer = Trainer(
        model,
        optimizer_from_config(model, cfg, rt.device.type),
        rt,
        loader,
        out_dir,
        LoopConfig.from_cfg(cfg),
        checkpoint_meta={
            "stage": "sft",
            "model_config": config.to_dict(),
            "tokenizer": tok.state(),
            "config": OmegaConf.to_container(cfg, resolve=True),
            "init_from": init["path"],
        },
        evaluate=evaluate,
        sample=sample,
        flops_per_token=model.flops_per_token(config.block_size),
        peak_flops=peak_flops(rt, cfg.peak_tflops) if rt.is_main else None,
    )
    if ckpt is not None:
        trainer.load_state(ckpt)
    result = trainer.run()

    tuned = score(model, tok, test_items, rt, cfg.eval_max_new_tokens)
    if tuned:
        results = {"sft": tuned} if not base else {"base": base, "sft": tuned}
        path = save_eval({"checkpoint": str(out_dir / CHECKPOINT_NAME), **results}, out_dir)
        log("held-out exact match (greedy, chat format):\n" + format_table(results))
        log(f"written to {path}")
    if rt.distributed:
        dist.barrier()
    return {**result, "eval": tuned}


@hydra.main(version_base=None, config_path="../conf", config_name="sft")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
