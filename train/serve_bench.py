"""python -m train.serve_bench: many streaming clients against a live server.

    python -m train.serve_bench checkpoint=out/sft                  # starts its own server
    python -m train.serve_bench url=http://127.0.0.1:8000 clients=[1,8]

For each number of clients (1, 4, 16, 64), that many clients at once, each sending
`requests_per_client` streamed chat completions one after another through the official
openai client (max_retries=0: a 429 is an error, not a retry), with fixed prompts,
max_tokens and temperature, and (ignore_eos, the default) replies that all run to
max_tokens: a small SFT model answers in a few tokens, and the figures would then measure
requests, not decoding:

    time to first token   from sending the request to its first content chunk (p50, p95)
    tokens/s per client   a client's completion tokens (usage) / its wall time (median, min)
    total tokens/s        every completion token of the level / the level's wall time
    errors                requests that failed, by exception type

and, for comparison, the terminal chat's tokens/s: the same prompts decoded one at a time
as python -m train.sample mode=chat decodes them (model/generate.py: completions, batch 1,
text streamed per token; the same replies' length), in this process, on the same device and
precision, before the server starts and after it stops (the better of the two: other
work on a shared machine comes and goes); and the two ways of batching on one workload, in this
process too (train/server/policies.py; there, replies end at their end of turn). The
server runs in its own process (python -m train.serve, access log off); on a machine with
few cores it shares them with the clients, as it would in use.

Targets (docs): 64 clients without an error; total tokens/s with 16 clients at least 4x one
client's; one client alone at least 80% of the terminal chat's tokens/s; p95 time to first
token under 1 s with 16 clients. The figures go to stdout and ${out_dir}/serve_bench.json.
"""

import asyncio
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from command import entry_point
from errors import UserError
from model.generate import completions
from tokenizer.chat import render_prompt
from tokenizer.stream import TextStream

from .core.decoding import prepare_for_decoding
from .core.runtime import setup_runtime
from .server.chat_model import load_chat_model
from .server.policies import compare as policies_compared
from .settings import ServeBenchSettings

PROMPTS = [  # the built-in tasks' kind of question (data/tasks.py)
    "Which play has a character named Hamlet?",
    "Who speaks this line? To be, or not to be, that is the question",
    "Repeat this line: The slings and arrows of outrageous fortune",
    "What is the first word of: Now is the winter of our discontent",
    "How many words are in this line? Friends, Romans, countrymen, lend me your ears",
    "In which play does Lady Macbeth appear?",
    "Name the speaker of this line: O Romeo, Romeo, wherefore art thou Romeo?",
    "What is the last word of: All the world's a stage",
]


def note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between ranks; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


# --------------------------------------------------------------------------- the baseline


class InProcess:
    """The figures measured in this process: the terminal chat's tokens/s, and the two
    batching policies (train/server/policies.py), on the model the server serves."""

    def __init__(self, cfg: ServeBenchSettings) -> None:
        self.cfg = cfg
        self.rt = setup_runtime(cfg.device, cfg.precision, cfg.seed)
        model, self.tok, _ = load_chat_model(str(cfg.checkpoint))
        self.model = prepare_for_decoding(model.to(device=self.rt.device, dtype=self.rt.dtype))
        self.prompts = []
        for question in PROMPTS:
            ids = render_prompt(self.tok, [{"role": "user", "content": question}])
            if len(ids) + cfg.max_tokens > self.model.config.block_size:
                raise UserError(
                    f"the prompt {question!r} is {len(ids)} tokens: with max_tokens="
                    f"{cfg.max_tokens} it does not fit this model's context "
                    f"({self.model.config.block_size}); lower max_tokens"
                )
            self.prompts.append(ids)

    def terminal_chat(self) -> float:
        note("measuring the terminal chat's decoding (batch 1) ...")
        return terminal_chat(self.model, self.tok, self.prompts, self.cfg, self.rt)

    def policies(self) -> dict:
        cfg = self.cfg
        note(f"comparing the batching policies ({cfg.policy_clients} clients, in process) ...")
        stops = (self.tok.eos_id, self.tok.end_id)
        speeds = policies_compared(
            self.model,
            self.prompts,
            cfg.policy_clients,
            cfg.requests_per_client,
            cfg.max_tokens,
            cfg.top_k or None,
            stops,
        )
        return {
            name: {
                "tokens_per_s": speed,
                "ttft_p50_s": percentile(waits, 50),
                "ttft_p95_s": percentile(waits, 95),
            }
            for name, (speed, waits) in speeds.items()
        }


