"""Live servers for the tests: python -m train.serve's own set-up (train/serve.py: prepare),
served by uvicorn in a thread of the test process, on a free port of 127.0.0.1.

    with live_server(ckpt, "max_batch=4") as live:
        OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)

And a chat checkpoint whose replies the tests can predict (chat_checkpoint, expected).
"""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

import train.serve as serve_cli
from model import GPT, GPTConfig
from model.generate import complete
from tokenizer.chat import drop_oldest_turns
from train.core.checkpoint import save_checkpoint
from train.server.engine import Engine
from train.settings import load

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 64
TEXT = [
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n",
    "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles.\n",
    "Who's there? Nay, answer me: stand, and unfold yourself. Café, naïve, Ærø.\n",
]


def chat_checkpoint(
    path: Path, tok, end_weight: float = 1.0, seed: int = 0, block_size: int = BLOCK
) -> GPT:
    """A tiny random 'SFT' checkpoint (stage sft) with replies that depend on the prompt.
    Its end-of-turn and end-of-text rows are scaled by end_weight: as drawn (1), some greedy
    replies end with them and some run to their budget; with 0 no greedy reply ever ends
    (their logits are 0, and the largest of the others is above 0)."""
    torch.manual_seed(seed)
    shape = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": block_size}
    config = GPTConfig(**shape, vocab_size=tok.vocab_size)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
        model.embed.wte.weight[tok.end_id] *= end_weight
        model.embed.wte.weight[tok.eos_id] *= end_weight
    state = {"stage": "sft", "model_config": config.to_dict(), "tokenizer": tok.state()}
    save_checkpoint(path, {**state, "model": model.state_dict()})
    return model


def expected(model: GPT, tok, messages: list[dict], max_tokens: int) -> dict:
    """What the server must answer greedily: the prompt cut as the terminal chat cuts it,
    the budget clamped to the context, decoded alone by model/generate.py."""
    prompt, kept = drop_oldest_turns(tok, messages, BLOCK - min(max_tokens, BLOCK // 2))
    budget = min(max_tokens, BLOCK - len(prompt))
    c = complete(model, [prompt], budget, temperature=0, stop_ids=(tok.eos_id, tok.end_id))[0]
    return {
        "text": tok.decode(c.text_tokens),
        "finish": "stop" if c.stopped else "length",
        "prompt_tokens": len(prompt),
        "completion_tokens": len(c.tokens),
        "dropped": len(messages) - len(kept),
    }


@dataclass
class Live:
    url: str
    engine: Engine
    server: object  # uvicorn.Server

    def slow_down(self, seconds: float) -> None:
        """Make every decoding step take `seconds` longer, so that a reply lasts long
        enough to be stopped or disconnected mid-way."""
        step = self.engine.batch.step

        def slow_step():
            time.sleep(seconds)
            return step()

        self.engine.batch.step = slow_step


@contextmanager
def live_server(checkpoint: Path, *overrides: str) -> Iterator[Live]:
    cfg = load(
        "serve",
        [
            f"checkpoint={checkpoint}",
            "port=0",
            "device=cpu",
            "precision=float32",
            "access_log=false",
            "api_key=null",
            *overrides,
        ],
    )
    server, engine, sock = serve_cli.prepare(cfg)
    engine.start()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        yield Live(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        engine.close()
