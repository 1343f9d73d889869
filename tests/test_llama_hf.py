"""The Llama family computes what transformers' LlamaForCausalLM and Qwen3ForCausalLM compute,
and converts both ways (model/hf_llama.py); train.export writes it with its tokenizer and chat
template, and init_from= that folder gives the checkpoint back.

The references are transformers' own classes with random weights (norm gains included) in
odd configurations: odd head counts, fewer key/value heads than query heads, a context of a
few tokens, rope_theta and eps away from their defaults, tied and untied heads. Nothing is
downloaded: the Hugging Face directories are written by the tests.
"""

import json
from pathlib import Path

import pytest
import torch
from tiny_sft import save_sft

import tokenizer
from errors import UserError
from model import GPT, GPTConfig, hf, hf_llama
from model.generate import complete
from tokenizer.chat import render_prompt
from train import export
from train.core.checkpoint import load_checkpoint, load_model
from train.settings import load

transformers = pytest.importorskip("transformers")
from tiny_hf import TEXT, byte_bpe, save_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-4
CLASSES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# (n_layer, n_head, n_kv_head, n_embd, block_size, intermediate, tied): odd head counts,
# GQA groups of 5, 3 and 1 (multi-query), contexts of 7 to 20 tokens
SHAPES = [
    (2, 5, 1, 40, 9, 36, False),
    (3, 3, 3, 18, 7, 20, True),
    (1, 6, 2, 36, 20, 50, False),
]


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter ~ N(0, 0.3), norm gains ~ 1 + N(0, 0.3): nothing left at 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            noise = 0.3 * torch.randn(p.shape, generator=g)
            p.copy_(1.0 + noise if p.dim() == 1 else noise)


def random_hf_model(family: str, shape: tuple, seed: int = 0, vocab_size: int = 61, **extra):
    n_layer, n_head, n_kv, n_embd, block, inter, tied = shape
    config_class = getattr(transformers, CLASSES[family]).config_class
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=n_embd,
        intermediate_size=inter,
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_kv,
        head_dim=n_embd // n_head,
        max_position_embeddings=block,
        rms_norm_eps=1e-5,
        rope_theta=500.0,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **extra,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, CLASSES[family])(config)
    randomize(model, seed)
    return model.eval()


def token_ids(batch: int, length: int, seed: int = 1, vocab: int = 61) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_greedy(theirs, prompts: list[list[int]], n: int) -> list[list[int]]:
    """transformers' generate on a left-padded batch (its attention mask gives the positions)."""
    T = max(map(len, prompts))
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = theirs.generate(
            idx,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return out[:, T:].tolist()


# ----------------------------------------------------------------------------- HF -> ours


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_import_computes_their_logits_and_greedy_tokens(family, shape, attention):
    theirs = random_hf_model(family, shape)
    ours = hf_llama.from_hf_model(theirs, attention=attention).eval()
    c = ours.config
    assert (c.n_head, c.kv_heads, c.qk_norm, c.tie_embeddings) == (
        shape[1],
        shape[2],
        family == "qwen3",
        shape[6],
    )
    assert (c.rope_theta, c.rms_norm_eps, c.swiglu_hidden) == (500.0, 1e-5, shape[5])
    assert (ours.lm_head.weight is ours.embed.wte.weight) == shape[6]
    idx = token_ids(3, shape[4])
    with torch.no_grad():
        a, b = ours(idx)[0], theirs(idx).logits
    assert b.abs().max() > 1.0
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)

    # a left-padded batch, positions counted from each row's first real token
    start = torch.tensor([0, 2, shape[4] - 1])
    real = torch.arange(shape[4])[None] >= start[:, None]  # (3, T)
    position_ids = (torch.arange(shape[4])[None] - start[:, None]).clamp(min=0)
    with torch.no_grad():
        a = ours(idx, start=start)[0]
        b = theirs(idx, attention_mask=real.long(), position_ids=position_ids).logits
    torch.testing.assert_close(a[real], b[real], rtol=0, atol=ATOL)

    # greedy decoding of prompts of different lengths, up to the end of the context
    prompts = [token_ids(1, n, seed=n)[0].tolist() for n in (1, 3, 4)]
    n = shape[4] - 4
    ours_tokens = [c.tokens for c in complete(ours, prompts, n, temperature=0.0)]
    assert ours_tokens == hf_greedy(theirs, prompts, n)


