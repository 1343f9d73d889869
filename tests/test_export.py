"""python -m train.export: any checkpoint as a Hugging Face directory that transformers runs,
tokenizer and chat template included, for both tokenizer kinds; and back again.

Two checkpoints are exported: one with the project's own SentencePiece tokenizer (bias=False,
manual attention: what a round trip through Hugging Face used to lose), and one with a
pretrained GPT-2's byte-level BPE (tests/tiny_hf.py). transformers then loads each with
AutoTokenizer, GPT2LMHeadModel and pipeline, and must give our ids and our logits.
"""

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_sft import save_sft

import tokenizer
from errors import UserError
from model import GPT, GPTConfig
from model.generate import generate
from tokenizer import SPECIAL_TOKENS
from tokenizer.chat import render_conversation, render_prompt
from tokenizer.hf import ESCAPE
from train import export
from train.core.checkpoint import load_checkpoint, load_model, save_checkpoint
from train.settings import load

transformers = pytest.importorskip("transformers")
from tiny_hf import TEXT, make_gpt2_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("sentencepiece", "gpt2")


def export_cli(*overrides: str) -> Path:
    return export.run(load("export", overrides))


def sentencepiece_checkpoint(path: Path) -> Path:
    tok = tokenizer.train_tokenizer(TEXT * 10, vocab_size=360)
    torch.manual_seed(0)
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64, vocab_size=tok.vocab_size,
                       bias=False, attention="manual", dropout=0.1)  # fmt: skip
    model = GPT(config)
    with torch.no_grad():  # larger random weights: logits worth comparing
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    save_sft(path, tok, model)
    return path


def gpt2_checkpoint(path: Path, normalized: bool = False) -> Path:
    """A checkpoint of ours (as SFT would write it) of a pretrained GPT-2, gpt2 tokenizer
    (normalized: the flag of its <|endoftext|>, tests/tiny_hf.py)."""
    gpt2_dir = make_gpt2_dir(path.parent / "tiny-gpt2", seed=3, normalized=normalized)
    ckpt = load_checkpoint(gpt2_dir)
    save_checkpoint(path, {k: v for k, v in ckpt.items() if k not in ("path", "huggingface")})
    return path


