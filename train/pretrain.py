"""python -m train.pretrain: train a GPT from scratch on raw text (make pretrain).

    prepare the data (tokenizer + token files, a no-op when already prepared)
    build the model from conf/model/<size>.yaml with the tokenizer's vocabulary
    hand model, optimizer and batches to the shared loop (train/loop.py)
    evaluate on the validation split: loss, perplexity, bits per byte, a sample

Under torchrun every process runs this script; rank 0 prepares the data first, and
only rank 0 writes. `resume=true` continues from out_dir/ckpt.pt.
"""

from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from data.loader import TokenLoader, eval_windows
from data.prepare import prepare
from errors import UserError
from model import GPT, GPTConfig

from .checkpoint import CHECKPOINT_NAME, load_checkpoint
from .cli import report_user_errors
from .lm_eval import language_model_metrics, sample_text
from .loop import LoopConfig, Trainer
from .optim import check_optimizer, optimizer_from_config
from .runtime import peak_flops, runtime_session


def model_config(cfg_model: DictConfig, vocab_size: int) -> GPTConfig:
    """The preset's shape with the tokenizer's vocabulary; bad values become a UserError."""
    try:
        return GPTConfig(**{**OmegaConf.to_container(cfg_model), "vocab_size": vocab_size})
    except (TypeError, ValueError) as e:
        raise UserError(f"model config: {e}; fix the model preset or its overrides") from None


def grad_accum_steps(tokens_per_step: int | None, batch_tokens: int, world_size: int) -> int:
    """Micro-batches per optimizer step so that all processes together see tokens_per_step."""
    if not tokens_per_step:
        return 1
    per_micro_step = batch_tokens * world_size
    if tokens_per_step % per_micro_step:
        raise UserError(
            f"tokens_per_step={tokens_per_step} is not a multiple of batch_size * block_size * "
            f"processes = {per_micro_step}; pick a multiple of it"
        )
    return tokens_per_step // per_micro_step


def run(cfg: DictConfig) -> dict:
    check_optimizer(cfg.optimizer)  # before any work
    with runtime_session(cfg.device, cfg.precision, cfg.seed) as rt:
        return _train(cfg, rt)


def _train(cfg: DictConfig, rt) -> dict:
    out_dir = Path(cfg.out_dir)
    # Rank 0 prepares (or finds) the data; the others then read what it wrote.
    if rt.is_main:
        data = prepare(cfg.data)
    if rt.distributed:
        dist.barrier()
    if not rt.is_main:
        data = prepare(cfg.data)
    tok = data.tokenizer

    ckpt = None
    if cfg.resume:
        ckpt = load_checkpoint(out_dir / CHECKPOINT_NAME)
        config = GPTConfig(**ckpt["model_config"])
    else:
        config = model_config(cfg.model, tok.vocab_size)
    model = GPT(config).to(rt.device)

    T, B = config.block_size, cfg.batch_size
    loader = TokenLoader(data.train_path, T, B, cfg.seed, rt.rank, rt.world_size)
    loop_cfg = LoopConfig.from_cfg(cfg)
    loop_cfg.grad_accum = grad_accum_steps(cfg.tokens_per_step, B * T, rt.world_size)
    optimizer = optimizer_from_config(model, cfg, rt.device.type)
    tokens_per_byte = data.meta["splits"]["val"]["tokens"] / data.meta["splits"]["val"]["bytes"]

    def evaluate(m: GPT) -> dict:
        windows = eval_windows(data.val_path, T, B, cfg.eval_tokens)
        return language_model_metrics(m, windows, tokens_per_byte, rt)

    def sample(m: GPT) -> str:
        return sample_text(m, tok, [tok.eos_id], cfg.sample_tokens, seed=cfg.seed)

    trainer = Trainer(
        model,
        optimizer,
        rt,
        loader,
        out_dir,
        loop_cfg,
        checkpoint_meta={
            "stage": "pretrain",
            "model_config": config.to_dict(),
            "tokenizer": tok.state(),
            "config": OmegaConf.to_container(cfg, resolve=True),
        },
        evaluate=evaluate,
        sample=sample,
        flops_per_token=model.flops_per_token(T),
        peak_flops=peak_flops(rt, cfg.peak_tflops) if rt.is_main else None,
    )
    if ckpt is not None:
        trainer.load_state(ckpt)
    if rt.is_main:
        print(
            f"model: {model.num_params() / 1e6:.2f}M parameters, {config.n_layer} layers x "
            f"{config.n_embd}, context {T}; {B} x {loop_cfg.grad_accum} x {rt.world_size} "
            f"sequences per step on {rt.device} ({str(rt.dtype).replace('torch.', '')})"
        )
    result = trainer.run()
    if rt.is_main and "val_bpb" in result:
        print(
            f"done: step {result['step']}, val loss {result['val_loss']:.4f} nats/token, "
            f"ppl {result['val_ppl']:.2f}, {result['val_bpb']:.4f} bits/byte; "
            f"checkpoint {out_dir / CHECKPOINT_NAME}"
        )
        model.eval()
        with torch.no_grad(), rt.autocast():
            text = sample_text(model, tok, [tok.eos_id], 4 * cfg.sample_tokens, seed=cfg.seed)
        print("--- sample from the final model ---\n" + text)
    return result


@hydra.main(version_base=None, config_path="../conf", config_name="pretrain")
@report_user_errors
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
