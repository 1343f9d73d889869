"""Starting from a pretrained GPT-2: its tokenizer as a kind of ours, its weights as a
checkpoint, and every stage on it (SFT, sampling, chat, DPO), offline.

The "pretrained GPT-2" is tests/tiny_hf.py's: a random GPT2LMHeadModel and a byte-level BPE
trained here, saved as a Hugging Face directory. init_from=<that directory> is the same
code path as init_from=gpt2 after the download.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tokenizer
from errors import UserError
from tokenizer import SPECIAL_TOKENS, GPT2BPETokenizer
from tokenizer.chat import render_conversation, render_prompt
from train.core.checkpoint import hf_source, load_checkpoint, load_model

transformers = pytest.importorskip("transformers")
from test_sample_cli import FLOAT32, in_process  # noqa: E402
from tiny_hf import TEXT, byte_bpe, make_gpt2_dir, random_gpt2, save_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return make_gpt2_dir(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="module")
def tok(gpt2_dir) -> GPT2BPETokenizer:
    return GPT2BPETokenizer.from_pretrained(str(gpt2_dir))


def run(module: str, *args: str, stdin: str = "", env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args, "device=cpu", "precision=float32"],
        input=stdin, capture_output=True, text=True, cwd=ROOT, env=env or ENV, timeout=300,
    )  # fmt: skip


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The `error: ...` line of a failed run (transformers may warn on lines before it)."""
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr[-3000:]
    return last


# ----------------------------------------------------------------------------- the tokenizer


def test_control_ids_follow_the_base_vocabulary_padded_to_64(tok):
    base = tok.bpe.get_vocab_size(with_added_tokens=True)
    assert tok.base == base
    assert list(tok.special_ids) == list(SPECIAL_TOKENS)
    assert list(tok.special_ids.values()) == list(range(base, base + len(SPECIAL_TOKENS)))
    assert tok.vocab_size % 64 == 0 and base + len(SPECIAL_TOKENS) <= tok.vocab_size < base + 71
    assert [tok.id_to_piece(i) for i in tok.special_ids.values()] == list(SPECIAL_TOKENS.values())
    assert tok.decode(list(range(base, tok.vocab_size))) == ""  # control and unused ids
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])


FRAGMENTS = [" ", "  ", "\n", "\t", "<|user|>", "<|end|>", "<|endoftext|>", "<|", "|>", "▁",
             "東京", "😀", "e\u0301", "\x00", "To be", " or"]  # fmt: skip
