"""python -m train.serve: talk to a chat model in a browser, or from any OpenAI client.

    python -m train.serve checkpoint=out/sft            # then open http://127.0.0.1:8000/
    HANDGPT_API_KEY=secret python -m train.serve host=0.0.0.0 port=8080

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "Hi"}])

Serves OpenAI's chat-completions API (/v1/chat/completions, /v1/models) and a chat page
at / (train/server/: app.py the routes, engine.py the decoding thread, conversation.py
the prompt, static/ the page). Every request is decoded in one continuous batch
(model/continuous.py): rows join and leave between steps, each with its own settings.

What it serves: the language model of any chat checkpoint (SFT, PPO, DPO, or a fine-tuned
Hugging Face GPT-2 directory that train.export wrote). Refused, in one line: a reward
model (it scores replies, it writes none) and a base model (a pretrain checkpoint, or a
plain GPT-2), which was never taught the chat format: its "replies" would be a document
going on; for those, python -m train.sample writes text.

Safety: it listens on 127.0.0.1 unless `host` says otherwise, and then only with an
api_key (Bearer). A request chooses nothing but its conversation and its decoding
settings, within the limits of conf/serve.yaml; it cannot name a file, a checkpoint or a
setting of the server.
"""

import os
import signal
import socket
import sys
from pathlib import Path

import torch

from command import entry_point
from errors import UserError

from .core.decoding import prepare_for_decoding
from .core.runtime import precision_name, setup_runtime
from .server.chat_model import load_chat_model
from .settings import ServeSettings

SERVE_EXTRA = "pip install -e '.[serve]' (make serve installs it)"


def model_threads(setting: int | None, device: torch.device) -> int:
    """torch's threads for the model: the setting, else on a CPU one core less than torch
    would take, at least one. The event loop needs a core too: with every core in the
    model's thread pool, the pool and the loop (and clients on the same machine) preempt
    each other; measured on 2 cores, one streaming client got 519 tokens/s with 2 threads
    and 762 with 1 (the tiny model, float32)."""
    if setting:
        return int(setting)
    threads = torch.get_num_threads()
    return max(1, threads - 1) if device.type == "cpu" else threads


def model_name(cfg: ServeSettings, ckpt: dict) -> str:
    """The id clients name: the setting, else the run directory's name (out/sft -> sft)."""
    if cfg.model_name:
        return str(cfg.model_name)
    path = Path(ckpt["path"])
    return path.parent.name if path.suffix == ".pt" else path.name


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before loading the model (a port in use fails at once).

    Made with proto=IPPROTO_TCP, not socket.create_server's 0: asyncio turns Nagle's
    algorithm off (TCP_NODELAY) only on the connections of a socket that says it is TCP.
    With Nagle on, a reply's first small write on a kept-alive connection waited for the
    client's delayed ACK: every request after the first on a connection got its first
    token 40 ms late (measured: 44 ms to the first token, 3 ms with TCP_NODELAY).
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
        return sock
    except OSError as e:
        raise UserError(
            f"cannot listen on {host}:{port} ({os.strerror(e.errno) if e.errno else e}); "
            "pick another port=N, or stop what uses it"
        ) from None


def prepare(cfg: ServeSettings):
    """Everything but the serving: the bound socket, the model in its engine, the app.
    Returns (uvicorn.Server, engine, socket); tests serve it in a thread."""
    try:
        import uvicorn

        from .server.app import ServerInfo, create_app
        from .server.conversation import Limits
        from .server.engine import Engine
        from .server.schemas import now
    except ImportError as e:
        raise UserError(f"the server needs the 'serve' extra ({e.name}): {SERVE_EXTRA}") from None
    sock = bind(cfg.host, int(cfg.port))
    rt = setup_runtime(cfg.device, cfg.precision, cfg.seed)
    torch.set_num_threads(model_threads(cfg.threads, rt.device))
    model, tok, ckpt = load_chat_model(str(cfg.checkpoint))
    model = prepare_for_decoding(model.to(device=rt.device, dtype=rt.dtype))
    engine = Engine(model, tok, cfg.max_batch, cfg.max_queue, cfg.top_k, cfg.seed)
    info = ServerInfo(
        model_name(cfg, ckpt),
        model.config.block_size,
        Limits(cfg.max_tokens, cfg.max_messages, min(cfg.max_n, cfg.max_batch)),
        cfg.api_key or None,
        cfg.max_body_kb * 1024,
        now(),
    )
    host, port = sock.getsockname()[:2]
    print(
        f"{ckpt['path']}: {model.num_params() / 1e6:.1f}M parameters, context "
        f"{model.config.block_size}, on {rt.device} in {precision_name(rt.dtype)}\n"
        f"serving {info.model_name!r} at http://{host}:{port}/ (chat page) and "
        f"http://{host}:{port}/v1 (OpenAI API{', key required' if info.api_key else ''}); "
        "Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    app = create_app(engine, info)
    config = uvicorn.Config(app, log_level="warning", access_log=bool(cfg.access_log))
    return uvicorn.Server(config), engine, sock


def run(cfg: ServeSettings) -> None:
    server, engine, sock = prepare(cfg)
    engine.start()
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
    if signal.SIGINT in getattr(server, "_captured_signals", ()):
        # uvicorn shut down gracefully on Ctrl-C and raised the signal again inside
        # asyncio.run, whose handler turns it into KeyboardInterrupt only while the server's
        # task still runs: a race. Ctrl-C ends here, exit 130, whoever wins it.
        raise KeyboardInterrupt


@entry_point("serve", ServeSettings)
def main(settings: ServeSettings) -> None:
    run(settings)


if __name__ == "__main__":
    main()
