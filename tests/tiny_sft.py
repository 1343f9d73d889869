"""A stand-in SFT checkpoint for the stages that start from one (reward model, PPO, DPO,
export): a tiny GPT and its tokenizer, saved in the project's one checkpoint format."""

from pathlib import Path

from model import GPT, GPTConfig
from train.core.checkpoint import save_checkpoint

SHAPE = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32}


def save_sft(path: Path, tok, model: GPT | None = None, **shape) -> GPT:
    """Save `model`, or a fresh GPT of SHAPE (updated by `shape`) for `tok`'s vocabulary,
    as an SFT checkpoint at `path`; return the model."""
    if model is None:
        model = GPT(GPTConfig(**{**SHAPE, **shape, "vocab_size": tok.vocab_size}))
    state = {"stage": "sft", "model_config": model.config.to_dict(), "tokenizer": tok.state()}
    save_checkpoint(path, {**state, "model": model.state_dict()})
    return model
