"""Our GPT computes what Hugging Face's GPT2LMHeadModel computes, and converts both ways.

The reference is `transformers` itself, with random weights in a small configuration: every
parameter, biases and LayerNorm gains included, is drawn at random so that a wrong transpose,
a dropped bias or a swapped LayerNorm shows up in the logits. Nothing is downloaded: the
Hugging Face directories are written by the tests.
"""

import importlib
import sys

import pytest
import torch

import model as model_package
from errors import UserError
from model import GPT, GPTConfig
from model import hf as convert

transformers = pytest.importorskip("transformers")

SMALL = dict(n_layer=2, n_head=2, n_embd=16, block_size=32, vocab_size=53)
ATOL = 1e-4  # max abs difference between our logits and HF's


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter ~ N(0, 0.3), LayerNorm gains ~ 1 + N(0, 0.3): nothing left at 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = 0.3 * torch.randn(p.shape, generator=g)
            is_gain = p.dim() == 1 and "ln" in name and name.endswith("weight")
            p.copy_(1.0 + noise if is_gain else noise)


def random_hf_model(seed: int = 0, **overrides) -> "transformers.GPT2LMHeadModel":
    config = transformers.GPT2Config(
        n_layer=SMALL["n_layer"],
        n_head=SMALL["n_head"],
        n_embd=SMALL["n_embd"],
        n_positions=SMALL["block_size"],
        vocab_size=SMALL["vocab_size"],
        bos_token_id=None,
        eos_token_id=None,
        **overrides,
    )
    model = transformers.GPT2LMHeadModel(config)
    randomize(model, seed)
    return model.eval()


def random_gpt(bias: bool, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**SMALL, bias=bias))
    randomize(model, seed)
    return model.eval()


def token_ids(batch: int = 2, length: int = SMALL["block_size"], seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, SMALL["vocab_size"], (batch, length), generator=g)


def max_diff(ours: GPT, theirs: "transformers.GPT2LMHeadModel", idx: torch.Tensor) -> float:
    with torch.no_grad():
        a, _ = ours(idx)
        b = theirs(idx).logits
    assert a.shape == b.shape
    assert a.abs().max() > 1.0  # logits of a size worth comparing
    return (a - b).abs().max().item()


def greedy(model: GPT, idx: torch.Tensor, steps: int) -> torch.Tensor:
    """Our own greedy decoding with the KV cache, to compare with HF's generate."""
    cache = model.new_cache(batch_size=idx.size(0))
    with torch.no_grad():
        logits, _ = model(idx, cache=cache)
        for _ in range(steps):
            nxt = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
            logits, _ = model(nxt, cache=cache)
    return idx


# ----------------------------------------------------------------------------- HF -> ours


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_import_matches_hf_logits(attention):
    theirs = random_hf_model()
    ours = convert.from_hf_model(theirs, attention=attention).eval()
    assert ours.config == GPTConfig(**SMALL, bias=True, attention=attention)
    assert ours.lm_head.weight is ours.embed.wte.weight
    assert max_diff(ours, theirs, token_ids()) <= ATOL


def test_import_copies_weights():
    """The converted model owns its tensors: training it leaves the HF model alone."""
    theirs = random_hf_model()
    before = theirs.transformer.h[0].attn.c_attn.weight.clone()
    ours = convert.from_hf_model(theirs)
    with torch.no_grad():
        for p in ours.parameters():
            p.zero_()
    assert torch.equal(theirs.transformer.h[0].attn.c_attn.weight, before)


def test_load_pretrained_from_local_directory(tmp_path):
    """Saved in float16 (as many hub checkpoints are), loaded as float32."""
    theirs = random_hf_model(seed=3).half()
    theirs.save_pretrained(tmp_path)
    ours = convert.load_pretrained(tmp_path, attention="manual").eval()
    assert ours.embed.wte.weight.dtype == torch.float32
    assert max_diff(ours, theirs.float(), token_ids()) <= ATOL
    # A string works too.
    assert convert.load_pretrained(str(tmp_path)).config.n_layer == SMALL["n_layer"]


