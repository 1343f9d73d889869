"""python -m train.pretrain: train a GPT from scratch on raw text (make pretrain).

    prepare the data (tokenizer + token files, a no-op when already prepared)
    build the model from conf/model/<size>.yaml with the tokenizer's vocabulary
    train it on next-token prediction with the shared loop (train/core/trainer.py)
    evaluate on the validation split: loss, perplexity, bits per byte, a sample

Under torchrun every process runs this script; rank 0 prepares the data first, and
only rank 0 writes. `resume=true` continues from out_dir/ckpt.pt.
"""

from functools import partial

import torch

from command import entry_point
from data.loader import TokenLoader, eval_windows
from data.prepare import prepare
from errors import UserError
from model import GPT, GPTConfig

from .core.checkpoint import CHECKPOINT_NAME
from .core.stage import Stage
from .core.trainer import next_token_step
from .eval.lm_eval import language_model_metrics, sample_text
from .settings import PretrainSettings


def model_config(shape: dict, vocab_size: int) -> GPTConfig:
    """The preset's shape with the tokenizer's vocabulary; bad values become a UserError."""
    try:
        return GPTConfig(**{**shape, "vocab_size": vocab_size})
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


def run(settings: PretrainSettings) -> dict:
    with Stage("pretrain", settings) as stage:
        data = stage.main_first(partial(prepare, settings.data))
        tok, rt = data.tokenizer, stage.runtime
        if stage.resumed is not None:
            check_same_tokenizer(stage.resumed, tok, data.dir)
            config = GPTConfig(**stage.resumed["model_config"])
        else:
            config = model_config(settings.model, tok.vocab_size)
        model = GPT(config)
        T, B = config.block_size, settings.batch_size
        loader = TokenLoader(data.train_path, T, B, settings.seed, rt.rank, rt.world_size)
        eval_windows(data.val_path, T, B, settings.eval_tokens)  # too short? say so now
        val = data.meta["splits"]["val"]

        def evaluate(m: GPT) -> dict:
            windows = eval_windows(data.val_path, T, B, settings.eval_tokens)
            return language_model_metrics(m, windows, val["tokens"] / val["bytes"], rt)

        def sample(m: GPT) -> str:
            return sample_text(m, tok, [tok.eos_id], settings.sample_tokens, seed=settings.seed)

        result = stage.train(
            model,
            tok,
            loader,
            next_token_step,
            evaluate=evaluate,
            sample=sample,
            flops_per_token=model.flops_per_token(T),
        )
        if stage.is_main and "val_bpb" in result:
            report(result, model, tok, settings.sample_tokens, settings.seed, stage)
        return result


def report(result: dict, model: GPT, tok, sample_tokens: int, seed: int, stage: Stage) -> None:
    """The final figures and a longer sample from the final model."""
    print(
        f"done: step {result['step']}, val loss {result['val_loss']:.4f} nats/token, "
        f"ppl {result['val_ppl']:.2f}, {result['val_bpb']:.4f} bits/byte; "
        f"checkpoint {stage.out_dir / CHECKPOINT_NAME}"
    )
    model.eval()
    with torch.no_grad(), stage.runtime.autocast():
        text = sample_text(model, tok, [tok.eos_id], 4 * sample_tokens, seed=seed)
    print("--- sample from the final model ---\n" + text)


@entry_point("pretrain", PretrainSettings)
def main(settings: PretrainSettings) -> None:
    run(settings)


if __name__ == "__main__":
    main()
