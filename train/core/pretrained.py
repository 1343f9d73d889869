"""Hugging Face models as starting points: a GPT-2, Llama or Qwen3 directory or hub name,
read as a checkpoint.

Every stage loads its models through train/core/checkpoint.py: load_checkpoint. Given a Hugging
Face source instead of a checkpoint (which paths are: checkpoint.py: hf_source), it calls
checkpoint_from_hf here, which returns what a checkpoint file holds (model config, weights,
tokenizer state). So init_from=gpt2 (SFT, reward model, PPO, DPO) and checkpoint=gpt2
(sample, chat, evaluate, export) work without the stages knowing.

    source                         model                            tokenizer
    a GPT-2 directory, or a hub    its weights (model/hf.py), the   its byte-level BPE
    name ("gpt2", "distilgpt2")    table grown for the control      (tokenizer/gpt2.py), our
                                   tokens (model/vocab.py)          control tokens after it
    a Llama or Qwen3 directory     its weights (model/hf_llama.py), the same, when it is a
    or hub name                    grown the same way               byte-level BPE (Llama 3,
                                                                    Qwen); others are refused
    a directory train.export       its weights, with our config     the checkpoint's own
    wrote (it has handgpt.json)    back (bias=False, attention,     (handgpt_tokenizer.bin)
                                   dropout)

What Hugging Face's format has no place for travels in handgpt.json (our GPTConfig, the
stage, the tokenizer's kind) and handgpt_tokenizer.bin (the tokenizer as our checkpoints
store it), so that export and import give back the checkpoint's model and ids exactly.
"""

import dataclasses
import json
import pickle
from pathlib import Path

import torch

import tokenizer as tokenizers
from errors import UserError
from model import GPT, GPTConfig, hf, hf_llama
from model.vocab import grow_vocab
from tokenizer.gpt2 import GPT2BPETokenizer

EXPORT_META = "handgpt.json"
EXPORT_TOKENIZER = "handgpt_tokenizer.bin"
EXPORT_FORMAT = 1
PICKLED_WEIGHTS = "pytorch_model.bin"  # weights as a pickle, as older transformers saved them
WEIGHTS_ONLY_FAILED = "Weights only load failed"  # torch.load(weights_only=True) refused it
FAMILIES = {"gpt2": hf, **{name: hf_llama for name in hf_llama.MODEL_TYPES}}  # model_type ->
# the module that converts it


def checkpoint_from_hf(source: str) -> dict:
    """What a checkpoint holds, for a Hugging Face GPT-2, Llama or Qwen3 directory or hub name.

    Checked in the order that fails cheapest: the architecture (config.json), the
    tokenizer, then the weights are read. Raises UserError, one line, for another
    architecture, a missing tokenizer, no network for a hub name, no `hf` extra, pickled
    weights that name code to run (read with weights_only, so none runs).
    """
    meta = read_export_meta(source)
    convert = converter(source)
    convert.pretrained_config(source)  # what we cannot compute: refused before anything else
    tok = _tokenizer(source, meta)
    try:
        model = convert.load_pretrained(source)
    except pickle.UnpicklingError as e:  # transformers reads .bin weights with weights_only
        if WEIGHTS_ONLY_FAILED not in str(e):
            raise
        pickled = Path(source) / PICKLED_WEIGHTS
        raise not_safe(pickled if pickled.is_file() else source) from None
    if meta is not None:
        model = restore_config(model, GPTConfig(**meta["model_config"]), source)
    # A GPT-2's table has a row per id of its tokenizer (tok.base) and may have a few more.
    needed = tok.base if isinstance(tok, GPT2BPETokenizer) else tok.vocab_size
    if not needed <= model.config.vocab_size <= tok.vocab_size:
        raise UserError(
            f"{source}: the model has {model.config.vocab_size} token ids but its tokenizer "
            f"{needed}; they do not belong together"
        )
    model = grow_vocab(model, tok.vocab_size)  # rows for the control tokens (and padding)
    return {
        "stage": (meta or {}).get("stage", "huggingface"),
        "model_kind": "gpt",
        "model_config": model.config.to_dict(),
        "model": model.state_dict(),
        "tokenizer": tok.state(),
        "path": str(source),
        "huggingface": True,  # not a checkpoint file: nothing is written beside it
    }


def not_safe(path) -> UserError:
    """The line for a pickle that names code to run (torch.load(weights_only=True) refused
    it, so nothing ran): never loaded, whoever reads it, our checkpoints or HF weights."""
    return UserError(
        f"{path} is not a safe checkpoint (loading it would run code); it will not be loaded"
    )


def converter(source: str):
    """model/hf.py or model/hf_llama.py, by the model_type in the source's config.json."""
    model_type = hf_llama.model_type(source)
    if model_type not in FAMILIES:
        raise UserError(
            f"{source}: expected a GPT-2, Llama or Qwen3 model (model_type "
            f"{', '.join(map(repr, FAMILIES))}), got model_type {model_type!r}"
        )
    return FAMILIES[model_type]


def read_export_meta(source: str) -> dict | None:
    """handgpt.json of a directory train.export wrote, or None for any other source."""
    path = Path(source) / EXPORT_META
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        GPTConfig(**meta["model_config"])  # a usable config
        meta["tokenizer"]["kind"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"{path} is damaged ({e}); delete it to load {source} as a plain GPT-2"
        ) from None
    return meta


def _tokenizer(source: str, meta: dict | None) -> tokenizers.Tokenizer:
    """The checkpoint's own tokenizer (an export of ours), else the model's GPT-2 BPE."""
    if meta is None:
        return GPT2BPETokenizer.from_pretrained(source)
    path = Path(source) / EXPORT_TOKENIZER
    if not path.is_file():
        raise UserError(f"{source} has {EXPORT_META} but no {EXPORT_TOKENIZER}; export it again")
    return tokenizers.from_state({"kind": meta["tokenizer"]["kind"], "model": path.read_bytes()})


def restore_config(model: GPT, config: GPTConfig, source: str = "") -> GPT:
    """`model` (imported from HF; a GPT-2 has bias=True) with our `config` back: attention,
    dropout, and bias=False when all its biases are zero (as our export wrote them; biases
    trained since then are kept, with bias=True)."""
    if architecture(config) != architecture(model.config):
        raise UserError(f"{source}: {EXPORT_META} does not describe the model in config.json")
    state = model.state_dict()
    if not config.bias:
        with torch.device("meta"):
            kept = GPT(config).state_dict().keys()
        if any(state[k].any() for k in state.keys() - kept):
            config = dataclasses.replace(config, bias=True)
    with torch.device("meta"):  # shapes only; the weights are put in place below
        restored = GPT(config)
    restored.load_state_dict({k: state[k] for k in restored.state_dict()}, assign=True)
    if config.tie_embeddings:
        restored.lm_head.weight = restored.embed.wte.weight  # assign=True untied them: tie again
    return restored


def architecture(config: GPTConfig) -> dict:
    """What fixes the function a config computes, whatever the training settings (attention,
    dropout) and the spelling (n_kv_head null or n_head, mlp_hidden null or its value)."""
    kept = config.to_dict()
    for name in ("attention", "dropout", "bias", "n_kv_head", "mlp_hidden"):
        kept.pop(name)
    hidden = config.swiglu_hidden if config.mlp == "swiglu" else 4 * config.n_embd
    return {**kept, "kv_heads": config.kv_heads, "mlp_width": hidden}