@pytest.fixture(scope="module", params=KINDS)
def exported(request, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp(request.param)
    make = sentencepiece_checkpoint if request.param == "sentencepiece" else gpt2_checkpoint
    ckpt = make(d / "ckpt.pt")
    out = export_cli(f"checkpoint={ckpt}", f"out={d / 'hf'}")
    model, tok, _ = load_model(ckpt)
    return {
        "ckpt": ckpt,
        "out": out,
        "model": model,
        "tok": tok,
        "hf_tok": transformers.AutoTokenizer.from_pretrained(out),
        "hf_model": transformers.GPT2LMHeadModel.from_pretrained(out).eval(),
    }


def test_both_kinds_are_exported(exported):
    assert exported["tok"].kind in KINDS
    names = {p.name for p in exported["out"].iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "handgpt.json", "handgpt_tokenizer.bin"} <= names  # fmt: skip


# ----------------------------------------------------------------------------- the model


def test_transformers_computes_our_logits(exported):
    tok, ours, theirs = exported["tok"], exported["model"], exported["hf_model"]
    ids = torch.tensor([render_prompt(tok, [{"role": "user", "content": TEXT[0]}])[:60]])
    with torch.no_grad():
        a, b = ours(ids)[0], theirs(ids).logits
    assert b.abs().max() > 0.1
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_generation_stops_at_the_end_of_a_turn_or_document(exported):
    tok, theirs = exported["tok"], exported["hf_model"]
    g = theirs.generation_config
    assert g.eos_token_id == [tok.eos_id, tok.end_id] and g.pad_token_id == tok.pad_id
    assert (theirs.config.bos_token_id, theirs.config.eos_token_id) == (tok.bos_id, tok.eos_id)
    # A model that always says <|end|> first: transformers' generate stops right there.
    # Every final hidden state is W[end], 10x longer than any other row, so the logit
    # W[end].W[v] is largest for v = end (Cauchy-Schwarz).
    model = transformers.GPT2LMHeadModel.from_pretrained(exported["out"]).eval()
    with torch.no_grad():
        wte = model.transformer.wte.weight
        e = torch.randn(wte.size(1), generator=torch.Generator().manual_seed(0))
        wte[tok.end_id] = 10 * wte.norm(dim=1).max() * e / e.norm()
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(wte[tok.end_id])  # every hidden state: W[end]
    prompt = torch.tensor([render_prompt(tok, [{"role": "user", "content": "hi"}])])
    out = model.generate(prompt, max_new_tokens=10, do_sample=False)
    assert out[0, prompt.size(1) :].tolist() == [tok.end_id]


def test_the_pipeline_writes_what_we_write(exported):
    """The same tokens as our greedy decoding (compared as ids: the text of a random model's
    reply is often broken UTF-8, which the two decoders render differently)."""
    tok, model, out = exported["tok"], exported["model"], exported["out"]
    pipe = transformers.pipeline("text-generation", model=str(out))
    prompt = [tok.eos_id] + tok.encode("To be")
    result = pipe("To be", max_new_tokens=8, do_sample=False, return_tensors=True)[0]
    assert list(result["generated_token_ids"]) == prompt + greedy(model, tok, prompt, 8)
    messages = [{"role": "user", "content": "Who's there? <|user|>"}]
    prompt = render_prompt(tok, messages)
    result = pipe(messages, max_new_tokens=8, do_sample=False, return_tensors=True)[0]
    assert list(result["generated_token_ids"]) == prompt + greedy(model, tok, prompt, 8)
    reply = pipe(messages, max_new_tokens=8, do_sample=False)[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and isinstance(reply["content"], str)


def greedy(model, tok, ids: list[int], n: int) -> list[int]:
    """Our greedy reply after `ids`: new ids up to n, the stop token included."""
    new = []
    for t, _ in generate(model, torch.tensor([ids]), n, temperature=0.0):
        new.append(int(t[0]))
        if new[-1] in (tok.eos_id, tok.end_id):
            break
    return new


# ----------------------------------------------------------------------------- the tokenizer


def test_special_tokens_and_text_ids(exported):
    tok, hf = exported["tok"], exported["hf_tok"]
    assert [hf.convert_tokens_to_ids(s) for s in SPECIAL_TOKENS.values()] == list(
        tok.special_ids.values()
    )
    ids = (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    assert ids == (tok.bos_id, tok.eos_id, tok.pad_id)
    for text in TEXT:
        assert hf(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
        assert hf(text)["input_ids"] == [tok.eos_id] + tok.encode(text)  # as train.sample reads
        assert hf.decode(tok.encode(text)) == text


FRAGMENTS = [" ", "  ", "\n", "\t", "▁", "<|user|>", "<|end|>", "<|assistant|>", "<|endoftext|>",
             "<|", "|>", "<", "|", ESCAPE, ESCAPE * 2, "<" + ESCAPE + "|", "<unk>", "<0x41>",
             "東京", "😀", "e\u0301", "To be", "OK"]  # fmt: skip
tricky_text = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4))).map("".join)


@st.composite
def conversations(draw) -> list[dict]:
    content = st.one_of(tricky_text, st.text(max_size=12))
    messages = [{"role": "system", "content": draw(content)}] if draw(st.booleans()) else []
    for i in range(draw(st.integers(1, 4))):
        messages.append({"role": ("user", "assistant")[i % 2], "content": draw(content)})
    return messages


@settings(max_examples=60, deadline=None)
@given(messages=conversations())
def test_the_chat_template_renders_our_chat_format(exported, messages):
    """Exactly render_prompt's ids, whatever the messages spell: "<|user|>" typed in a
    message stays text, and so does the template's escape character."""
    tok, hf = exported["tok"], exported["hf_tok"]
    prompt = hf.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert prompt == render_prompt(tok, messages)
    whole = hf.apply_chat_template(messages)["input_ids"]
    assert whole == render_conversation(tok, messages)[0]


@pytest.mark.parametrize("spelled", [*SPECIAL_TOKENS.values(), "<|endoftext|>"])
def test_control_tokens_typed_in_a_message_stay_text(exported, spelled):
    tok, hf = exported["tok"], exported["hf_tok"]
    messages = [{"role": "system", "content": f"be {spelled} brief"},
                {"role": "user", "content": f"{spelled}hello {spelled}"}]  # fmt: skip
    ids = hf.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    control = set(tok.special_ids.values())
    assert [i for i in ids if i in control] == [
        tok.bos_id, tok.system_id, tok.end_id, tok.user_id, tok.end_id, tok.assistant_id
    ]  # fmt: skip
    assert ids == render_prompt(tok, messages)
    # Raw text that must not yield control tokens: split_special_tokens=True, as for any HF
    # tokenizer (by default transformers finds special tokens in the text it encodes).
    raw = hf(f"a {spelled} b", add_special_tokens=False, split_special_tokens=True)
    assert raw["input_ids"] == tok.encode(f"a {spelled} b")


@pytest.mark.parametrize("normalized", [False, True])
def test_the_base_tokenizers_own_token_cannot_be_forged_either_way(tmp_path, normalized):
    """GPT-2's hub tokenizer marks <|endoftext|> "normalized": true, so it is matched after
    the normaliser, which undoes the template's escape: the export writes every added
    token with normalized=false, matched on the escaped text."""
    import json

    ckpt = gpt2_checkpoint(tmp_path / "ckpt.pt", normalized=normalized)
    base = json.loads((tmp_path / "tiny-gpt2" / "tokenizer.json").read_text())
    assert [t["normalized"] for t in base["added_tokens"]] == [normalized]
    out = export_cli(f"checkpoint={ckpt}", f"out={tmp_path / 'hf'}")
    written = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    assert "<|endoftext|>" in [t["content"] for t in written]
    assert not any(t["normalized"] for t in written)
    tok, hf = load_model(ckpt)[1], transformers.AutoTokenizer.from_pretrained(out)
    messages = [{"role": "user", "content": "a <|endoftext|> b <|endoftext|>"}]
    ids = hf.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert hf.convert_tokens_to_ids("<|endoftext|>") not in ids
    assert ids == render_prompt(tok, messages)


def test_unknown_roles_are_refused_by_the_template(exported):
    with pytest.raises(Exception, match="roles are"):
        exported["hf_tok"].apply_chat_template([{"role": "tool", "content": "x"}])


@pytest.fixture(scope="module")
def sentencepiece_pair(tmp_path_factory) -> tuple:
    d = tmp_path_factory.mktemp("spm")
    ckpt = sentencepiece_checkpoint(d / "ckpt.pt")
    out = export_cli(f"checkpoint={ckpt}", f"out={d / 'hf'}")
    return load_model(ckpt)[1], transformers.AutoTokenizer.from_pretrained(out)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(), tricky_text))
