"""python -m train.sample end to end on a tiny checkpoint built here.

The expected text is computed independently: greedy generation through model/generate.py
on the ids the chat format / document layout prescribes, decoded in one go. A few runs go
through a real subprocess (exit status, no traceback, stdin as a pipe); the rest call the
same entry point in-process through Hydra's compose API and the same error boundary,
which keeps the suite fast.
"""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokenizer
import train.sample as sample_cli
from errors import report_user_errors
from model import GPT, GPTConfig
from model.generate import generate
from tokenizer.chat import render_prompt
from train.core.checkpoint import load_model, save_checkpoint
from train.settings import load

ROOT = Path(__file__).resolve().parents[1]
TEXT = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles.\n",
    "Who's there? Nay, answer me: stand, and unfold yourself. Café, naïve, Ærø.\n",
]
BLOCK_SIZE = 64
FLOAT32 = ("device=cpu", "precision=float32")


def build_checkpoint(path: Path, tok, vocab_size: int | None = None, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = GPTConfig(
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=BLOCK_SIZE,
        vocab_size=vocab_size or tok.vocab_size,
    )
    model = GPT(config)
    with torch.no_grad():  # larger random weights: replies vary with the prompt
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    state = {
        "stage": "test",
        "model_config": config.to_dict(),
        "model": model.state_dict(),
        "tokenizer": tok.state(),
        "step": 0,
    }
    save_checkpoint(path, state)
    return path


@pytest.fixture(scope="module")
def tok():
    return tokenizer.train_tokenizer(TEXT * 10, vocab_size=360)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("run") / "ckpt.pt", tok)


def expected_greedy(ckpt: Path, ids: list[int], max_new_tokens: int) -> str:
    """What greedy decoding after `ids` should print, computed without the CLI."""
    model, tok, _ = load_model(ckpt)
    idx = torch.tensor([ids])
    new = []
    for t, _ in generate(model, idx, max_new_tokens, temperature=0.0):
        if int(t[0]) in (tok.eos_id, tok.end_id):
            break
        new.append(int(t[0]))
    return tok.decode(new)