def test_import_copies_the_weights_and_keeps_the_dtype():
    theirs = random_hf_model("qwen3", SHAPES[0]).to(torch.bfloat16)
    ours = hf_llama.from_hf_model(theirs)
    assert ours.embed.wte.weight.dtype == torch.bfloat16
    q = theirs.model.layers[0].self_attn.q_proj.weight
    before = q.clone()
    with torch.no_grad():
        for p in ours.parameters():
            p.zero_()
    assert torch.equal(q, before)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_load_pretrained_from_a_directory(tmp_path, family):
    theirs = random_hf_model(family, SHAPES[0], seed=3)
    theirs.half().save_pretrained(tmp_path)  # float16 on disk, as many hub checkpoints are
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == family
    ours = hf_llama.load_pretrained(tmp_path, attention="manual").eval()
    assert ours.embed.wte.weight.dtype == torch.float32
    # (theirs.float() would keep its rotary frequencies rounded to float16 by .half())
    reference = type(theirs).from_pretrained(tmp_path, dtype=torch.float32).eval()
    idx = token_ids(2, SHAPES[0][4])
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], reference(idx).logits, rtol=0, atol=ATOL)


@pytest.mark.parametrize(
    "family, extra, field",
    [
        ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope"),
        (
            "llama",
            dict(
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8,
                }
            ),
            "rope",
        ),
        ("llama", dict(attention_bias=True), "attention_bias"),
        ("llama", dict(mlp_bias=True), "mlp_bias"),
        ("llama", dict(hidden_act="gelu"), "hidden_act"),
        (
            "qwen3",
            dict(use_sliding_window=True, sliding_window=4, max_window_layers=0),
            "use_sliding_window",
        ),
    ],
)
def test_what_we_cannot_compute_is_refused_naming_the_field(family, extra, field):
    theirs = random_hf_model(family, SHAPES[1], **extra)
    with pytest.raises(UserError, match=field) as info:
        hf_llama.from_hf_model(theirs)
    assert "\n" not in str(info.value)


def test_a_head_width_other_than_hidden_over_heads_is_refused(tmp_path):
    """Qwen3Config's head_dim defaults to 128 whatever the width: we compute C / n_head only."""
    config = transformers.Qwen3Config(
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=50,
    )
    assert config.head_dim == 128
    config.save_pretrained(tmp_path)
    with pytest.raises(UserError, match=r"head_dim=128.*hidden_size / num_attention_heads = 16"):
        hf_llama.pretrained_config(tmp_path)


# ----------------------------------------------------------------------------- ours -> HF


def random_llama(seed: int = 0, **overrides) -> GPT:
    config = dict(
        n_layer=2,
        n_head=5,
        n_embd=30,
        block_size=12,
        vocab_size=59,
        bias=False,
        position="rope",
        norm="rmsnorm",
        mlp="swiglu",
        n_kv_head=1,
        rope_theta=300.0,
        rms_norm_eps=1e-5,
        dropout=0.1,
    )
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**config, **overrides}))
    randomize(model, seed)
    return model.eval()


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("tie", [True, False])
def test_export_writes_every_setting_and_transformers_computes_our_logits(tmp_path, qk_norm, tie):
    ours = random_llama(qk_norm=qk_norm, tie_embeddings=tie)
    out = hf_llama.export_pretrained(
        ours, tmp_path, bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0
    )
    written = json.loads((out / "config.json").read_text())
    family = "qwen3" if qk_norm else "llama"
    assert written["model_type"] == family and written["architectures"] == [CLASSES[family]]
    assert written["head_dim"] == 6 and written["num_key_value_heads"] == 1
    assert written["tie_word_embeddings"] is tie and written["rope_theta"] == 300.0
    assert (written["bos_token_id"], written["eos_token_id"], written["pad_token_id"]) == (1, 2, 0)
    assert written["intermediate_size"] == ours.config.swiglu_hidden
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(theirs).__name__ == CLASSES[family]
    assert theirs.generation_config.eos_token_id == [2, 3]
    idx = token_ids(2, 12, vocab=59)
    with torch.no_grad():
        a, b = ours(idx)[0], theirs(idx).logits
    assert b.abs().max() > 1.0
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL)
    # and back: the same weights, the same function
    back = hf_llama.from_hf_model(theirs, dropout=0.1)
    assert back.config == ours.config.__class__(
        **{**ours.config.to_dict(), "mlp_hidden": ours.config.swiglu_hidden}
    )
    mine, again = ours.state_dict(), back.state_dict()
    assert mine.keys() == again.keys() and all(torch.equal(mine[k], again[k]) for k in mine)


