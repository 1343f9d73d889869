"""Checkpoints: one self-contained file per run state, written atomically, loaded safely.

A checkpoint is a dict of plain values and tensors:

    format        CHECKPOINT_FORMAT
    stage         the stage that wrote it: "pretrain", "sft", "reward", ...
    model_kind    what `model` holds (MODEL_KINDS): "gpt", "reward", "policy_value"; absent in the
                  checkpoints of earlier versions, which all hold a "gpt"
    model_config  GPTConfig as a dict (the trunk's shape, for every kind)
    model         the model's state_dict (weights)
    tokenizer     the tokenizer's state (its kind and model bytes), so a checkpoint
                  alone is enough to sample from
    config        the run's resolved config
    metrics       the last evaluation's figures
    init_from     (fine-tuning stages) the checkpoint the run started from
  for resuming (train/core/trainer.py writes them):
    step, elapsed_s, optimizer, scaler, best, per_rank (each rank's RNG states and
    data position)

It is written with train/core/files.py: atomic_write (temporary file, fsync, rename), so a
kill at any moment leaves either the old file or the new one. It is read with
torch.load(weights_only=True), which unpickles only tensors and plain containers: a
checkpoint from the internet cannot run code.

Wherever a checkpoint is read, a Hugging Face GPT-2 may stand instead (hf_source): a
model directory, or a hub name like gpt2; train/core/pretrained.py turns it into the same dict.
"""

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import tokenizer as tokenizers
from errors import UserError
from model import GPT, GPTConfig
from model.heads import PolicyWithValue, ScalarModel

from .files import atomic_write
from .pretrained import WEIGHTS_ONLY_FAILED, checkpoint_from_hf, not_safe

CHECKPOINT_FORMAT = 1
CHECKPOINT_NAME = "ckpt.pt"
BEST_NAME = "best.pt"
HUB_PREFIX = "hf:"  # hf:openai-community/gpt2: a hub name with an owner
HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # a bare name: no path in it
# The GPT-2 models a bare name may give (the README's list); any other hub model is named
# with HUB_PREFIX, so that a mistyped path or name fails at once, not after network retries.
GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2")


@dataclass(frozen=True)
class ModelKind:
    """How to build one kind of model from its trunk's config, and find its language model."""

    describe: str  # for messages: "a language model"
    build: Callable[[GPTConfig], nn.Module]
    language_model: Callable[[nn.Module], GPT]
    writes: bool = True  # its language model was trained to write text (load_policy)


MODEL_KINDS: dict[str, ModelKind] = {
    "gpt": ModelKind("a language model", GPT, lambda m: m),
    "reward": ModelKind("a reward model", ScalarModel, lambda m: m.gpt, writes=False),
    "policy_value": ModelKind(
        "a policy with a value function", PolicyWithValue, lambda m: m.policy
    ),
}


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write `state` to `path` atomically (temporary file, fsync, rename)."""
    atomic_write(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, **state}, f))


def hf_source(path: str | Path) -> str | None:
    """The Hugging Face model that `path` names, or None when it means one of our checkpoints.

    - "hf:owner/name" (or "hf:name"): a model on the Hugging Face hub;
    - a directory with config.json and no ckpt.pt or best.pt: a Hugging Face model directory;
    - one of GPT2_NAMES that is no file or directory here ("gpt2", "distilgpt2"): a hub model.
    Anything else (a file, a run directory, a missing path like out/pretrain or gpt3) is ours.
    """
    text = str(path)
    if text.startswith(HUB_PREFIX):
        return text.removeprefix(HUB_PREFIX)
    p = Path(text).expanduser()
    if p.is_dir():
        ours = any((p / name).is_file() for name in (CHECKPOINT_NAME, BEST_NAME))
        return str(p) if not ours and (p / "config.json").is_file() else None
    if p.exists() or text not in GPT2_NAMES:
        return None
    return text


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
    if not path.is_file() and HUB_NAME.fullmatch(str(path)) and path.suffix != ".pt":
        raise UserError(
            f"checkpoint {path} does not exist, and {path} is not one of the GPT-2 names known "
            f"here ({', '.join(GPT2_NAMES)}); fix the path, or name another Hugging Face "
            f"model as {HUB_PREFIX}owner/name"
        )
    if not path.is_file():
        raise UserError(
            f"checkpoint {path} does not exist; train one first or fix the path (a Hugging Face "
            f"model: a directory, a name like gpt2, or {HUB_PREFIX}owner/name)"
        )
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint safely onto the CPU; a clear UserError if it cannot be used.
    A Hugging Face source (hf_source) is converted into the same dict."""
    source = hf_source(path)
    if source is not None:
        return checkpoint_from_hf(source)
    path = resolve_checkpoint_path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # garbage bytes fail anywhere in the unpickler: IndexError, KeyError..
        if WEIGHTS_ONLY_FAILED in str(e):  # it names code to run: never load it
            raise not_safe(path) from None
        raise UserError(
            f"checkpoint {path} is corrupt or not a checkpoint of this project "
            f"({type(e).__name__}); use another checkpoint or retrain"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"checkpoint {path} is not in this project's format (version {CHECKPOINT_FORMAT}); "
            "use a checkpoint written by this project"
        )
    for key in ("model_config", "model", "tokenizer"):
        if key not in ckpt:
            raise UserError(f"checkpoint {path} has no '{key}'; it is incomplete, retrain")
    ckpt.setdefault("model_kind", "gpt")
    if ckpt["model_kind"] not in MODEL_KINDS:
        raise UserError(
            f"checkpoint {path} holds a model of kind {ckpt['model_kind']!r}, which this "
            f"version does not know ({', '.join(MODEL_KINDS)}); update the project"
        )
    ckpt["path"] = str(path)
    return ckpt


