"""python -m train.evaluate: score a checkpoint.

Bits per byte of a text file (train/lm_eval.py: loss per token and per byte, which
compares across tokenizers):

    python -m train.evaluate checkpoint=out/pretrain text_file=some.txt

The same entry point scores instruction following: exact-match accuracy on the held-out
built-in task items (train/task_eval.py), the same items for any checkpoint, so a base
model and its SFT model compare; results go to eval.json beside the checkpoint.

    python -m train.evaluate checkpoint=out/sft
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from errors import report_user_errors

from .checkpoint import load_model
from .lm_eval import file_bits_per_byte
from .runtime import runtime_session
from .task_eval import (
    builtin_tasks,
    eval_file_items,
    format_table,
    load_eval,
    save_eval,
    score,
)


def run(cfg: DictConfig) -> dict:
    with runtime_session(cfg.device, cfg.precision, cfg.seed) as rt:
        model, tok, ckpt = load_model(cfg.checkpoint)
        model.to(rt.device)
        results: dict = {"checkpoint": ckpt["path"]}
        if cfg.text_file:
            results["text"] = {
                "file": str(cfg.text_file),
                **file_bits_per_byte(model, tok, rt, cfg.text_file),
            }
        task_eval = cfg.task_eval if cfg.task_eval is not None else not cfg.text_file
        if task_eval:
            items = builtin_tasks(cfg).test if cfg.tasks.weight > 0 else []
            items += eval_file_items(cfg.eval_files)
            stage = ckpt.get("stage", "model")
            results[stage] = score(model, tok, items, rt, cfg.eval_max_new_tokens)
            if results[stage]:
                print(f"{ckpt['path']}: held-out exact match (greedy, chat format)")
                print(format_table({stage: results[stage]}))
                # keep what is there (SFT writes the base model's scores beside its own)
                run_dir = Path(ckpt["path"]).parent
                path = save_eval({**load_eval(run_dir), **results}, run_dir)
                print(f"written to {path}")
        return results


@hydra.main(version_base=None, config_path="../conf", config_name="evaluate")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
