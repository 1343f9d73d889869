"""GPT-2 weights in and out: conversion between our GPT and Hugging Face's GPT2LMHeadModel.

This is the only module that imports `transformers`, and it does so lazily, inside the
functions, so the rest of model/ stays pure torch and `import model.hf` works without it.
Install it with  pip install -e '.[hf]'.

Both models compute the same function (tests/test_hf.py proves it to 1e-4), so converting
is just renaming and reshaping tensors:

    ours                         Hugging Face GPT2LMHeadModel
    embed.wte.weight       (V,C)  transformer.wte.weight           (V,C)
    embed.wpe.weight       (T,C)  transformer.wpe.weight           (T,C)
    h.i.ln_1.{weight,bias}        transformer.h.i.ln_1.{weight,bias}
    h.i.attn.c_attn.weight (3C,C) transformer.h.i.attn.c_attn.weight (C,3C)  transposed
    h.i.attn.c_proj.weight (C,C)  transformer.h.i.attn.c_proj.weight (C,C)   transposed
    h.i.ln_2.{weight,bias}        transformer.h.i.ln_2.{weight,bias}
    h.i.mlp.c_fc.weight    (4C,C) transformer.h.i.mlp.c_fc.weight  (C,4C)    transposed
    h.i.mlp.c_proj.weight  (C,4C) transformer.h.i.mlp.c_proj.weight (4C,C)   transposed
    ln_f.{weight,bias}            transformer.ln_f.{weight,bias}
    lm_head.weight = embed.wte    lm_head.weight = transformer.wte (tied in both)

Why the transposes: HF's GPT-2 uses `Conv1D` layers, which store W with shape (in, out) and
compute y = x W + b, while nn.Linear stores W with shape (out, in) and computes y = x W^T + b.
Biases have the same shape in both.

Biases: HF's GPT-2 always has biases. A model imported from HF therefore gets bias=True.
A model of ours with bias=False is exported with all biases set to zero (Linear biases and
LayerNorm shifts), which computes exactly the same function; imported back by this module
alone, it becomes a bias=True model whose biases are zero. (train/export.py also writes our
own config beside the weights, and train/core/pretrained.py restores bias=False from it.)

Dropout is a training setting, not a weight: an imported model gets the `dropout` you pass
(default 0.0); an export writes our single dropout rate into HF's three (embd_pdrop,
attn_pdrop, resid_pdrop).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from errors import UserError

from .config import GPTConfig
from .gpt import GPT
from .norm import LAYER_NORM_EPS

if TYPE_CHECKING:  # for type hints only; the real import happens in _transformers()
    from transformers import GPT2LMHeadModel

HF_EXTRA = "pip install -e '.[hf]'"

# Layers that HF stores as Conv1D: their weights are the transpose of ours.
CONV1D_LAYERS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")

# HF activation names that are the tanh approximation of GELU, the one our FeedForward uses.
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


def _transformers() -> Any:
    """Import transformers, or explain which extra to install."""
    try:
        import transformers
    except ImportError as e:
        raise UserError(
            f"converting to or from Hugging Face GPT-2 needs the 'hf' extra "
            f"(transformers); install it with: {HF_EXTRA}"
        ) from e
    return transformers


def hf_name(name: str) -> str:
    """The HF GPT2LMHeadModel parameter name for one of ours.

    'embed.wte.weight' -> 'transformer.wte.weight', 'h.0.attn.c_attn.bias' ->
    'transformer.h.0.attn.c_attn.bias', 'lm_head.weight' -> 'lm_head.weight'.
    """
    if name.startswith("lm_head."):
        return name
    return "transformer." + name.removeprefix("embed.")


def is_conv1d_weight(name: str) -> bool:
    """Whether this parameter (our name or HF's) is stored transposed by HF."""
    return name.endswith(tuple(f"{layer}.weight" for layer in CONV1D_LAYERS))


# ----------------------------------------------------------------------------- HF -> ours


def config_from_hf(hf_config: Any, attention: str = "sdpa", dropout: float = 0.0) -> GPTConfig:
    """Our GPTConfig for a transformers GPT2Config, refusing the variants we cannot compute.

    Raises UserError naming the field when the HF model computes something ours does not
    (another activation, another LayerNorm epsilon, another attention scaling, ...).
    """
    model_type = getattr(hf_config, "model_type", None)
    if model_type != "gpt2":
        raise UserError(
            f"expected a GPT-2 model (model_type 'gpt2'), got model_type {model_type!r}"
        )
    n_embd = hf_config.n_embd
    checks = [  # (field, whether its value is one we compute, the values we compute)
        ("activation_function", hf_config.activation_function in TANH_GELUS, TANH_GELUS),
        ("layer_norm_epsilon", hf_config.layer_norm_epsilon == LAYER_NORM_EPS, LAYER_NORM_EPS),
        ("n_inner", hf_config.n_inner in (None, 4 * n_embd), f"None or 4*n_embd={4 * n_embd}"),
        ("scale_attn_weights", hf_config.scale_attn_weights, True),
        ("scale_attn_by_inverse_layer_idx", not hf_config.scale_attn_by_inverse_layer_idx, False),
        ("add_cross_attention", not hf_config.add_cross_attention, False),
        ("tie_word_embeddings", hf_config.tie_word_embeddings, True),
    ]
    for field, ok, expected in checks:
        if not ok:
            raise UserError(
                f"cannot convert this GPT-2: its config has {field}={getattr(hf_config, field)!r}, "
                f"but our GPT computes only {field}={expected}"
            )
    return GPTConfig(
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_embd=n_embd,
        block_size=hf_config.n_positions,
        vocab_size=hf_config.vocab_size,
        dropout=dropout,
        bias=True,  # HF's GPT-2 always has biases
        attention=attention,
    )


def from_hf_model(hf_model: GPT2LMHeadModel, attention: str = "sdpa", dropout: float = 0.0) -> GPT:
    """Our GPT with the weights of a transformers GPT2LMHeadModel (copied, not shared).

    The result has bias=True and the same dtype and device as `hf_model`; `attention` and
    `dropout` are ours to choose, as they are not part of the weights.
    """
    transformers = _transformers()
    if not isinstance(hf_model, transformers.GPT2LMHeadModel):
        raise TypeError(f"expected a transformers GPT2LMHeadModel, got {type(hf_model).__name__}")
    config = config_from_hf(hf_model.config, attention=attention, dropout=dropout)
    hf_state = hf_model.state_dict()
    if not torch.equal(hf_state["lm_head.weight"], hf_state["transformer.wte.weight"]):
        raise UserError("cannot convert this GPT-2: its LM head is not tied to the token embedding")

    # Build on the meta device: shapes only, no memory and no random init (which would take
    # a while for gpt2-xl), then put the converted tensors in place with assign=True.
    with torch.device("meta"):
        model = GPT(config)
    state = {}
    for name, ours in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied: the same tensor as embed.wte.weight, set below
        theirs = hf_state[hf_name(name)]
        if is_conv1d_weight(name):
            theirs = theirs.t()  # Conv1D (in, out) -> Linear (out, in)
        if theirs.shape != ours.shape:
            raise UserError(
                f"cannot convert this GPT-2: {hf_name(name)} has shape {tuple(theirs.shape)}, "
                f"expected {tuple(ours.shape)}"
            )
        state[name] = theirs.detach().clone(memory_format=torch.contiguous_format)
    state["lm_head.weight"] = state["embed.wte.weight"]
    model.load_state_dict(state, assign=True)
    model.lm_head.weight = model.embed.wte.weight  # assign=True made two Parameters: re-tie
    return model


def pretrained_config(name_or_dir: str | os.PathLike) -> GPTConfig:
    """Our GPTConfig for a Hugging Face GPT-2 (directory or hub name), from its config.json
    alone: a model of another architecture is refused before any weights are read."""
    transformers = _transformers()
    source = _source(name_or_dir)
    try:  # HF reports a missing directory, file or hub repo (or no network) as OSError
        hf_config = transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not load Hugging Face model {source!r} ({_first_line(e)})"
        ) from None
    try:
        return config_from_hf(hf_config)
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def load_pretrained(
    name_or_dir: str | os.PathLike, attention: str = "sdpa", dropout: float = 0.0
) -> GPT:
    """Our GPT, in float32 on the CPU, from a Hugging Face GPT-2.

    name_or_dir: a local directory written by `save_pretrained` (or by export_pretrained
    below), or a model name on the Hugging Face hub such as "gpt2", "gpt2-medium" or
    "openai-community/gpt2-xl" (downloaded once into HF's cache; needs the network).
    An existing local directory wins over a hub name spelled the same.
    """
    transformers = _transformers()
    pretrained_config(name_or_dir)  # refuse non-GPT-2 models before loading their weights
    source = _source(name_or_dir)
    try:
        hf_model = transformers.GPT2LMHeadModel.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the weights of {source!r} ({_first_line(e)})") from None
    # Recent transformers keep the dtype the weights were saved in; we train in float32.
    return from_hf_model(hf_model.float(), attention=attention, dropout=dropout)