def cli(*overrides: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny model: threads only cost time
    return subprocess.run(
        [sys.executable, "-m", "train.sample", *overrides],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )


def in_process(capsys, monkeypatch, *overrides: str, stdin: str = "") -> tuple[int, str, str]:
    """The entry point without a new interpreter: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        report_user_errors(lambda: sample_cli.run(load("sample", overrides)))()
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code: int, err: str, *words: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


# ----------------------------------------------------------------------------- subprocess


def test_cli_streams_the_greedy_continuation(ckpt, tok):
    r = cli(f"checkpoint={ckpt}", "prompt=To be", "temperature=0", "max_new_tokens=24", *FLOAT32)
    assert r.returncode == 0, r.stderr
    continuation = expected_greedy(ckpt, [tok.eos_id] + tok.encode("To be"), 24)
    assert continuation  # the test checks something
    assert r.stdout == "To be" + continuation + "\n"
    assert "Traceback" not in r.stderr


def test_chat_over_a_pipe_with_reset_and_exit(ckpt, tok):
    stdin = "Hello there\n\n/reset\nWho is Hamlet?\n/exit\nnever read\n"
    r = cli(f"checkpoint={ckpt}", "mode=chat", "temperature=0", "max_new_tokens=12", *FLOAT32,
            stdin=stdin)  # fmt: skip
    assert r.returncode == 0, r.stderr
    first = expected_greedy(
        ckpt, render_prompt(tok, [{"role": "user", "content": "Hello there"}]), 12
    )
    # after /reset the history is empty again: the second reply sees only its own question
    second = expected_greedy(
        ckpt, render_prompt(tok, [{"role": "user", "content": "Who is Hamlet?"}]), 12
    )
    assert r.stdout == (  # a reply's leading space is not printed after "assistant> "
        f"you> Hello there\nassistant> {first.lstrip()}\nyou> Who is Hamlet?\n"
        f"assistant> {second.lstrip()}\n"
    )
    assert "reset" in r.stderr
    assert sample_cli.render_prompt is render_prompt  # the chat format SFT trains with


def test_bad_checkpoints_give_one_line_errors(tmp_path, capsys, monkeypatch):
    r = cli(f"checkpoint={tmp_path / 'missing.pt'}", "prompt=hi")
    assert_one_line_error(r.returncode, r.stderr, "missing.pt", "does not exist")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint" * 10)
    code, _, err = in_process(capsys, monkeypatch, f"checkpoint={corrupt}", "prompt=hi")
    assert_one_line_error(code, err, "corrupt")
    code, _, err = in_process(capsys, monkeypatch, f"checkpoint={tmp_path}", "prompt=hi")
    assert_one_line_error(code, err, "no checkpoint in")  # a directory without one


# ----------------------------------------------------------------------------- in process


def test_same_seed_same_text_and_another_seed_another(ckpt, capsys, monkeypatch):
    args = (f"checkpoint={ckpt}", "prompt=The slings", "temperature=1.0", "max_new_tokens=30")
    runs = [in_process(capsys, monkeypatch, *args, *FLOAT32, f"seed={s}") for s in (3, 3, 4)]
    assert all(code == 0 for code, _, _ in runs)
    assert runs[0][1] == runs[1][1]
    assert runs[0][1] != runs[2][1]


def test_num_samples_prompt_from_stdin_and_from_a_file(ckpt, tok, capsys, monkeypatch, tmp_path):
    expected = "Whether" + expected_greedy(ckpt, [tok.eos_id] + tok.encode("Whether"), 10) + "\n"
    base = (f"checkpoint={ckpt}", "temperature=0", "max_new_tokens=10", *FLOAT32)
    code, out, _ = in_process(capsys, monkeypatch, *base, "prompt=-", stdin="Whether")
    assert code == 0 and out == expected
    (tmp_path / "p.txt").write_text("Whether", encoding="utf-8")
    code, out, _ = in_process(capsys, monkeypatch, *base, f"prompt_file={tmp_path / 'p.txt'}")
    assert code == 0 and out == expected
    code, out, _ = in_process(capsys, monkeypatch, *base, "prompt=Whether", "num_samples=3")
    assert code == 0
    assert out.count("---------- sample") == 3 and out.count(expected) == 3


def test_without_a_prompt_a_fresh_document_and_cache_off_agrees(ckpt, tok, capsys, monkeypatch):
    base = (f"checkpoint={ckpt}", "temperature=0", "max_new_tokens=15", *FLOAT32)
    code, out, _ = in_process(capsys, monkeypatch, *base)
    assert code == 0 and out == expected_greedy(ckpt, [tok.eos_id], 15) + "\n"
    code, uncached, _ = in_process(capsys, monkeypatch, *base, "use_cache=false")
    assert code == 0 and uncached == out


def test_a_prompt_longer_than_the_context_is_cropped_with_a_warning(ckpt, capsys, monkeypatch):
    long_prompt = "To be, or not to be " * 40  # far more than 64 tokens
    code, out, err = in_process(
        capsys, monkeypatch, f"checkpoint={ckpt}", f"prompt='{long_prompt}'", "max_new_tokens=5"
    )
    assert code == 0
    assert "warning:" in err and "keeping its last 64 tokens" in err
    assert out.startswith(long_prompt)


def test_chat_drops_the_oldest_turns_when_the_context_is_full(ckpt, capsys, monkeypatch):
    messages = "".join(f"Tell me about the sea of troubles, part {i}\n" for i in range(8))
    code, out, err = in_process(
        capsys,
        monkeypatch,
        f"checkpoint={ckpt}",
        "mode=chat",
        "max_new_tokens=8",
        *FLOAT32,
        stdin=messages,
    )
    assert code == 0, err
    assert out.count("assistant> ") == 8
    assert "dropped" in err


def test_the_newest_checkpoint_is_the_default(tmp_path, tok):
    old = build_checkpoint(tmp_path / "a" / "ckpt.pt", tok)
    new = build_checkpoint(tmp_path / "b" / "ckpt.pt", tok)
    os.utime(old, (2e9, 2e9))  # make "a" the newest
    assert sample_cli.find_checkpoint(None, tmp_path) == str(old)
    os.utime(new, (3e9, 3e9))
    assert sample_cli.find_checkpoint(None, tmp_path) == str(new)
    assert sample_cli.find_checkpoint("given.pt", tmp_path) == "given.pt"
    with pytest.raises(sample_cli.UserError, match="no checkpoint found"):
        sample_cli.find_checkpoint(None, tmp_path / "empty")


def test_a_tokenizer_that_does_not_match_the_checkpoint(tmp_path, tok, capsys, monkeypatch):
    other = build_checkpoint(tmp_path / "other.pt", tok, vocab_size=tok.vocab_size + 20)
    code, _, err = in_process(capsys, monkeypatch, f"checkpoint={other}", "prompt=hi")
    assert_one_line_error(code, err, "tokenizer", "does not match")
    broken = torch.load(other, weights_only=True)
    broken["tokenizer"] = {"kind": "sentencepiece", "model": b"not a model"}
    save_checkpoint(tmp_path / "broken.pt", {k: v for k, v in broken.items() if k != "format"})
    code, _, err = in_process(capsys, monkeypatch, f"checkpoint={tmp_path / 'broken.pt'}")
    assert_one_line_error(code, err, "tokenizer")


@pytest.mark.parametrize(
    ("override", "stdin", "words"),
    [
        ("prompt=", "", ("empty",)),
        ("prompt=-", "  \n", ("empty", "stdin")),
        ("prompt_file=MISSING.txt", "", ("does not exist",)),
        ("top_p=0", "", ("top_p",)),
        ("top_p=1.5", "", ("top_p",)),
        ("temperature=-0.5", "", ("temperature",)),
        ("num_samples=0", "", ("num_samples",)),
        ("max_new_tokens=0", "", ("max_new_tokens",)),
        ("top_k=many", "", ("top_k",)),
        ("mode=poem", "", ("mode",)),
    ],
)
def test_bad_settings_give_one_line_errors(ckpt, capsys, monkeypatch, override, stdin, words):
    prompt = () if override.startswith("prompt") else ("prompt=hi",)
    code, out, err = in_process(
        capsys, monkeypatch, f"checkpoint={ckpt}", *prompt, override, *FLOAT32, stdin=stdin
    )
    assert_one_line_error(code, err, *words)
    assert out == ""


def test_an_empty_prompt_file(ckpt, capsys, monkeypatch, tmp_path):
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    code, _, err = in_process(
        capsys, monkeypatch, f"checkpoint={ckpt}", f"prompt_file={tmp_path / 'empty.txt'}"
    )
    assert_one_line_error(code, err, "empty")


def test_text_stream_never_splits_a_character(tok):
    text = "Ærø 日本語 ok"  # 日本語 is not in the training text: byte tokens
    ids = tok.encode(text)
    assert len(ids) > len(text)  # some characters did arrive as several byte tokens
    stream = sample_cli.TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_a_reply_is_shown_without_its_leading_space_and_kept_with_it(tok):
    ids = tok.encode(" To be, or not")
    stream = sample_cli.TextStream(tok, lstrip=True)
    shown = "".join([stream.push(i) for i in ids] + [stream.flush()])
    assert shown == "To be, or not" and tok.decode(stream.ids) == " To be, or not"
    stream = sample_cli.TextStream(tok, lstrip=True)  # spaces over several tokens
    ids = tok.encode(" ") + tok.encode("  To be")
    shown = "".join([stream.push(i) for i in ids] + [stream.flush()])
    assert shown == "To be" and tok.decode(stream.ids) == "   To be"


def fake_completions(replies: list[list[int]], interrupt_at: dict[int, int], prompts: list):
    """A stand-in for model/generate.py's completions: call k streams replies[k] token by
    token and raises KeyboardInterrupt (Ctrl-C) after interrupt_at[k] tokens."""
    from types import SimpleNamespace

    def completions(model, prompt_ids, *args, **kwargs):
        k = len(prompts)
        prompts.append(list(prompt_ids[0]))
        for n in range(1, len(replies[k]) + 1):
            if n - 1 == interrupt_at.get(k):
                raise KeyboardInterrupt
            done = replies[k][:n]
            yield (SimpleNamespace(stopped=False, tokens=done, text_tokens=done),)

    return completions


def test_ctrl_c_stops_a_reply_keeps_its_start_and_the_chat_goes_on(ckpt, tok, capsys, monkeypatch):
    replies = [tok.encode(" Nay, answer me"), tok.encode(" Long live the king")]
    prompts: list = []
    monkeypatch.setattr(sample_cli, "completions", fake_completions(replies, {0: 2}, prompts))
    code, out, err = in_process(capsys, monkeypatch, f"checkpoint={ckpt}", "mode=chat",
                                *FLOAT32, stdin="Who's there?\nAgain?\n")  # fmt: skip
    assert code == 0, err
    partial = tok.decode(replies[0][:2])
    assert out == (f"you> Who's there?\nassistant> {partial.lstrip()}\n"
                   f"you> Again?\nassistant> Long live the king\n")  # fmt: skip
    assert "(reply stopped" in err
    history = [
        {"role": "user", "content": "Who's there?"},
        {"role": "assistant", "content": partial},
        {"role": "user", "content": "Again?"},
    ]
    assert prompts[1] == render_prompt(tok, history)  # what was shown stays in the history


def test_ctrl_c_at_the_prompt_quits(ckpt, capsys, monkeypatch):
    def pressed(prompt=""):
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", pressed)
    with pytest.raises(KeyboardInterrupt):
        next(sample_cli.user_messages(interactive=True))

    class CtrlC(io.StringIO):
        def __iter__(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(sys, "stdin", CtrlC())
    cfg = load("sample", [f"checkpoint={ckpt}", "mode=chat", *FLOAT32])
    with pytest.raises(SystemExit) as e:
        report_user_errors(sample_cli.run)(cfg)
    assert e.value.code == 130 and "interrupted" in capsys.readouterr().err


def test_context_shows_what_the_conversation_uses(ckpt, tok, capsys, monkeypatch):
    replies = [tok.encode(" Nay, answer me")]
    monkeypatch.setattr(sample_cli, "completions", fake_completions(replies, {}, []))
    code, _, err = in_process(capsys, monkeypatch, f"checkpoint={ckpt}", "mode=chat",
                              "max_new_tokens=20", "system=Be brief.", *FLOAT32,
                              stdin="Who's there?\n/context\n")  # fmt: skip
    assert code == 0, err
    history = [{"role": "system", "content": "Be brief."},
               {"role": "user", "content": "Who's there?"},
               {"role": "assistant", "content": tok.decode(replies[0])}]  # fmt: skip
    used, budget = len(render_prompt(tok, history)), BLOCK_SIZE - 20
    assert (f"the conversation (1 question(s)) uses {used} of {BLOCK_SIZE} tokens; up to "
            f"{budget} are kept for it") in err  # fmt: skip
    assert f"so {budget - used} are left; a reply may be 20 tokens" in err


def test_help_and_unknown_commands_list_the_commands_and_reach_no_model(
    ckpt, tok, capsys, monkeypatch
):
    replies = [tok.encode(" Nay")]
    prompts: list = []
    monkeypatch.setattr(sample_cli, "completions", fake_completions(replies, {}, prompts))
    code, out, err = in_process(capsys, monkeypatch, f"checkpoint={ckpt}", "mode=chat",
                                *FLOAT32, stdin="/help\n/contxt\nWho's there?\n")  # fmt: skip
    assert code == 0, err
    assert out == "you> Who's there?\nassistant> Nay\n"  # the one message sent
    assert prompts == [render_prompt(tok, [{"role": "user", "content": "Who's there?"}])]
    assert "unknown command /contxt" in err
    for command in ("/help", "/reset", "/context", "/exit"):
        assert err.count(command) >= 2, command  # listed for /help and for /contxt


def test_context_never_says_a_negative_number_is_left(ckpt, tok, capsys, monkeypatch):
    """A question longer than the room kept for the conversation: nothing is left, and
    the oldest turns (or the question's start) go at the next reply."""
    replies = [tok.encode(" Nay")]
    monkeypatch.setattr(sample_cli, "completions", fake_completions(replies, {}, []))
    question = "To be, or not to be, that is the question " * 4
    code, _, err = in_process(capsys, monkeypatch, f"checkpoint={ckpt}", "mode=chat",
                              "max_new_tokens=20", *FLOAT32,
                              stdin=f"{question}\n/context\n")  # fmt: skip
    assert code == 0, err
    history = [{"role": "user", "content": question.strip()},
               {"role": "assistant", "content": tok.decode(replies[0])}]  # fmt: skip
    used, budget = len(render_prompt(tok, history)), BLOCK_SIZE - 20
    assert used > budget  # the case this test is about
    assert f"uses {used} of {BLOCK_SIZE} tokens" in err and "so 0 are left" in err
    assert not re.search(r"so -\d+ are left", err)