def terminal_chat(
    model, tok, prompts: list[list[int]], cfg: ServeBenchSettings, rt, passes=3
) -> float:
    """The prompts decoded one by one as the terminal chat decodes them: new tokens / time,
    the best of `passes` passes over the prompts (after one warm-up reply)."""
    generator = torch.Generator(device=rt.device).manual_seed(int(cfg.seed))

    def chat_reply(ids: list[int]) -> int:
        """One reply as train.sample's stream_reply writes it (text made per token)."""
        out = TextStream(tok, lstrip=True)
        steps = completions(
            model,
            [ids],
            cfg.max_tokens,
            cfg.temperature,
            cfg.top_k or None,
            stop_ids=() if cfg.ignore_eos else (tok.eos_id, tok.end_id),
            generator=generator,
        )
        for (reply,) in steps:
            if not reply.stopped:
                out.push(reply.tokens[-1])
        rt.synchronize()
        return len(reply.tokens)

    chat_reply(prompts[0])  # warm-up
    best = 0.0
    for _ in range(passes):
        start = time.perf_counter()
        tokens = sum(chat_reply(ids) for ids in prompts)
        best = max(best, tokens / (time.perf_counter() - start))
    return best


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cfg: ServeBenchSettings, log: Path) -> tuple[subprocess.Popen, str]:
    """python -m train.serve in its own process; returns it and its URL once it answers."""
    port = free_port()
    args = [f"checkpoint={cfg.checkpoint}", f"port={port}", "access_log=false"]
    args += [f"device={cfg.device}", f"precision={cfg.precision}", f"top_k={cfg.top_k}"]
    args += [str(a) for a in cfg.server_args]
    with log.open("w") as f:
        server = subprocess.Popen([sys.executable, "-m", "train.serve", *args], stderr=f)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + cfg.startup_timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise UserError(f"the server stopped: {log.read_text().strip().splitlines()[-1]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.2)
    server.terminate()
    raise UserError(f"the server did not answer within {cfg.startup_timeout_s} s; see {log}")


# --------------------------------------------------------------------------- the clients


async def one_request(client, model: str, question: str, cfg: ServeBenchSettings) -> dict:
    """One streamed completion: time to first token, tokens (usage), seconds."""
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True} if cfg.ignore_eos else None,
    )
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft": first, "tokens": tokens, "seconds": time.perf_counter() - start}


async def one_client(client, model: str, index: int, cfg: ServeBenchSettings) -> dict:
    """requests_per_client requests one after another; errors are counted, not raised."""
    done, errors, start = [], [], time.perf_counter()
    for k in range(cfg.requests_per_client):
        question = PROMPTS[(index + k) % len(PROMPTS)]
        try:
            done.append(await one_request(client, model, question, cfg))
        except Exception as e:  # a 429, a broken stream...: what the benchmark counts
            errors.append(type(e).__name__)
    return {"requests": done, "errors": errors, "seconds": time.perf_counter() - start}


async def level(url: str, model: str, n: int, cfg: ServeBenchSettings) -> dict:
    """n clients at once: the figures of the module docstring."""
    from openai import AsyncOpenAI

    key = cfg.api_key or "none"
    client = AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=600)
    start = time.perf_counter()
    clients = await asyncio.gather(*(one_client(client, model, i, cfg) for i in range(n)))
    wall = time.perf_counter() - start
    await client.close()
    requests = [r for c in clients for r in c["requests"]]
    ttfts = [r["ttft"] for r in requests if r["ttft"] is not None]
    per_client = [sum(r["tokens"] for r in c["requests"]) / c["seconds"] for c in clients]
    errors = [e for c in clients for e in c["errors"]]
    return {
        "clients": n,
        "requests": len(requests) + len(errors),
        "errors": len(errors),
        "error_types": sorted(set(errors)),
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p95_s": percentile(ttfts, 95),
        "client_tokens_per_s_median": statistics.median(per_client),
        "client_tokens_per_s_min": min(per_client),
        "total_tokens_per_s": sum(r["tokens"] for r in requests) / wall,
        "tokens": sum(r["tokens"] for r in requests),
        "wall_s": wall,
    }


