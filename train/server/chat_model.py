"""The model a server (or its benchmark) talks to: a checkpoint's language model, if it chats.

Refused, each in one line: a reward model (it scores replies and writes none) and a base
model, a checkpoint of a stage that never saw the chat format (BASE_STAGES: pretraining,
or a GPT-2 straight from Hugging Face), whose "replies" would be a document going on.
Everything else loads: SFT, PPO, DPO checkpoints, and Hugging Face directories that
train.export wrote from them (their handgpt.json names the stage).
"""

from errors import UserError
from train.core.checkpoint import (
    MODEL_KINDS,
    load_checkpoint,
    model_from_checkpoint,
    tokenizer_from_checkpoint,
)

BASE_STAGES = ("pretrain", "huggingface")  # checkpoints that never saw the chat format


def load_chat_model(path: str):
    """The checkpoint's language model and tokenizer, or one line saying why it does not
    chat (a reward model, a base model)."""
    ckpt = load_checkpoint(path)
    kind, stage = ckpt["model_kind"], ckpt.get("stage")
    if kind == "reward":
        raise UserError(
            f"{ckpt['path']} holds a reward model: it scores replies and writes none; "
            "serve a chat model (out/sft, out/ppo, out/dpo)"
        )
    if stage in BASE_STAGES:
        raise UserError(
            f"{ckpt['path']} is a base model (stage {stage}) that never learnt the chat "
            "format; fine-tune it first (make sft) and serve that, or write text with "
            "python -m train.sample"
        )
    model = MODEL_KINDS[kind].language_model(model_from_checkpoint(ckpt)).eval()
    return model, tokenizer_from_checkpoint(ckpt, model.config.vocab_size), ckpt