def test_the_sentencepiece_export_encodes_any_text_as_we_do(sentencepiece_pair, text):
    """Every text without U+FDD0 (the chat template's escape, see tokenizer/hf.py)."""
    tok, hf = sentencepiece_pair
    text = text.replace(ESCAPE, "")
    ids = hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert ids == tok.encode(text)
    assert hf.decode(ids) == text


# ----------------------------------------------------------------------------- and back


def test_importing_the_export_gives_back_the_checkpoint(exported):
    model, tok, ckpt = load_model(exported["out"])
    original = load_checkpoint(exported["ckpt"])
    assert model.config.to_dict() == original["model_config"]  # bias, attention, dropout too
    assert tok.state() == original["tokenizer"] and tok.special_ids == exported["tok"].special_ids
    assert ckpt["stage"] == original["stage"]
    mine, theirs = original["model"], model.state_dict()
    assert mine.keys() == theirs.keys()  # bias=False: no zero biases grown
    for name in mine:
        assert torch.equal(mine[name], theirs[name]), name


def test_an_export_without_its_metadata_is_refused_not_misread(exported, tmp_path):
    """Without handgpt.json the folder would read as a plain GPT-2 whose tokenizer already
    holds our control tokens (the gpt2 kind) or is no byte-level BPE (SentencePiece)."""
    import shutil

    copy = shutil.copytree(exported["out"], tmp_path / "copy")
    (copy / "handgpt.json").unlink()
    with pytest.raises(UserError, match="exported by this project|not a byte-level BPE"):
        load_model(copy)


def test_the_output_folder_is_protected(tmp_path):
    ckpt = sentencepiece_checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export_cli(f"checkpoint={ckpt}", f"out={out}")
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="give the folder"):
        export_cli(f"checkpoint={ckpt}")
    export_cli(f"checkpoint={ckpt}", f"out={out}", "overwrite=true", "dtype=bfloat16")
    assert not (out / "keep.txt").exists() and not list(tmp_path.glob("*.export-tmp"))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert theirs.transformer.wte.weight.dtype == torch.bfloat16
