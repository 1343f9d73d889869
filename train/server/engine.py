"""The engine: one thread that writes every reply, all of them in one continuous batch.

    event loop (HTTP)                       engine thread
    submit(job) --> waiting (bounded) --> admit: its n rows join the batch
                                          step: one token for every row
    job.post(updates) <------------------ text out, stop strings, finish

The event loop only parses requests and sends text: the model runs in the engine thread
(torch releases the interpreter lock inside its kernels), so a long reply never blocks
another request's HTTP. Requests that wait are decoded together: model/continuous.py
lets rows join and leave between steps, each with its own temperature, top-p, stop ids
and generator, so a newcomer starts at the next step (its prompt prefilled) instead of
after the longest reply in flight, and a finished, stopped or abandoned reply frees its
row at once. Beyond `max_batch` rows, jobs wait in a queue of at most `max_queue`; past
that, submit raises Busy (the app answers 429).

Per choice (Choice) the engine turns tokens into text (tokenizer/stream.py: never half a
character) and matches stop strings (stops.py), so a stop string ends its row at once.
Each step, every job gets its choices' Updates in one call of `job.post`, which the app
makes a thread-safe put into the request's asyncio queue.
"""

import threading
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model import GPT
from model.continuous import ContinuousBatch, Row
from tokenizer.stream import TextStream

from .conversation import Plan
from .stops import StopStrings

SEED_MOD = 2**64  # torch.Generator.manual_seed takes 0 .. 2**64 - 1


class Busy(Exception):
    """The queue is full: come back later."""


@dataclass
class Update:
    """What one choice of a job got in one step."""

    index: int  # the choice
    text: str  # new text, safe to send (no part of a stop string)
    finish: str | None = None  # "stop" or "length" once the choice has ended
    tokens: int = 0  # tokens the choice has written so far (usage)
    error: str | None = None  # the engine failed: the reply cannot go on


@dataclass(eq=False)
class Job:
    """One request: its plan, and where its updates go (called in the engine thread)."""

    plan: Plan
    post: Callable[[list[Update]], None]
    cancelled: bool = False  # set by the app when the client goes away
    choices: list["Choice"] = field(default_factory=list)


class Choice:
    """One of a job's n replies: its row in the batch, its text, its stop strings."""

    def __init__(self, index: int, row: Row, tok, stops: tuple[str, ...]) -> None:
        self.index, self.row = index, row
        self.text = TextStream(tok)
        self.stops = StopStrings(stops)
        self.finish: str | None = None

    def advance(self) -> Update:
        """The text of the row's newest token, what ends the reply, if anything."""
        row = self.row
        ended = row.finish in ("stop", "length")  # a stop id, or the budget
        text = "" if row.finish == "stop" else self.text.push(row.tokens[-1])  # ids: no text
        text, hit = self.stops.push(text + (self.text.flush() if ended else ""))
        if hit:
            self.finish = "stop"
        elif ended:
            text += self.stops.flush()
            self.finish = row.finish
        return Update(self.index, text, self.finish, len(row.tokens))


class Engine:
    """Owns the model: submit jobs from any thread; start() before, close() after."""

    def __init__(
        self,
        model: GPT,
        tok,
        max_batch: int,
        max_queue: int,
        top_k: int | None = None,
        seed: int = 0,
    ) -> None:
        self.model, self.tok, self.max_queue = model, tok, max_queue
        self.device = model.embed.wte.weight.device
        generator = torch.Generator(device=self.device).manual_seed(seed)
        self.batch = ContinuousBatch(model, max_batch, top_k, generator)
        self.stop_ids = frozenset((tok.eos_id, tok.end_id))  # the end of a turn or document
        self.waiting: deque[Job] = deque()
        self.live: dict[Row, tuple[Job, Choice]] = {}
        self.cond = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        with self.cond:
            self.closing = True
            self.cond.notify()
        self.thread.join()

    def submit(self, job: Job) -> None:
        """Queue a job; Busy when max_queue jobs are waiting already."""
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise Busy
            self.waiting.append(job)
            self.cond.notify()

    def load(self) -> dict:
        """Rows decoding and jobs waiting, for GET /health."""
        return {"rows": len(self.batch.rows), "waiting": len(self.waiting)}

    # ------------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.closing and not self.waiting and not len(self.batch):
                    self.cond.wait()
                if self.closing:
                    return
                self._admit()
            try:
                self._step()
            except Exception as e:  # a bug or a failing device: tell everyone, go on
                traceback.print_exc()
                self._fail_all(f"the model failed while writing the reply ({type(e).__name__})")

    def _admit(self) -> None:
        """Move waiting jobs into the batch, first come first served, while they fit."""
        while self.waiting and self.batch.room() >= self.waiting[0].plan.n:
            job = self.waiting.popleft()
            if job.cancelled:
                continue
            p = job.plan
            for i in range(p.n):
                generator = None
                if p.seed is not None:  # choice i draws from seed + i: choice 0 is n=1's reply
                    generator = torch.Generator(device=self.device)
                    generator.manual_seed((p.seed + i) % SEED_MOD)
                stop_ids = frozenset() if p.ignore_eos else self.stop_ids
                row = Row(p.prompt, p.max_tokens, p.temperature, p.top_p, generator, stop_ids)
                job.choices.append(Choice(i, row, self.tok, p.stops))
                self.batch.add(row)
                self.live[row] = (job, job.choices[-1])

    def _step(self) -> None:
        """One token for every row; each job hears about its choices."""
        for row, (job, _) in self.live.items():
            if job.cancelled:
                self.batch.cancel(row)
        updates: dict[Job, list[Update]] = {}
        for row in self.batch.step():
            job, choice = self.live[row]
            update = choice.advance()
            if choice.finish and not row.finish:  # a stop string: the row goes at once
                self.batch.cancel(row)
            updates.setdefault(job, []).append(update)
        for row in [r for r in self.live if r.finish]:
            del self.live[row]
        for job, ups in updates.items():
            job.post(ups)

    def _fail_all(self, message: str) -> None:
        """Every job in flight gets the error; the batch starts afresh."""
        jobs = {job for job, _ in self.live.values()}
        self.live.clear()
        b = self.batch
        self.batch = ContinuousBatch(self.model, b.capacity, b.top_k, b.generator)
        for job in jobs:
            job.post([Update(c.index, "", error=message) for c in job.choices])
