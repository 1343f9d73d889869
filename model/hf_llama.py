"""Llama and Qwen3 weights in and out: our GPT's Llama family and transformers'
LlamaForCausalLM and Qwen3ForCausalLM.

Like model/hf.py (GPT-2's), this module imports `transformers` lazily, inside the functions.
A GPTConfig with position=rope, norm=rmsnorm, mlp=swiglu and bias=false computes what
LlamaForCausalLM computes, and with qk_norm=true what Qwen3ForCausalLM computes
(tests/test_llama.py: logits within 1e-4, the same greedy tokens). Both store nn.Linear
weights as we do, (out, in), so converting is renaming, plus one split:

    ours (block i)                      transformers (model.layers.i)
    embed.wte.weight          (V, C)    model.embed_tokens.weight
    h.i.ln_1.weight           (C,)      input_layernorm.weight
    h.i.attn.c_attn.weight    (C+2K,C)  self_attn.q_proj (C,C), k_proj (K,C), v_proj (K,C)
                                        one under the other; K = n_kv_head * head_dim
    h.i.attn.q_norm.weight    (d,)      self_attn.q_norm.weight     (Qwen3: QK-norm)
    h.i.attn.k_norm.weight    (d,)      self_attn.k_norm.weight
    h.i.attn.c_proj.weight    (C, C)    self_attn.o_proj.weight
    h.i.ln_2.weight           (C,)      post_attention_layernorm.weight
    h.i.mlp.c_gate.weight     (F, C)    mlp.gate_proj.weight
    h.i.mlp.c_fc.weight       (F, C)    mlp.up_proj.weight
    h.i.mlp.c_proj.weight     (C, F)    mlp.down_proj.weight
    ln_f.weight               (C,)      model.norm.weight
    lm_head.weight            (V, C)    lm_head.weight (the token table when tied)

The conventions that must agree, each a classic source of small silent differences: the
rotary "rotate_half" layout, frequencies and angles in float32, rope_theta (model/rotary.py);
RMSNorm in float32 with its gain starting at 1 (model/norm.py); QK-norm over head_dim with
one gain for all heads, before the rotary embedding; query head h reads key/value head
h // (n_head / n_kv_head); scores scaled by head_dim^-0.5 (model/attention.py). What
transformers' configs can say and ours cannot (rope_scaling, attention or MLP biases,
sliding windows, a head_dim other than hidden_size / num_attention_heads, an activation
other than SiLU) is refused in one line, naming the field.

An export writes what the config classes would otherwise fill with their own defaults:
head_dim (Qwen3Config's is 128), tie_word_embeddings, rope_theta (also as a top-level
key, where transformers before 5 reads it) and the bos/eos/pad ids.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from errors import UserError

from .config import GPTConfig
from .gpt import GPT
from .hf import HF_EXTRA, _first_line, _source

# model_type -> the transformers class that computes our Llama family with or without QK-norm
MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# Our names inside block i -> transformers' names inside model.layers.i (c_attn: QKV_NAMES).
LAYER_NAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "mlp.c_gate.weight": "mlp.gate_proj.weight",
    "mlp.c_fc.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
QKV_NAMES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
TOP_NAMES = {
    "embed.wte.weight": "model.embed_tokens.weight",
    "ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}

# What each family's Hugging Face class needs of a GPTConfig: (field, value).
FAMILY_NEEDS = {
    "gpt2": (("position", "learned"), ("norm", "layernorm"), ("mlp", "gelu"),
             ("n_kv_head", None), ("qk_norm", False), ("tie_embeddings", True)),
    "llama": (("position", "rope"), ("norm", "rmsnorm"), ("mlp", "swiglu"), ("bias", False)),
}  # fmt: skip


def _transformers() -> Any:
    """Import transformers, or explain which extra to install."""
    try:
        import transformers
    except ImportError as e:
        raise UserError(
            f"converting to or from Hugging Face Llama or Qwen3 needs the 'hf' extra "
            f"(transformers); install it with: {HF_EXTRA}"
        ) from e
    return transformers


def hf_family(config: GPTConfig) -> str:
    """Which Hugging Face class computes this config: "gpt2" (GPT2LMHeadModel), "llama"
    (LlamaForCausalLM) or "qwen3" (Qwen3ForCausalLM, the Llama family with QK-norm).
    A mix of the two families (GPT-2 with rotary embeddings, say: the ablation's rows) has
    none: UserError naming what each family needs."""
    have = {**config.to_dict(), "n_kv_head": None if config.kv_heads == config.n_head else 0}
    missing = {
        family: [(f, v) for f, v in needs if have[f] != v] for family, needs in FAMILY_NEEDS.items()
    }
    if not missing["gpt2"]:
        return "gpt2"
    if not missing["llama"]:
        return "qwen3" if config.qk_norm else "llama"
    raise UserError(
        "no Hugging Face class computes this model (it mixes the GPT-2 and Llama families): "
        f"GPT2LMHeadModel would need {_settings(missing['gpt2'])}; LlamaForCausalLM would "
        f"need {_settings(missing['llama'])}"
    )


def _settings(pairs: list[tuple[str, Any]]) -> str:
    """[("norm", "rmsnorm"), ("n_kv_head", None)] -> "norm=rmsnorm, n_kv_head=null"."""
    return ", ".join(f"{f}={'null' if v is None else str(v).lower()}" for f, v in pairs)


# ----------------------------------------------------------------------------- HF -> ours


def _rope_theta(hf_config: Any) -> float:
    """rope_theta of a Llama/Qwen3 config, refusing scaled rotary embeddings. transformers 5
    keeps it in rope_parameters, earlier versions as rope_theta beside rope_scaling."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict):
        scaled = {k: v for k, v in params.items() if k not in ("rope_type", "rope_theta")}
        scaled = {k: v for k, v in scaled.items() if not (k == "partial_rotary_factor" and v == 1)}
        if params.get("rope_type", "default") != "default" or scaled:
            raise UserError(
                f"cannot convert this model: its config has rope_parameters={params!r} (scaled "
                "rotary embeddings), but our GPT computes only rope_type 'default'"
            )
        return float(params["rope_theta"])
    if getattr(hf_config, "rope_scaling", None):
        raise UserError(
            f"cannot convert this model: its config has rope_scaling={hf_config.rope_scaling!r}, "
            "but our GPT computes only unscaled rotary embeddings (rope_scaling null)"
        )
    return float(hf_config.rope_theta)


def config_from_hf(hf_config: Any, attention: str = "sdpa", dropout: float = 0.0) -> GPTConfig:
    """Our GPTConfig for a transformers LlamaConfig or Qwen3Config, refusing the variants we
    cannot compute (UserError naming the field)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise UserError(
            f"expected a Llama or Qwen3 model (model_type 'llama' or 'qwen3'), got model_type "
            f"{model_type!r}"
        )
    c = hf_config
    heads_dim = c.hidden_size // c.num_attention_heads
    layer_types = set(getattr(c, "layer_types", None) or ["full_attention"])
    checks = [  # (field, whether its value is one we compute, the values we compute)
        ("hidden_act", c.hidden_act == "silu", "silu"),
        ("attention_bias", not c.attention_bias, False),
        ("mlp_bias", not getattr(c, "mlp_bias", False), False),
        ("head_dim", getattr(c, "head_dim", None) in (None, heads_dim),
         f"hidden_size / num_attention_heads = {heads_dim}"),
        ("use_sliding_window", not getattr(c, "use_sliding_window", False), False),
        ("layer_types", layer_types == {"full_attention"}, "full_attention only"),
    ]  # fmt: skip
    for field, ok, expected in checks:
        if not ok:
            raise UserError(
                f"cannot convert this {model_type} model: its config has "
                f"{field}={getattr(c, field)!r}, but our GPT computes only {field}={expected}"
            )
    try:
        return GPTConfig(
            n_layer=c.num_hidden_layers,
            n_head=c.num_attention_heads,
            n_embd=c.hidden_size,
            block_size=c.max_position_embeddings,
            vocab_size=c.vocab_size,
            dropout=dropout,
            bias=False,
            attention=attention,
            position="rope",
            norm="rmsnorm",
            mlp="swiglu",
            mlp_hidden=c.intermediate_size,
            n_kv_head=c.num_key_value_heads or c.num_attention_heads,
            qk_norm=model_type == "qwen3",
            tie_embeddings=bool(c.tie_word_embeddings),
            rope_theta=_rope_theta(c),
            rms_norm_eps=float(c.rms_norm_eps),
        )
    except ValueError as e:  # a shape our GPTConfig refuses (an odd head width for RoPE...)
        raise UserError(f"cannot convert this {model_type} model: {e}") from None


def hf_names(name: str) -> list[str]:
    """transformers' parameter name(s) for one of ours: 'h.0.ln_1.weight' ->
    ['model.layers.0.input_layernorm.weight']; c_attn -> q_proj, k_proj, v_proj."""
    if name in TOP_NAMES:
        return [TOP_NAMES[name]]
    _, layer, rest = name.split(".", 2)  # 'h', '0', 'attn.c_attn.weight'
    inside = QKV_NAMES if rest == "attn.c_attn.weight" else (LAYER_NAMES[rest],)
    return [f"model.layers.{layer}.{n}" for n in inside]


def from_hf_model(hf_model: Any, attention: str = "sdpa", dropout: float = 0.0) -> GPT:
    """Our GPT with the weights of a transformers LlamaForCausalLM or Qwen3ForCausalLM
    (copied, not shared), in its dtype and on its device."""
    _transformers()
    config = config_from_hf(hf_model.config, attention=attention, dropout=dropout)
    hf_state = hf_model.state_dict()
    with torch.device("meta"):  # shapes only; the converted tensors go in with assign=True
        model = GPT(config)
    state = {}
    for name, ours in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # the token table, set below
        theirs = torch.cat([hf_state[n] for n in hf_names(name)])  # c_attn: Q, K, V stacked
        if theirs.shape != ours.shape:
            raise UserError(
                f"cannot convert this model: {', '.join(hf_names(name))} has shape "
                f"{tuple(theirs.shape)}, expected {tuple(ours.shape)}"
            )
        state[name] = theirs.detach().clone(memory_format=torch.contiguous_format)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.wte.weight"]
    model.load_state_dict(state, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed.wte.weight  # assign=True made two Parameters: re-tie
    return model


def model_type(name_or_dir: str | os.PathLike) -> str | None:
    """The model_type of a Hugging Face directory or hub name (its config.json alone)."""
    return getattr(_hf_config(name_or_dir), "model_type", None)


def _hf_config(name_or_dir: str | os.PathLike) -> Any:
    source = _source(name_or_dir)
    try:  # HF reports a missing directory, file or hub repo (or no network) as OSError
        return _transformers().AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(
            f"could not load Hugging Face model {source!r} ({_first_line(e)})"
        ) from None


def pretrained_config(name_or_dir: str | os.PathLike) -> GPTConfig:
    """Our GPTConfig for a Hugging Face Llama or Qwen3 (directory or hub name), from its
    config.json alone: what we cannot compute is refused before any weights are read."""
    try:
        return config_from_hf(_hf_config(name_or_dir))
    except UserError as e:
        raise UserError(f"{_source(name_or_dir)}: {e}") from None


def load_pretrained(
    name_or_dir: str | os.PathLike, attention: str = "sdpa", dropout: float = 0.0
) -> GPT:
    """Our GPT, in float32 on the CPU, from a Hugging Face Llama or Qwen3 directory or hub name."""
    pretrained_config(name_or_dir)  # refuse what we cannot compute before loading weights
    source = _source(name_or_dir)
    model_class = _model_class(model_type(source))
    try:
        hf_model = model_class.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the weights of {source!r} ({_first_line(e)})") from None
    return from_hf_model(hf_model.float(), attention=attention, dropout=dropout)


def _model_class(family: str) -> Any:
    """LlamaForCausalLM or Qwen3ForCausalLM; Qwen3 needs transformers >= 4.51."""
    transformers = _transformers()
    name = MODEL_TYPES[family]
    if not hasattr(transformers, name):
        raise UserError(
            f"{name} needs transformers >= 4.51 (this is {transformers.__version__}); "
            f"upgrade it: {HF_EXTRA}"
        )
    return getattr(transformers, name)


# ----------------------------------------------------------------------------- ours -> HF


def hf_config_for(c: GPTConfig, bos_token_id=None, eos_token_id=None, pad_token_id=None) -> Any:
    """The LlamaConfig (or Qwen3Config, with QK-norm) of a config of our Llama family, with
    every value written that the config class would otherwise fill with its own default."""
    family = hf_family(c)
    if family == "gpt2":
        raise UserError("this is a GPT-2-shaped model: export it with model/hf.py")
    model_class = _model_class(family)
    fields = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.swiglu_hidden,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.kv_heads,
        head_dim=c.head_dim,
        hidden_act="silu",
        max_position_embeddings=c.block_size,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        attention_bias=False,
        attention_dropout=c.dropout,
        tie_word_embeddings=c.tie_embeddings,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    if family == "qwen3":
        fields["use_sliding_window"] = False
    else:
        fields["mlp_bias"] = False
    hf_config = model_class.config_class(**fields)
    hf_config.rope_theta = c.rope_theta  # top-level too: transformers < 5 reads it there
    return hf_config


def to_hf_model(
    model: GPT,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> Any:
    """A transformers LlamaForCausalLM or Qwen3ForCausalLM (on the CPU, in our dtype)
    computing what `model` does; the token ids as model/hf.py: to_hf_model puts them."""
    transformers = _transformers()
    c = model.config
    eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    hf_config = hf_config_for(c, bos_token_id, eos[0] if eos else None, pad_token_id)
    hf_model = _model_class(hf_family(c))(hf_config)

    ours = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    state = {}
    for name, tensor in ours.items():
        theirs = hf_names(name)
        pieces = tensor.split(model.h[0].attn.qkv_widths) if len(theirs) == 3 else [tensor]
        state.update(zip(theirs, pieces, strict=True))
    hf_model.load_state_dict(state)  # copies (and casts) into HF's own parameters
    hf_model.to(model.embed.wte.weight.dtype)
    hf_model.generation_config = transformers.GenerationConfig(
        bos_token_id=bos_token_id,
        eos_token_id=(eos if len(eos) > 1 else eos[0]) if eos else None,
        pad_token_id=pad_token_id,
    )
    hf_model.eval()
    return hf_model


def export_pretrained(
    model: GPT,
    out_dir: str | os.PathLike,
    bos_token_id: int | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> Path:
    """Write `model` as a Hugging Face Llama (or Qwen3) directory (config.json,
    model.safetensors, generation_config.json); returns the directory. train/export.py
    writes the tokenizer beside it."""
    hf_model = to_hf_model(model, bos_token_id, eos_token_id, pad_token_id)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(out)
    return out