@pytest.mark.parametrize(
    "override, field",
    [
        (dict(activation_function="relu"), "activation_function"),
        (dict(layer_norm_epsilon=1e-6), "layer_norm_epsilon"),
        (dict(n_inner=24), "n_inner"),
        (dict(scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    ],
)
def test_import_refuses_what_we_do_not_compute(override, field):
    with pytest.raises(UserError, match=field):
        convert.from_hf_model(random_hf_model(**override))


def test_load_pretrained_refuses_other_architectures(tmp_path):
    transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="model_type 'llama'"):
        convert.load_pretrained(tmp_path)


def test_load_pretrained_missing_directory_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        convert.load_pretrained(tmp_path / "missing")


def test_load_pretrained_refuses_a_file(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UserError, match="is a file"):
        convert.load_pretrained(tmp_path / "weights.bin")


# ----------------------------------------------------------------------------- ours -> HF


@pytest.mark.parametrize("bias", [True, False])
def test_export_loads_in_transformers_and_matches(tmp_path, bias):
    ours = random_gpt(bias=bias, seed=4)
    out = convert.export_pretrained(ours, tmp_path / "hf")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()

    c = theirs.config
    assert (c.n_layer, c.n_head, c.n_embd) == (SMALL["n_layer"], SMALL["n_head"], SMALL["n_embd"])
    assert (c.n_positions, c.vocab_size) == (SMALL["block_size"], SMALL["vocab_size"])
    assert theirs.lm_head.weight is theirs.transformer.wte.weight
    if not bias:  # exported as zero biases
        for name, p in theirs.named_parameters():
            if name.endswith(".bias"):
                assert torch.equal(p, torch.zeros_like(p)), name
    assert max_diff(ours, theirs, token_ids()) <= ATOL

    # HF's generate (greedy, with its own cache) continues a prompt as we do.
    prompt = token_ids(batch=1, length=5, seed=7)
    with torch.no_grad():
        generated = theirs.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(generated, greedy(ours, prompt, steps=8))


@pytest.mark.parametrize("bias", [True, False])
def test_round_trip_keeps_the_function(bias):
    """ours -> HF -> ours gives the same logits (and, with biases, the same weights)."""
    ours = random_gpt(bias=bias, seed=5)
    back = convert.from_hf_model(convert.to_hf_model(ours)).eval()
    idx = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], ours(idx)[0], rtol=0, atol=ATOL)
    if bias:
        mine, theirs = ours.state_dict(), back.state_dict()
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), name


def test_export_writes_token_ids_and_dropout(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(**SMALL, dropout=0.2))
    out = convert.export_pretrained(ours, tmp_path, bos_token_id=1, eos_token_id=2)
    config = transformers.GPT2Config.from_pretrained(out)
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert config.embd_pdrop == config.attn_pdrop == config.resid_pdrop == 0.2


def test_export_keeps_dtype():
    ours = random_gpt(bias=True).to(torch.bfloat16)
    theirs = convert.to_hf_model(ours)
    assert theirs.transformer.wte.weight.dtype == torch.bfloat16
    assert torch.equal(theirs.transformer.wte.weight, ours.embed.wte.weight)


# ----------------------------------------------------------------------------- no transformers


def test_without_transformers_the_error_names_the_extra(monkeypatch, tmp_path):
    """With transformers not importable, model.hf still imports, and each conversion raises a
    UserError that says what to install."""
    ours = random_gpt(bias=True)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
    monkeypatch.delitem(sys.modules, "model.hf")  # so that it is imported afresh
    monkeypatch.setattr(model_package, "hf", convert)  # restored to this module afterwards
    fresh = importlib.import_module("model.hf")
    calls = [
        lambda: fresh.load_pretrained(tmp_path),
        lambda: fresh.to_hf_model(ours),
        lambda: fresh.export_pretrained(ours, tmp_path / "out"),
        lambda: fresh.from_hf_model(object()),
    ]
    for call in calls:
        with pytest.raises(UserError, match=r"pip install -e '\.\[hf\]'"):
            call()
    assert not (tmp_path / "out").exists()