def model_from_checkpoint(ckpt: dict, kind: str | None = None, **overrides) -> nn.Module:
    """Build the model a checkpoint holds and load its weights (on the CPU, fp32).

    kind: the kind the caller needs; a checkpoint of another kind is a UserError.
    overrides: GPTConfig fields to change (dropout, attention).
    """
    held = ckpt.get("model_kind", "gpt")
    if kind is not None and kind != held:
        raise UserError(
            f"checkpoint {ckpt.get('path')} holds {MODEL_KINDS[held].describe} ({held}), "
            f"not {MODEL_KINDS[kind].describe} ({kind}); point to a {kind} checkpoint"
        )
    try:
        config = GPTConfig(**{**ckpt["model_config"], **overrides})
    except (TypeError, ValueError) as e:
        raise UserError(
            f"checkpoint {ckpt.get('path')} has an invalid model config ({e})"
        ) from None
    model = MODEL_KINDS[held].build(config)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise UserError(
            f"checkpoint {ckpt.get('path')} weights do not fit its model config "
            f"({str(e).splitlines()[0]}); the file is damaged, retrain"
        ) from None
    bad = [name for name, t in model.state_dict().items() if not torch.isfinite(t).all()]
    if bad:
        raise UserError(
            f"checkpoint {ckpt.get('path')} has weights that are not finite (NaN or inf, "
            f"first in {bad[0]}); it comes from a run that diverged: use an earlier one"
        )
    return model


def tokenizer_from_checkpoint(ckpt: dict, vocab_size: int) -> "tokenizers.Tokenizer":
    """The checkpoint's tokenizer, checked against the model's vocabulary size."""
    tok = tokenizers.from_state(ckpt["tokenizer"])
    if tok.vocab_size != vocab_size:
        raise UserError(
            f"checkpoint {ckpt['path']}: tokenizer has {tok.vocab_size} tokens but the model "
            f"expects {vocab_size}; the tokenizer does not match this checkpoint"
        )
    return tok


def language_model(ckpt: dict, **overrides) -> tuple[GPT, "tokenizers.Tokenizer"]:
    """The language model of a loaded checkpoint of any kind (CPU, fp32, eval mode) and its
    tokenizer. For a reward model it is the trunk's GPT."""
    model = model_from_checkpoint(ckpt, **overrides)
    gpt = MODEL_KINDS[ckpt["model_kind"]].language_model(model).eval()
    return gpt, tokenizer_from_checkpoint(ckpt, gpt.config.vocab_size)


def load_model(path: str | Path, **overrides) -> tuple[GPT, "tokenizers.Tokenizer", dict]:
    """The language model of a checkpoint of any kind, its tokenizer and the raw checkpoint
    dict (see language_model)."""
    ckpt = load_checkpoint(path)
    return (*language_model(ckpt, **overrides), ckpt)


def require_policy(ckpt: dict) -> None:
    """UserError unless the checkpoint's language model was trained to write text: a
    reward model's trunk was trained to score replies, and sampled it writes nonsense."""
    kind = ckpt["model_kind"]
    if not MODEL_KINDS[kind].writes:
        raise UserError(
            f"checkpoint {ckpt['path']} holds {MODEL_KINDS[kind].describe} ({kind}): its trunk "
            "was trained to score replies, not to write them; point to a language model (an "
            "SFT, PPO or DPO run, or a pretrained one)"
        )


def load_policy(path: str | Path, **overrides) -> tuple[GPT, "tokenizers.Tokenizer", dict]:
    """load_model for whatever writes text with the model or trains it further (the
    fine-tuning stages, sampling and chat, side-by-side comparisons): a checkpoint whose
    language model does not write (a reward model) is refused (require_policy)."""
    ckpt = load_checkpoint(path)
    require_policy(ckpt)
    return (*language_model(ckpt, **overrides), ckpt)


def load_kind(
    path: str | Path, kind: str, **overrides
) -> tuple[nn.Module, "tokenizers.Tokenizer", dict]:
    """The whole model of a checkpoint that must hold `kind` (CPU, fp32, eval mode)."""
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, kind, **overrides).eval()
    return model, tokenizer_from_checkpoint(ckpt, model.config.vocab_size), ckpt


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
