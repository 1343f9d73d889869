"""python -m train.serve: the official openai client, raw HTTP and many clients at once,
against live servers on tiny checkpoints (tests/live_server.py).

Every expected reply is computed without the server: the conversation cut and decoded
greedily, alone, by model/generate.py (live_server.expected), or the terminal chat's own
output for the same conversation.
"""

import asyncio
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from live_server import BLOCK, ROOT, TEXT, Live, chat_checkpoint, expected, live_server
from openai import AsyncOpenAI, OpenAI

import tokenizer
import train.sample as sample_cli
import train.serve as serve_cli
from errors import report_user_errors
from model import GPTConfig
from model.heads import ScalarModel
from tokenizer.chat import render_prompt
from train import export
from train.core.checkpoint import load_checkpoint, load_model, save_checkpoint
from train.settings import load

QUESTIONS = [
    "Who is Hamlet?",
    "To be, or not to be",
    "Stand, and unfold yourself.",
    "What of the sea of troubles?",
    "Whether 'tis nobler",
    "Café, naïve, Ærø.",
    "The slings and arrows",
    "Nay, answer me",
]


@pytest.fixture(scope="module")
def tok():
    return tokenizer.train_tokenizer(TEXT * 10, vocab_size=360)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("runs") / "sft" / "ckpt.pt"
    chat_checkpoint(path, tok)
    return path


@pytest.fixture(scope="module")
def model(ckpt):
    return load_model(ckpt)[0]


@pytest.fixture(scope="module")
def live(ckpt):
    with live_server(ckpt, "max_tokens=100") as server:
        yield server


def client(live) -> OpenAI:
    return OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=60)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ----------------------------------------------------------------------------- the client


def test_plain_replies_are_the_greedy_replies_with_their_usage(live, model, tok):
    finishes = set()
    for question in QUESTIONS:
        want = expected(model, tok, user(question), 40)
        r = client(live).chat.completions.create(
            model="sft", messages=user(question), temperature=0, max_tokens=40
        )
        assert r.object == "chat.completion" and r.model == "sft" and isinstance(r.created, int)
        (choice,) = r.choices
        assert choice.message.role == "assistant" and choice.message.content == want["text"]
        assert choice.finish_reason == want["finish"]
        assert r.usage.prompt_tokens == want["prompt_tokens"]
        assert r.usage.prompt_tokens == len(render_prompt(tok, user(question)))
        assert r.usage.completion_tokens == want["completion_tokens"]
        assert r.usage.total_tokens == want["prompt_tokens"] + want["completion_tokens"]
        finishes.add(choice.finish_reason)
    assert finishes == {"stop", "length"}  # the end of a turn, and the budget


def test_a_streamed_reply_arrives_in_chunks_with_the_usage_last(live, model, tok):
    question = next(q for q in QUESTIONS if expected(model, tok, user(q), 30)["finish"] == "length")
    want = expected(model, tok, user(question), 30)
    stream = client(live).chat.completions.create(
        model="sft",
        messages=user(question),
        temperature=0,
        max_tokens=30,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    first, *middle, finish, last = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(c.choices[0].finish_reason is None for c in [first, *middle])
    assert len(middle) > 1  # token by token, not all at once
    assert "".join(c.choices[0].delta.content for c in middle) == want["text"]
    assert finish.choices[0].finish_reason == "length"
    assert not finish.choices[0].delta.content
    assert all(c.usage is None for c in chunks[:-1])
    assert last.choices == [] and last.usage.completion_tokens == want["completion_tokens"]
    assert last.usage.prompt_tokens == want["prompt_tokens"]


def test_ignore_eos_writes_max_tokens(live, model, tok):
    question = next(q for q in QUESTIONS if expected(model, tok, user(q), 30)["finish"] == "stop")
    r = client(live).chat.completions.create(
        model="sft",
        messages=user(question),
        temperature=0,
        max_tokens=30,
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 30
    assert r.choices[0].message.content.startswith(expected(model, tok, user(question), 30)["text"])


def test_greedy_replies_equal_the_terminal_chats(live, ckpt, capsys, monkeypatch):
    """Two turns through train.sample mode=chat and through the API; the API's client
    sends the first reply back exactly as it came."""
    questions = ["Who is Hamlet?", "Whether 'tis nobler"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(questions) + "\n"))
    cfg = load("sample", [f"checkpoint={ckpt}", "mode=chat", "temperature=0",
                          "max_new_tokens=20", "device=cpu", "precision=float32"])  # fmt: skip
    sample_cli.run(cfg)
    printed = [
        line.removeprefix("assistant> ")
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("assistant> ")
    ]
    assert len(printed) == 2
    history = []
    for question, terminal in zip(questions, printed, strict=True):
        history += user(question)
        r = client(live).chat.completions.create(
            model="sft", messages=history, temperature=0, max_tokens=20
        )
        reply = r.choices[0].message.content
        assert reply.lstrip() == terminal  # the terminal shows it without its leading space
        history.append({"role": "assistant", "content": reply})


def test_n_choices_and_a_seed_give_the_same_replies_twice(live):
    ask = dict(model="sft", messages=user("To be, or not to be"), temperature=1.0, max_tokens=20)
    a = client(live).chat.completions.create(n=3, seed=7, **ask)
    b = client(live).chat.completions.create(n=3, seed=7, **ask)
    one = client(live).chat.completions.create(seed=7, **ask)
    other = client(live).chat.completions.create(n=3, seed=8, **ask)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) == 3  # each choice draws its own tokens
    assert one.choices[0].message.content == texts[0]  # choice i draws from seed + i
    assert texts != [c.message.content for c in other.choices]
    assert 3 <= a.usage.completion_tokens <= 3 * 20  # every choice counts


