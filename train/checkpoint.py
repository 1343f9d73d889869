"""Checkpoints: one self-contained file per run state, written atomically, loaded safely.

A checkpoint is a dict of plain values and tensors:

    format        CHECKPOINT_FORMAT
    stage         "pretrain", "sft", ...
    model_config  GPTConfig as a dict
    model         the model's state_dict (weights)
    tokenizer     the tokenizer's state (its kind and model bytes), so a checkpoint
                  alone is enough to sample from
    step          optimizer steps taken
    optimizer     AdamW state (None in a weights-only export)
    rng, data     RNG states and the data loaders' positions, for exact resumption
    config        the run's resolved config
    metrics       last evaluation figures

It is written to `<name>.tmp` and renamed over `<name>`: a rename is atomic, so a kill at
any moment leaves either the old file or the new one, never half of one. It is read with
torch.load(weights_only=True), which unpickles only tensors and plain containers: a
checkpoint from the internet cannot run code.
"""

import os
import random
from pathlib import Path

import numpy as np
import torch

import tokenizer as tokenizers
from errors import UserError
from model import GPT, GPTConfig

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = "ckpt.pt"
BEST_NAME = "best.pt"


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write `state` to `path` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or a run directory holding ckpt.pt (or best.pt)."""
    path = Path(path)
    if path.is_dir():
        for name in (CHECKPOINT_NAME, BEST_NAME):
            if (path / name).is_file():
                return path / name
        raise UserError(
            f"no checkpoint in {path} (looked for {CHECKPOINT_NAME} and {BEST_NAME}); "
            "train one first or point to a checkpoint file"
        )
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; train one first or fix the path")
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint safely onto the CPU; a clear UserError if it cannot be used."""
    path = resolve_checkpoint_path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # garbage bytes fail anywhere in the unpickler: IndexError, KeyError..
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"checkpoint {path} is corrupt or not a checkpoint of this project ({first_line}); "
            "use another checkpoint or retrain"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"checkpoint {path} is not in this project's format (version {CHECKPOINT_FORMAT}); "
            "use a checkpoint written by this project"
        )
    for key in ("model_config", "model", "tokenizer"):
        if key not in ckpt:
            raise UserError(f"checkpoint {path} has no '{key}'; it is incomplete, retrain")
    ckpt["path"] = str(path)
    return ckpt


def model_from_checkpoint(ckpt: dict, **overrides) -> GPT:
    """Build the GPT a checkpoint describes and load its weights (on the CPU, fp32)."""
    config = GPTConfig(**{**ckpt["model_config"], **overrides})
    model = GPT(config)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise UserError(
            f"checkpoint {ckpt.get('path')} weights do not fit its model config "
            f"({str(e).splitlines()[0]}); the file is damaged, retrain"
        ) from None
    return model


def load_model(path: str | Path, **overrides) -> tuple[GPT, "tokenizers.Tokenizer", dict]:
    """Model (CPU, fp32, eval mode), tokenizer and the raw checkpoint dict from a path."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, **overrides).eval()
    tok = tokenizers.from_state(ckpt["tokenizer"])
    if tok.vocab_size != model.config.vocab_size:
        raise UserError(
            f"checkpoint {ckpt['path']}: tokenizer has {tok.vocab_size} tokens but the model "
            f"expects {model.config.vocab_size}; the tokenizer does not match this checkpoint"
        )
    return model, tok, ckpt


def rng_state() -> dict:
    """Every RNG a training step draws from, for exact resumption."""
    _, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [key.tolist(), int(pos), int(has_gauss), float(cached_gaussian)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() saved."""
    random.setstate(_as_tuple(state["python"]))
    key, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state(
        ("MT19937", np.array(key, dtype=np.uint32), pos, has_gauss, cached_gaussian)
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    """random.setstate wants tuples where a round-trip may have produced lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