def _source(name_or_dir: str | os.PathLike) -> str:
    """What to hand transformers: an existing directory's path, else the hub name."""
    path = Path(name_or_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; expected a Hugging Face model directory or hub name")
    if not path.exists() and _looks_like_path(str(name_or_dir)):
        raise UserError(f"no such directory: {path} (expected a Hugging Face model directory)")
    return str(path) if path.is_dir() else str(name_or_dir)


def _first_line(e: Exception) -> str:
    """HF's messages run over several lines; the first says what went wrong."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _looks_like_path(name: str) -> bool:
    """A hub name is 'name' or 'owner/name'; anything else is meant as a local path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


# ----------------------------------------------------------------------------- ours -> HF


def to_hf_model(
    model: GPT,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> GPT2LMHeadModel:
    """A transformers GPT2LMHeadModel (on the CPU, in our dtype) computing what `model` does.

    A bias=False model gets zero biases (HF's GPT-2 always has them; adding zero changes
    nothing). The token ids go where `generate` reads them (generation_config): it stops at
    any of eos_token_id (give a list for several: a chat model ends a turn with <|end|> and
    a document with <|eos|>) and pads with pad_token_id; config.json gets the first eos id.
    By default there are none: the ids belong to the tokenizer (train/export.py passes them).
    """
    transformers = _transformers()
    c = model.config
    from .hf_llama import hf_family  # here: model/hf_llama.py imports this module

    if hf_family(c) != "gpt2":  # a Llama-family model: GPT2LMHeadModel cannot compute it
        raise UserError(
            f"this is a {hf_family(c)} model, not a GPT-2: export it with model/hf_llama.py"
        )
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    hf_config = transformers.GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=None,  # 4 * n_embd
        activation_function="gelu_new",  # tanh-approximated GELU
        layer_norm_epsilon=LAYER_NORM_EPS,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        resid_pdrop=c.dropout,
        tie_word_embeddings=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos[0] if eos else None,
        pad_token_id=pad_token_id,
    )
    hf_model = transformers.GPT2LMHeadModel(hf_config)

    ours = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    state = {}
    for hf_key, theirs in hf_model.state_dict().items():
        name = _our_name(hf_key)
        if name in ours:
            tensor = ours[name]
            state[hf_key] = tensor.t() if is_conv1d_weight(name) else tensor  # Linear -> Conv1D
        elif hf_key.endswith(".bias") and not c.bias:
            state[hf_key] = torch.zeros_like(theirs)  # bias=False: HF's biases stay zero
        else:
            raise RuntimeError(f"no weight of ours maps to {hf_key}")  # a bug in this module
    hf_model.load_state_dict(state)  # copies (and casts) into HF's own parameters
    hf_model.to(model.embed.wte.weight.dtype)
    hf_model.generation_config = transformers.GenerationConfig(
        bos_token_id=bos_token_id,
        eos_token_id=(eos if len(eos) > 1 else eos[0]) if eos else None,
        pad_token_id=pad_token_id,
    )
    hf_model.eval()
    return hf_model


def _our_name(hf_key: str) -> str:
    """Inverse of hf_name: 'transformer.wte.weight' -> 'embed.wte.weight'."""
    if hf_key.startswith("lm_head."):
        return hf_key
    name = hf_key.removeprefix("transformer.")
    if name.startswith(("wte.", "wpe.")):
        name = "embed." + name
    return name


def export_pretrained(
    model: GPT,
    out_dir: str | os.PathLike,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> Path:
    """Write `model` as a Hugging Face GPT-2 directory (config.json, model.safetensors,
    generation_config.json) that `GPT2LMHeadModel.from_pretrained(out_dir)` loads and can
    `generate` from; the token ids as in `to_hf_model`. Returns the directory.

    Only the model is written; train/export.py writes the tokenizer beside it
    (tokenizer/hf.py), with the ids it passes here.
    """
    hf_model = to_hf_model(model, bos_token_id, eos_token_id, pad_token_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out)
    return out