def test_streamed_choices_interleave_by_index(live, model, tok):
    stream = client(live).chat.completions.create(
        model="sft",
        messages=user("Nay, answer me"),
        temperature=0.0,
        max_tokens=15,
        n=2,
        stream=True,
    )
    texts, finishes, order = ["", ""], [None, None], []
    for chunk in stream:
        (choice,) = chunk.choices
        order.append(choice.index)
        texts[choice.index] += choice.delta.content or ""
        finishes[choice.index] = choice.finish_reason or finishes[choice.index]
    want = expected(model, tok, user("Nay, answer me"), 15)
    assert texts == [want["text"]] * 2 and finishes == [want["finish"]] * 2
    assert order[:2] == [0, 1] and 0 in order[2:] and 1 in order[2:]


def test_a_stop_string_ends_the_reply_before_it(live, model, tok):
    question = "Who is Hamlet?"
    full = expected(model, tok, user(question), 40)["text"]
    stop = full[5:8]
    assert len(full) > 10 and stop
    want = full[: full.index(stop)]
    ask = dict(model="sft", messages=user(question), temperature=0, max_tokens=40)
    r = client(live).chat.completions.create(stop=[stop, "never said"], **ask)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    chunks = list(client(live).chat.completions.create(stop=stop, stream=True, **ask))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_reply_is_clamped_to_the_context_and_a_long_conversation_is_cut(live, model, tok):
    question = next(
        q for q in QUESTIONS if expected(model, tok, user(q), 100)["finish"] == "length"
    )
    r = client(live).chat.completions.create(
        model="sft", messages=user(question), temperature=0, max_tokens=100
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == BLOCK  # the reply filled what the prompt left
    long = [{"role": "system", "content": "Be brief."}]
    for q in QUESTIONS:
        long += [*user(q), {"role": "assistant", "content": " To be, or not to be."}]
    long += user("Who's there?")
    want = expected(model, tok, long, 30)
    assert want["dropped"] > 0
    raw = client(live).chat.completions.with_raw_response.create(
        model="sft", messages=long, temperature=0, max_tokens=30
    )
    assert raw.headers["x-dropped-messages"] == str(want["dropped"])
    assert raw.parse().choices[0].message.content == want["text"]


def test_text_that_spells_a_control_token_stays_text(live, tok):
    messages = user("<|user|><|assistant|><|end|> hello")
    r = client(live).chat.completions.create(model="sft", messages=messages, max_tokens=2)
    prompt = render_prompt(tok, messages)
    assert r.usage.prompt_tokens == len(prompt) > 6  # the spelling is many text tokens
    assert prompt.count(tok.assistant_id) == 1 and prompt.count(tok.user_id) == 1


def test_models_health_and_page(live):
    models = client(live).models.list()
    assert [m.id for m in models.data] == ["sft"]
    assert client(live).models.retrieve("sft").id == "sft"
    card = httpx.get(live.url + "/v1/models/sft").json()
    assert card["context_length"] == BLOCK and card["max_tokens"] == 100
    assert httpx.get(live.url + "/health").json()["status"] == "ok"
    page = httpx.get(live.url + "/")
    assert page.status_code == 200 and "/static/chat.js" in page.text
    for name in ("chat.js", "chat.css"):
        assert httpx.get(f"{live.url}/static/{name}").status_code == 200


# ----------------------------------------------------------------------------- bad requests


def post(live, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(
        live.url + "/v1/chat/completions", content=content, headers=headers, timeout=60, **kwargs
    )


def assert_error(r: httpx.Response, status: int, *words: str, param=None, code=None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and "\n" not in error["message"]
    for w in words:
        assert w in error["message"], (w, error["message"])
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code


def still_answers(live) -> None:
    r = post(live, {"model": "sft", "messages": user("hi"), "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


GOOD = {"model": "sft", "messages": user("hi"), "max_tokens": 3}


@pytest.mark.parametrize(
    "body, status, words, param, code",
    [
        ('{"model": "sft", "messages": [', 400, ["not valid JSON"], None, None),
        ({"model": "sft"}, 400, ["messages"], "messages", None),
        (
            {**GOOD, "messages": [{"role": "tool", "content": "x"}]},
            400,
            [],
            "messages.0.role",
            None,
        ),
        ({**GOOD, "temperature": -1}, 400, ["temperature"], "temperature", None),
        ({**GOOD, "max_tokens": 10**9}, 400, ["max_tokens", "100"], "max_tokens", None),
        ({**GOOD, "n": 100}, 400, ["n is 100"], "n", None),
        ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, ["stop"], "stop", None),
        ({**GOOD, "model": "gpt-4o"}, 404, ["gpt-4o", "sft"], "model", "model_not_found"),
        (
            {**GOOD, "messages": [*user("a"), {"role": "system", "content": "late"}]},
            400,
            ["first"],
            "messages.1.role",
            None,
        ),
        (
            {**GOOD, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            [],
            None,
            None,
        ),
        (
            {**GOOD, "messages": user("to be or not " * 60)},
            400,
            ["context"],
            "messages",
            "context_length_exceeded",
        ),
    ],
)
def test_bad_requests_get_an_openai_error_and_the_server_goes_on(
    live, body, status, words, param, code
):
    assert_error(post(live, body), status, *words, param=param, code=code)
    still_answers(live)


def test_a_body_too_large_and_unknown_routes(live):
    huge = json.dumps({**GOOD, "messages": user("x" * 10_000_000)})
    assert_error(post(live, huge), 413)
    still_answers(live)
    assert_error(httpx.get(live.url + "/v1/nothing"), 404)
    assert_error(httpx.get(live.url + "/v1/chat/completions"), 405)
    still_answers(live)


def test_content_as_text_parts_and_unknown_fields(live, model, tok):
    parts = [{"type": "text", "text": "Who is "}, {"type": "text", "text": "Hamlet?"}]
    body = {
        **GOOD,
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": parts, "name": "x"},
        ],
        "temperature": 0,
        "max_tokens": 10,
        "logit_bias": {},
        "user": "u",
    }
    r = post(live, body)
    assert r.status_code == 200, r.text
    messages = [{"role": "system", "content": "Be brief."}, *user("Who is Hamlet?")]
    assert (
        r.json()["choices"][0]["message"]["content"] == expected(model, tok, messages, 10)["text"]
    )


def test_an_api_key_is_asked_for_when_set(ckpt):
    with live_server(ckpt, "api_key=s3cret") as live:
        assert_error(post(live, GOOD), 401, "API key", code="invalid_api_key")
        assert_error(post(live, GOOD, headers={"authorization": "Bearer wrong"}), 401)
        latin = {"authorization": "Bearer s3cr\xe9t".encode("latin-1")}
        assert_error(post(live, GOOD, headers=latin), 401)
        assert httpx.get(live.url + "/health").status_code == 200  # no key: health only
        assert_error(httpx.get(live.url + "/v1/models"), 401)
        ok = OpenAI(base_url=live.url + "/v1", api_key="s3cret", max_retries=0)
        assert ok.chat.completions.create(**GOOD).usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0).models.list()


# ----------------------------------------------------------------------------- many at once


def test_32_concurrent_streams_each_get_their_own_reply(ckpt, model, tok):
    questions = [f"{q} {i}" for i, q in enumerate(QUESTIONS * 4)]
    wants = [expected(model, tok, user(q), 24) for q in questions]
    with live_server(ckpt, "max_batch=16", "max_queue=32") as live:
        sizes = []
        step = live.engine.batch.step

        def counted_step():
            sizes.append(len(live.engine.batch))
            return step()

        live.engine.batch.step = counted_step

        async def one(c: AsyncOpenAI, q: str) -> str:
            stream = await c.chat.completions.create(
                model="sft", messages=user(q), temperature=0, max_tokens=24, stream=True
            )
            return "".join([chunk.choices[0].delta.content or "" async for chunk in stream])

        async def all_of_them() -> list[str]:
            c = AsyncOpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0, timeout=120)
            return await asyncio.gather(*(one(c, q) for q in questions))

        replies = asyncio.run(all_of_them())
    assert replies == [w["text"] for w in wants]
    assert max(sizes) == 16  # decoded together, up to max_batch rows


def test_a_full_queue_is_answered_429_and_a_disconnect_frees_the_place(ckpt, tok):
    """max_batch=1, max_queue=1, slow steps: one reply decodes, one waits, a third is
    refused; the first client goes away mid-reply, and its place goes to the waiting one."""
    slow_ckpt = ckpt.parent.parent / "never_ends" / "ckpt.pt"
    chat_checkpoint(slow_ckpt, tok, end_weight=0.0)  # its greedy replies never end
    ask = {"model": "never_ends", "messages": user("hi"), "temperature": 0, "max_tokens": 50}
    result: list[httpx.Response] = []
    with live_server(slow_ckpt, "max_batch=1", "max_queue=1", "max_n=1") as live:
        live.slow_down(0.05)  # 50 tokens: 2.5 s
        with httpx.Client(timeout=60) as first:
            with first.stream(
                "POST", live.url + "/v1/chat/completions", json={**ask, "stream": True}
            ) as r:
                lines = r.iter_lines()  # kept: a generator dropped early closes the response
                while '"content":"' not in (line := next(lines)) or '"content":""' in line:
                    pass  # up to the first words of the reply
                waiting = threading.Thread(target=lambda: result.append(post(live, ask)))
                waiting.start()
                deadline = time.monotonic() + 10
                while live.engine.load()["waiting"] != 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
                third = OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0)
                with pytest.raises(openai.RateLimitError) as refused:
                    third.chat.completions.create(**ask)
                (row,) = live.engine.batch.rows
            # the first client has gone away, mid-reply
        waiting.join(timeout=60)
        # a plain (not streamed) request whose client gives up is cancelled too
        leaving = threading.Thread(target=lambda: gives_up(live, ask))
        leaving.start()
        (plain,) = wait_until(lambda: live.engine.batch.rows)
        leaving.join()
        wait_until(lambda: plain.finish)
    assert plain.finish == "cancelled" and len(plain.tokens) < 50
    assert refused.value.response.headers["retry-after"] == "1"
    assert refused.value.response.json()["error"]["code"] == "rate_limit_exceeded"
    assert row.finish == "cancelled" and len(row.tokens) < 50
    assert result and result[0].status_code == 200
    assert result[0].json()["usage"]["completion_tokens"] == 50


def wait_until(condition, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
    return value


def gives_up(live, body: dict) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live.url + "/v1/chat/completions", json=body, timeout=0.5)


def test_an_engine_failure_mid_stream_is_an_error_event(live):
    batch, calls = live.engine.batch, []
    step = batch.step

    def failing():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the device went away")
        return step()

    batch.step = failing
    stream = client(live).chat.completions.create(
        model="sft",
        messages=user("To be"),
        max_tokens=20,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    with pytest.raises(openai.APIError, match="the model failed"):
        for _ in stream:
            pass
    assert live.engine.batch is not batch  # a fresh batch for what comes next
    still_answers(live)


# ----------------------------------------------------------------------------- the command


def run_serve(capsys, *overrides: str) -> tuple[int, str]:
    try:
        report_user_errors(
            lambda: serve_cli.run(load("serve", ["device=cpu", "api_key=null", *overrides]))
        )()
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def test_reward_and_base_models_are_refused_in_one_line(tmp_path, tok, capsys):
    config = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=tok.vocab_size)
    state = {"model_config": config.to_dict(), "tokenizer": tok.state()}
    rm = ScalarModel(config)
    save_checkpoint(
        tmp_path / "rm.pt",
        {**state, "stage": "reward", "model_kind": "reward", "model": rm.state_dict()},
    )
    save_checkpoint(
        tmp_path / "base.pt", {**state, "stage": "pretrain", "model": rm.gpt.state_dict()}
    )
    for name, words in [("rm.pt", "reward model"), ("base.pt", "base model")]:
        code, err = run_serve(capsys, f"checkpoint={tmp_path / name}", "port=0")
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, err
    code, err = run_serve(capsys, f"checkpoint={tmp_path / 'rm.pt'}", "host=0.0.0.0")
    assert code == 2 and "api_key" in err  # refused before anything is loaded
    code, err = run_serve(capsys, "checkpoint=x", "max_batch=0")
    assert code == 2 and "max_batch" in err


def test_a_fine_tuned_gpt2_directory_is_served_and_gpt2_itself_refused(tmp_path, capsys):
    pytest.importorskip("transformers")
    from tiny_hf import make_gpt2_dir

    plain = make_gpt2_dir(tmp_path / "gpt2-plain", seed=3)
    code, err = run_serve(capsys, f"checkpoint={plain}", "port=0")
    assert code == 2 and "base model" in err and "huggingface" in err
    ckpt = load_checkpoint(plain)  # as SFT would write it after init_from=gpt2 ...
    state = {k: v for k, v in ckpt.items() if k not in ("path", "huggingface")}
    save_checkpoint(tmp_path / "sft" / "ckpt.pt", {**state, "stage": "sft"})
    cfg = load("export", [f"checkpoint={tmp_path / 'sft'}", f"out={tmp_path / 'my-model'}"])
    out = export.run(cfg)  # ... and train.export wrote it for transformers
    model, tok, _ = load_model(tmp_path / "sft")
    with live_server(out) as live:
        r = client(live).chat.completions.create(
            model="my-model", messages=user("Hello there"), temperature=0, max_tokens=8
        )
    want = expected(model, tok, user("Hello there"), 8)
    assert r.choices[0].message.content == want["text"] and r.usage.completion_tokens >= 1


@pytest.mark.slow
def test_the_command_serves_until_ctrl_c(ckpt):
    """python -m train.serve in its own process: it says where it listens, answers, and
    Ctrl-C stops it cleanly (the engine's thread too)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "train.serve", f"checkpoint={ckpt}", "port=0", "device=cpu"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not (
            match := re.search(r"at (http://\S+)/ \(chat page\)", lines[-1] if lines else "")
        ):
            line = proc.stderr.readline()
            assert line, "".join(lines)  # it exited before saying where it listens
            lines.append(line)
        url = match.group(1)
        assert httpx.get(url + "/health").json()["model"] == "sft"
        assert post(Live(url, None, None), GOOD).status_code == 200
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130  # the project's exit status for Ctrl-C
        err = proc.stderr.read()
        assert "Traceback" not in err and "interrupted" in err
    finally:
        proc.kill()
        proc.wait()


def test_the_socket_says_it_is_tcp():
    """So that asyncio sets TCP_NODELAY on its connections (train/serve.py: bind)."""
    sock = serve_cli.bind("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
    finally:
        sock.close()


def test_a_port_in_use_is_one_line(ckpt, capsys):
    with live_server(ckpt) as live:
        port = live.url.rsplit(":", 1)[1]
        capsys.readouterr()  # the live server's own start-up lines
        code, err = run_serve(capsys, f"checkpoint={ckpt}", f"port={port}")
    assert code == 2 and "cannot listen" in err and len(err.strip().splitlines()) == 1


def test_the_seed_of_a_request_is_its_own(live):
    """Unseeded requests draw from the server's generator: two differ."""
    ask = dict(model="sft", messages=user("To be"), temperature=1.0, max_tokens=20)
    texts = {client(live).chat.completions.create(**ask).choices[0].message.content for _ in "ab"}
    assert len(texts) == 2