# --------------------------------------------------------------------------- report


def report(levels: list[dict], local: dict) -> list[str]:
    """The table, the in-process figures and the targets, as lines."""
    terminal = local.get("terminal_chat_tokens_per_s")
    lines = [
        f"{'clients':>7} {'requests':>8} {'errors':>6} {'TTFT p50':>9} {'TTFT p95':>9} "
        f"{'tok/s per client':>17} {'tok/s total':>11}",
    ]
    for r in levels:
        lines.append(
            f"{r['clients']:>7} {r['requests']:>8} {r['errors']:>6} {r['ttft_p50_s']:>8.3f}s "
            f"{r['ttft_p95_s']:>8.3f}s {r['client_tokens_per_s_median']:>17.1f} "
            f"{r['total_tokens_per_s']:>11.1f}"
        )
    if terminal is not None:
        lines.append(f"terminal chat (batch 1, one at a time): {terminal:.1f} tokens/s")
    for name, p in local.get("policies", {}).items():
        lines.append(
            f"batching policy {name:>10} (in process, no HTTP): {p['tokens_per_s']:.1f} "
            f"tokens/s, TTFT p50 {p['ttft_p50_s']:.3f} s, p95 {p['ttft_p95_s']:.3f} s"
        )
    by = {r["clients"]: r for r in levels}
    checks = []
    if 64 in by:
        checks.append(("64 clients, no error", by[64]["errors"] == 0, f"{by[64]['errors']} errors"))
    if 1 in by and 16 in by:
        ratio = by[16]["total_tokens_per_s"] / by[1]["total_tokens_per_s"]
        checks.append(("16 clients' total >= 4x one client's", ratio >= 4, f"{ratio:.1f}x"))
    if 1 in by and terminal:
        share = by[1]["client_tokens_per_s_median"] / terminal
        checks.append(("one client >= 80% of the terminal chat", share >= 0.8, f"{share:.0%}"))
    if 16 in by:
        p95 = by[16]["ttft_p95_s"]
        checks.append(("16 clients' p95 TTFT < 1 s", p95 < 1, f"{p95:.3f} s"))
    for what, ok, figure in checks:
        lines.append(f"target: {what}: {figure} ({'met' if ok else 'NOT met'})")
    return lines


def run(cfg: ServeBenchSettings) -> None:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    local: dict = {}
    here, server = None, None
    if cfg.url is None:
        here = InProcess(cfg)
        local["terminal_chat_runs"] = [here.terminal_chat()]
        if cfg.compare_policies:
            local["policies"] = here.policies()
        server, url = start_server(cfg, out_dir / "server.log")
    else:
        url = str(cfg.url).rstrip("/")
    try:
        model = cfg.model_name or served_model(url, cfg)
        asyncio.run(level(url, model, 1, cfg))  # warm-up, not reported
        levels = []
        for n in cfg.clients:
            note(f"{n} client(s) ...")
            levels.append(asyncio.run(level(url, model, n, cfg)))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    if here is not None:  # once more, after: on a shared machine, the better of the two
        local["terminal_chat_runs"].append(here.terminal_chat())
        local["terminal_chat_tokens_per_s"] = max(local["terminal_chat_runs"])
    lines = report(levels, local)
    print("\n".join(lines))
    record = {
        "config": dataclasses.asdict(cfg),
        **local,
        "levels": levels,
        "load_average": os.getloadavg(),
        "cpu_threads": torch.get_num_threads(),
    }
    record["config"].pop("api_key", None)
    (out_dir / "serve_bench.json").write_text(json.dumps(record, indent=2) + "\n")


def served_model(url: str, cfg: ServeBenchSettings) -> str:
    """The id of the one model the server serves (GET /v1/models)."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    r = httpx.get(url + "/v1/models", headers=headers, timeout=30)
    if r.status_code != 200:
        raise UserError(f"{url}/v1/models answered {r.status_code}: {r.text[:200]}")
    return r.json()["data"][0]["id"]


@entry_point("serve_bench", ServeBenchSettings)
def main(settings: ServeBenchSettings) -> None:
    run(settings)


if __name__ == "__main__":
    main()
