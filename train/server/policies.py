"""Two ways to batch a server's requests, timed on one workload in this process (no HTTP):

    continuous  model/continuous.py, what the engine does: rows join and leave between
                steps, each with its own temperature, top-p and generator
    agreeing    model/generate.py's completions as it was: a batch of the waiting requests
                whose settings agree (same temperature and top-p; a seeded request alone,
                with its own generator), run to its last token before the next batch starts

Workload (closed loop, as chat clients behave): `clients` clients, each sending `requests`
requests one after another, the next as soon as its previous reply has ended; fixed
prompts, `max_tokens` each, the chat's stop ids; the temperature alternates between two
values from one request to the next, and every fourth request carries a seed. Per policy:
tokens/s (every new token / the wall time) and the time from a request's submission to
its first token (p50, p95). train/serve_bench.py prints them beside the HTTP figures.
"""

import time
from dataclasses import dataclass

import torch

from model import GPT
from model.continuous import ContinuousBatch, Row
from model.generate import completions

TEMPERATURES = (0.7, 1.0)
SEED_EVERY = 4


@dataclass(eq=False)
class Request:
    client: int
    number: int  # the client's k-th request
    prompt: list[int]
    temperature: float
    seed: int | None
    submitted: float = 0.0
    first: float | None = None  # when its first token came
    tokens: int = 0


class Workload:
    """Every client's requests, handed out one at a time as replies end."""

    def __init__(self, prompts: list[list[int]], clients: int, requests: int) -> None:
        self.prompts, self.clients, self.requests = prompts, clients, requests
        self.done: list[Request] = []

    def first_requests(self, now: float) -> list[Request]:
        return [self._request(c, 0, now) for c in range(self.clients)]

    def next_after(self, finished: Request, now: float) -> Request | None:
        """Record a finished request; the same client's next one, or None."""
        self.done.append(finished)
        k = finished.number + 1
        return self._request(finished.client, k, now) if k < self.requests else None

    def _request(self, client: int, k: int, now: float) -> Request:
        i = client * self.requests + k
        seed = i if i % SEED_EVERY == SEED_EVERY - 1 else None
        prompt = self.prompts[i % len(self.prompts)]
        return Request(client, k, prompt, TEMPERATURES[i % len(TEMPERATURES)], seed, now)


def generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def run_continuous(model: GPT, work: Workload, max_tokens: int, top_k, stop_ids) -> float:
    """Every request in one ContinuousBatch; returns the wall time."""
    device = model.embed.wte.weight.device
    batch = ContinuousBatch(model, work.clients, top_k, torch.Generator(device=device))
    start = time.perf_counter()
    rows: dict[Row, Request] = {}
    incoming = work.first_requests(start)
    while incoming or len(batch):
        for req in incoming:
            gen = generator(req.seed, device)
            row = Row(req.prompt, max_tokens, req.temperature, generator=gen, stop_ids=stop_ids)
            batch.add(row)
            rows[row] = req
        incoming = []
        stepped = batch.step()
        now = time.perf_counter()
        for row in stepped:
            req = rows[row]
            req.first = req.first or now
            if row.finish:
                req.tokens = len(row.tokens)
                nxt = work.next_after(rows.pop(row), now)
                incoming += [nxt] if nxt else []
    return time.perf_counter() - start


def run_agreeing(model: GPT, work: Workload, max_tokens: int, top_k, stop_ids) -> float:
    """Batches of agreeing requests, each run to its end; returns the wall time."""
    device = model.embed.wte.weight.device
    shared = torch.Generator(device=device)
    start = time.perf_counter()
    waiting = work.first_requests(start)
    while waiting:
        head = waiting[0]
        group = [head]
        if head.seed is None:  # every unseeded request at the same temperature
            group = [r for r in waiting if r.seed is None and r.temperature == head.temperature]
        waiting = [r for r in waiting if r not in group]
        steps = completions(
            model,
            [r.prompt for r in group],
            max_tokens,
            head.temperature,
            top_k,
            stop_ids=stop_ids,
            generator=generator(head.seed, device) or shared,
        )
        for out in steps:
            now = time.perf_counter()
            for req, c in zip(group, out, strict=True):
                req.first = req.first or now
                ended = c.stopped or len(c.tokens) == max_tokens
                if ended and not req.tokens:
                    req.tokens = len(c.tokens)
                    nxt = work.next_after(req, now)
                    waiting += [nxt] if nxt else []
    return time.perf_counter() - start


def compare(
    model: GPT, prompts, clients: int, requests: int, max_tokens: int, top_k, stop_ids, repeats=2
) -> dict:
    """Both policies on the same workload, in turn, `repeats` times (the first run of each
    also warms it up): {policy: (the best tokens/s, each request's wait for its first
    token in seconds in that run)}."""
    results: dict[str, tuple[float, list[float]]] = {}
    for _ in range(repeats):
        for name, policy in (("continuous", run_continuous), ("agreeing", run_agreeing)):
            work = Workload(prompts, clients, requests)
            wall = policy(model, work, max_tokens, top_k, frozenset(stop_ids))
            speed = sum(r.tokens for r in work.done) / wall
            if speed > results.get(name, (0.0, []))[0]:
                results[name] = (speed, [r.first - r.submitted for r in work.done])
    return results