tricky_text = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5))).map("".join)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(), tricky_text))
def test_round_trip_is_lossless_and_never_gives_a_special_id(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    endoftext = tok.bpe.token_to_id("<|endoftext|>")
    assert all(0 <= i < tok.base and i != endoftext for i in ids)
    assert tok.encode_batch([text, text]) == [ids, ids]


@pytest.mark.parametrize("spelled", [*SPECIAL_TOKENS.values(), "<|endoftext|>"])
def test_control_tokens_cannot_be_forged_through_text(gpt2_dir, tok, spelled):
    # transformers' own tokenizer finds its special tokens in text: the hazard is real ...
    hf = transformers.AutoTokenizer.from_pretrained(gpt2_dir)
    if spelled == "<|endoftext|>":
        assert hf.convert_tokens_to_ids(spelled) in hf(f"a {spelled} b")["input_ids"]
    # ... and ours never does: the text stays text, in a message too.
    ids = tok.encode(f"a {spelled} b")
    assert all(i < tok.base for i in ids) and tok.bpe.token_to_id("<|endoftext|>") not in ids
    messages = [{"role": "user", "content": spelled}, {"role": "assistant", "content": spelled}]
    rendered, _ = render_conversation(tok, messages)
    assert [i for i in rendered if i >= tok.base] == [
        tok.bos_id, tok.user_id, tok.end_id, tok.assistant_id, tok.end_id
    ]  # fmt: skip


def test_state_round_trip(tok):
    again = tokenizer.from_state(tok.state())
    assert isinstance(again, GPT2BPETokenizer) and again.special_ids == tok.special_ids
    assert again.encode(TEXT[0]) == tok.encode(TEXT[0])


def test_a_tokenizer_that_is_not_byte_level_bpe_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel({"[UNK]": 0, "to": 1, "be": 2}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(UserError, match="not a byte-level BPE"):
        GPT2BPETokenizer(t.to_str().encode())


# ----------------------------------------------------------------------------- the model


def test_weights_compute_what_transformers_computes(gpt2_dir, tok):
    model, loaded_tok, ckpt = load_model(str(gpt2_dir))
    theirs = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()
    assert loaded_tok.state() == tok.state() and ckpt["stage"] == "huggingface"
    assert model.config.vocab_size == tok.vocab_size and model.config.bias
    idx = torch.tensor([tok.encode(TEXT[0])[:40]])
    with torch.no_grad():
        ours, hf = model(idx)[0], theirs(idx).logits
    assert hf.abs().max() > 0.1
    torch.testing.assert_close(ours[..., : tok.base], hf, rtol=0, atol=1e-4)
    # The new rows (control tokens, padding) are the mean of the old; the head is tied.
    wte = model.embed.wte.weight
    old_mean = theirs.transformer.wte.weight.mean(dim=0)
    torch.testing.assert_close(wte[tok.base :], old_mean.expand(tok.vocab_size - tok.base, -1))
    assert model.lm_head.weight is wte


def test_hf_sources_are_told_from_our_checkpoints(gpt2_dir, tmp_path):
    assert hf_source(gpt2_dir) == str(gpt2_dir)
    assert hf_source("gpt2") == "gpt2" and hf_source("distilgpt2") == "distilgpt2"
    assert hf_source("gpt3") is None  # not a GPT-2 name: no download is tried (hf:gpt3 would)
    assert hf_source("hf:openai-community/gpt2") == "openai-community/gpt2"
    for ours in ("out/pretrain", "ckpt.pt", tmp_path, tmp_path / "missing.pt"):
        assert hf_source(ours) is None, ours
    (tmp_path / "config.json").write_text("{}")  # a run directory of ours with a config.json
    (tmp_path / "ckpt.pt").write_bytes(b"")
    assert hf_source(tmp_path) is None


# ----------------------------------------------------------------------------- the stages


def chats(n: int, seed: int) -> list[dict]:
    """Acknowledge a ticket with exactly "OK"."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        k = int(torch.randint(10000, (1,), generator=g))
        messages = [{"role": "user", "content": f"Please confirm with OK: ticket {k}"},
                    {"role": "assistant", "content": "OK"}]  # fmt: skip
        out.append({"messages": messages})
    return out


@pytest.fixture(scope="module")
def sft_run(gpt2_dir, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("sft")
    (d / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats(300, 1)))
    (d / "test.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats(20, 2)))
    r = run(
        "train.sft", f"init_from={gpt2_dir}", f"out_dir={d / 'run'}", "tasks.weight=0",
        f"files=[{d / 'train.jsonl'}]", f"eval_files=[{d / 'test.jsonl'}]", "batch_size=16",
        "lr=1e-2", "min_lr=1e-3", "warmup_iters=5", "max_iters=60", "max_minutes=null",
        "eval_interval=20", "log_interval=20",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return {"dir": d, "run": d / "run", "stdout": r.stdout}


def held_out_loss(model, tok, conversations: list[dict]) -> float:
    """Mean cross-entropy (nats) over the trained tokens (the replies and their <|end|>)."""
    total, n = 0.0, 0
    for c in conversations:
        ids, mask = render_conversation(tok, c["messages"])
        targets = [t if m else -100 for t, m in zip(ids[1:], mask[1:], strict=True)]
        with torch.no_grad():
            _, loss = model(torch.tensor([ids[:-1]]), torch.tensor([targets]))
        k = sum(mask[1:])
        total, n = total + loss.item() * k, n + k
    return total / n


def test_sft_from_a_pretrained_gpt2_lowers_the_held_out_loss(sft_run, gpt2_dir, tok):
    lines = (sft_run["run"] / "metrics.jsonl").read_text().splitlines()
    val = [json.loads(line)["val_loss"] for line in lines if "val_loss" in line]
    before = held_out_loss(load_model(str(gpt2_dir))[0], tok, chats(20, 2))
    after = held_out_loss(load_model(sft_run["run"])[0], tok, chats(20, 2))
    assert after == pytest.approx(val[-1], rel=1e-3)  # what the run measured
    assert before > 3.0 and after < 0.1, (before, after)
    ckpt = load_checkpoint(sft_run["run"])
    assert ckpt["stage"] == "sft" and ckpt["init_from"] == str(gpt2_dir)
    assert ckpt["tokenizer"] == tok.state()  # the checkpoint is self-contained
    scores = json.loads((sft_run["run"] / "eval.json").read_text())
    base, tuned = scores["base"]["overall"]["accuracy"], scores["sft"]["overall"]["accuracy"]
    assert tuned >= 0.9 and tuned > base, (base, tuned)


def expected_greedy(model, tok, ids: list[int], n: int) -> str:
    from model.generate import generate

    new = []
    for t, _ in generate(model, torch.tensor([ids]), n, temperature=0.0):
        if int(t[0]) in (tok.eos_id, tok.end_id):
            break
        new.append(int(t[0]))
    return tok.decode(new)


def test_sample_from_the_pretrained_directory(gpt2_dir, capsys, monkeypatch):
    code, out, err = in_process(capsys, monkeypatch, f"checkpoint={gpt2_dir}", "prompt=To be",
                                "temperature=0", "max_new_tokens=12", *FLOAT32)  # fmt: skip
    assert code == 0, err
    model, tok, _ = load_model(str(gpt2_dir))
    continuation = expected_greedy(model, tok, [tok.eos_id] + tok.encode("To be"), 12)
    assert continuation and out == "To be" + continuation + "\n"


def test_chat_with_the_fine_tuned_model(sft_run, capsys, monkeypatch):
    run_dir = sft_run["run"]
    question = "Please confirm with OK: ticket 4242"
    code, out, err = in_process(capsys, monkeypatch, f"checkpoint={run_dir}", "mode=chat",
                                "temperature=0", "max_new_tokens=8", *FLOAT32,
                                stdin=question + "\n")  # fmt: skip
    assert code == 0, err
    model, tok, _ = load_model(run_dir)
    prompt = render_prompt(tok, [{"role": "user", "content": question}])
    reply = expected_greedy(model, tok, prompt, 8)
    assert out == f"you> {question}\nassistant> {reply}\n"
    assert reply == "OK"  # what it was fine-tuned to say


def test_dpo_runs_unchanged_on_the_fine_tuned_model(sft_run):
    d = sft_run["dir"]
    prefs = [{"prompt": f"Please confirm with OK: ticket {k}", "chosen": "OK", "rejected": "No"}
             for k in range(40)]  # fmt: skip
    (d / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prefs))
    r = run(
        "train.dpo", f"init_from={sft_run['run']}", f"out_dir={d / 'dpo'}", "tasks.weight=0",
        "preferences.builtin=false", f"files=[{d / 'prefs.jsonl'}]", "batch_size=8",
        "max_iters=4", "max_minutes=null", "eval_interval=4", "warmup_iters=1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = load_checkpoint(d / "dpo")
    assert ckpt["stage"] == "dpo" and ckpt["tokenizer"]["kind"] == "gpt2"


# ----------------------------------------------------------------------------- errors


def test_another_architecture_is_one_line(tmp_path):
    """GPT-2, Llama and Qwen3 are read (tests/test_llama_hf.py for the latter); not GPT-NeoX."""
    transformers.GPTNeoXConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(tmp_path)
    save_tokenizer(byte_bpe(), tmp_path)
    with pytest.raises(UserError, match="expected a GPT-2, Llama or Qwen3 model .* 'gpt_neox'"):
        load_model(str(tmp_path))


def test_pickled_weights_that_would_run_code_are_one_line(gpt2_dir, tmp_path):
    """A Hugging Face folder whose weights are a pickled pytorch_model.bin naming code:
    transformers loads it with weights_only (nothing runs) and fails deep inside; the
    project's own line instead, as for a checkpoint of ours."""
    import shutil

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    folder = shutil.copytree(gpt2_dir, tmp_path / "evil")
    (folder / "model.safetensors").unlink()
    weights = folder / "pytorch_model.bin"
    torch.save({"transformer.wte.weight": torch.zeros(2), "x": Evil()}, weights)
    with pytest.raises(UserError) as e:
        load_model(str(folder))
    assert str(e.value) == (
        f"{weights} is not a safe checkpoint (loading it would run code); it will not be loaded"
    )
    assert not (tmp_path / "pwned").exists()


def test_a_directory_without_a_tokenizer_is_one_line(tmp_path):
    random_gpt2(vocab_size=300).save_pretrained(tmp_path)
    with pytest.raises(UserError, match=f"{tmp_path} has no tokenizer"):
        load_model(str(tmp_path))


def test_a_model_name_without_network_is_one_line(tmp_path):
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}  # no network, empty cache
    r = run("train.sample", "checkpoint=gpt2", "prompt=hi", env=env)
    assert "could not load Hugging Face model 'gpt2'" in one_line_error(r)


def test_without_the_hf_extra_the_error_names_it(gpt2_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(UserError, match=r"pip install -e '\.\[hf\]'"):
        load_model(str(gpt2_dir))