def test_a_mix_of_the_two_families_has_no_hugging_face_class():
    mixed = GPTConfig(n_layer=1, n_head=2, n_embd=16, position="rope", bias=False)
    with pytest.raises(
        UserError,
        match="GPT2LMHeadModel would need position=learned; "
        "LlamaForCausalLM would need norm=rmsnorm, mlp=swiglu",
    ):
        hf_llama.hf_family(mixed)
    assert hf_llama.hf_family(GPTConfig(n_layer=1, n_head=2, n_embd=16)) == "gpt2"
    with pytest.raises(UserError, match="this is a llama model, not a GPT-2"):
        hf.to_hf_model(random_llama())


# ----------------------------------------------------------------------------- train.export


def export_cli(*overrides: str) -> Path:
    return export.run(load("export", overrides))


@pytest.mark.parametrize("qk_norm", [False, True])
def test_export_and_init_from_give_back_the_checkpoint(tmp_path, qk_norm):
    """A checkpoint of ours (SentencePiece tokenizer, untied head, GQA) -> train.export ->
    transformers runs it with our tokenizer and chat template -> init_from= the folder."""
    tok = tokenizer.train_tokenizer(TEXT * 10, vocab_size=360)
    model = random_llama(
        vocab_size=tok.vocab_size,
        block_size=64,
        tie_embeddings=False,
        qk_norm=qk_norm,
        attention="manual",
    )
    save_sft(tmp_path / "ckpt.pt", tok, model)
    out = export_cli(f"checkpoint={tmp_path / 'ckpt.pt'}", f"out={tmp_path / 'hf'}")

    theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": TEXT[2]}]
    ids = hf_tok.apply_chat_template(
        messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )["input_ids"]
    assert ids[0].tolist() == render_prompt(tok, messages)
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], theirs(ids).logits, rtol=0, atol=ATOL)
        greedy = theirs.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert (
        greedy[0, ids.size(1) :].tolist()
        == complete(model, [ids[0].tolist()], 6, temperature=0.0)[0].tokens
    )

    back, back_tok, ckpt = load_model(out)
    original = load_checkpoint(tmp_path / "ckpt.pt")
    assert back.config.to_dict() == original["model_config"]  # dropout, attention too
    assert back_tok.state() == original["tokenizer"]
    assert back.state_dict().keys() == original["model"].keys()
    for name, t in back.state_dict().items():
        assert torch.equal(t, original["model"][name]), name
    with torch.no_grad():
        assert torch.equal(back(ids)[0], model(ids)[0])


# ----------------------------------------------------------------------------- init_from


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_hugging_face_directory_reads_as_a_checkpoint(tmp_path, family):
    """A Llama or Qwen3 directory with a byte-level BPE: its weights, its tokenizer, the
    table (and the untied head) grown by mean rows for our control tokens."""
    t = byte_bpe()
    theirs = random_hf_model(family, SHAPES[0], vocab_size=t.get_vocab_size())
    theirs.save_pretrained(tmp_path)
    save_tokenizer(t, tmp_path)
    model, tok, ckpt = load_model(str(tmp_path))
    assert ckpt["stage"] == "huggingface" and tok.kind == "gpt2"
    assert model.config.vocab_size == tok.vocab_size > tok.base == t.get_vocab_size()
    idx = torch.tensor([tok.encode(TEXT[0])[: SHAPES[0][4]]])
    with torch.no_grad():
        torch.testing.assert_close(
            model(idx)[0][..., : tok.base], theirs(idx).logits, rtol=0, atol=ATOL
        )
    head = theirs.lm_head.weight
    torch.testing.assert_close(
        model.lm_head.weight[tok.base :], head.mean(0).expand(tok.vocab_size - tok.base, -1)
    )
    assert model.lm_head.weight is not model.embed.wte.weight  # untied stays untied
