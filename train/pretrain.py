"""python -m train.pretrain: train a GPT from scratch on raw text (make pretrain).

    prepare the data (tokenizer + token files, a no-op when already prepared)
    build the model from conf/model/<size>.yaml with the tokenizer's vocabulary
    train it on next-token prediction with the shared loop (train/core/)
    evaluate on the validation split: loss, perplexity, bits per byte, a sample

Under torchrun every process runs this script; rank 0 prepares the data first, and
only rank 0 writes. `resume=true` continues from out_dir/ckpt.pt.
"""

from functools import partial

import torch
from omegaconf import DictConfig, OmegaConf

from data.loader import TokenLoader, eval_windows
from data.prepare import prepare
from errors import UserError, entry_point
from model import GPT, GPTConfig

from .core.checkpoint import CHECKPOINT_NAME
from .core.settings import integer, optional
from .core.stage import Stage
from .eval.lm_eval import language_model_metrics, sample_text
from .rl.losses import next_token_step

RULES = {
    "batch_size": integer(1),
    "eval_tokens": optional(integer(1)),
    "sample_tokens": integer(1),
}


def model_config(cfg_model: DictConfig, vocab_size: int) -> GPTConfig:
    """The preset's shape with the tokenizer's vocabulary; bad values become a UserError."""
    try:
        return GPTConfig(**{**OmegaConf.to_container(cfg_model), "vocab_size": vocab_size})
    except (TypeError, ValueError) as e:
        raise UserError(f"model config: {e}; fix the model preset or its overrides") from None


def check_same_tokenizer(ckpt: dict, tok, data_dir) -> None:
    """A resumed run must read its data with the tokenizer it was trained with."""
    if ckpt["tokenizer"] != tok.state():
        raise UserError(
            f"the prepared data in {data_dir} changed since {ckpt['path']} was written (its "
            "tokenizer is another one): resuming would feed the model other token ids; "
            "resume with the data the run started with, or start a new run"
        )


def run(cfg: DictConfig) -> dict:
    with Stage("pretrain", cfg, RULES) as stage:
        data = stage.main_first(partial(prepare, cfg.data))
        tok, rt = data.tokenizer, stage.runtime
        if stage.resumed is not None:
            check_same_tokenizer(stage.resumed, tok, data.dir)
            config = GPTConfig(**stage.resumed["model_config"])
        else:
            config = model_config(cfg.model, tok.vocab_size)
        model = GPT(config)
        T, B = config.block_size, cfg.batch_size
        loader = TokenLoader(data.train_path, T, B, cfg.seed, rt.rank, rt.world_size)
        eval_windows(data.val_path, T, B, cfg.eval_tokens)  # too short? say so before training
        val = data.meta["splits"]["val"]

        def evaluate(m: GPT) -> dict:
            windows = eval_windows(data.val_path, T, B, cfg.eval_tokens)
            return language_model_metrics(m, windows, val["tokens"] / val["bytes"], rt)

        def sample(m: GPT) -> str:
            return sample_text(m, tok, [tok.eos_id], cfg.sample_tokens, seed=cfg.seed)

        result = stage.train(model, tok, loader, next_token_step, evaluate=evaluate,
                             sample=sample, flops_per_token=model.flops_per_token(T))  # fmt: skip
        if stage.is_main and "val_bpb" in result:
            report(result, model, tok, cfg, stage)
        return result


def report(result: dict, model: GPT, tok, cfg: DictConfig, stage: Stage) -> None:
    """The final figures and a longer sample from the final model."""
    print(
        f"done: step {result['step']}, val loss {result['val_loss']:.4f} nats/token, "
        f"ppl {result['val_ppl']:.2f}, {result['val_bpb']:.4f} bits/byte; "
        f"checkpoint {stage.out_dir / CHECKPOINT_NAME}"
    )
    model.eval()
    with torch.no_grad(), stage.runtime.autocast():
        text = sample_text(model, tok, [tok.eos_id], 4 * cfg.sample_tokens, seed=cfg.seed)
    print("--- sample from the final model ---\n" + text)


@entry_point("pretrain")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
