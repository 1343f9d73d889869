"""Instruction data: JSON and JSONL files -> conversations -> padded training batches.

Reading. A file is JSONL (one record per line; "line N" is its 1-based line number) or
JSON (one array of records; "index N" is the 0-based array index). Files ending in .json
are read as JSON, .jsonl/.ndjson as JSONL, anything else by its first character ('[' is
JSON). Each record is recognised by its keys, record by record, so one file may mix them:

    chat     {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
             system optional (first only), any number of turns, the last one the assistant's
    Alpaca   {"instruction": "...", "input": "..." (optional), "output": "..."}
    Dolly    {"instruction": "...", "context": "..." (optional), "response": "..."}

Alpaca and Dolly become [user: instruction + "\\n\\n" + input/context, assistant: output/
response]. A record that fits none of them, or has an empty instruction or answer, is
malformed: it is reported with its file and line (or index) and skipped. A file in which
more than max_bad_fraction of the records are malformed stops the run (UserError): at
that point the file is in another format, not slightly dirty. A file that cannot be
parsed at all, or holds no records, stops the run as well.

Mixing. Several files, each with a weight: a file of n conversations with weight w
contributes round(w * n) of them per epoch: each conversation floor(w) times, plus a
seeded random subset for the fraction. Weight 1 is "as is", 2 doubles a small
high-quality set, 0.25 takes a quarter of a big one. Nothing to train on: UserError.

Batching: padding, not packing. A conversation becomes one example (ids, mask) ->
x = ids[:-1], y = ids[1:] with y = -100 where the mask of the target is 0. A batch
is B examples padded on the right to the longest of them (x with pad_id, y with -100).
Why padding: with causal attention, padding on the right never changes what the real
positions compute, so a training example is exactly what evaluation and chat see: one
conversation starting at position 0 after <bos>. Packing several conversations into one
row would let each attend to the unrelated ones before it (this model has no per-document
attention mask) and put them at positions the model never sees when chatting.
The cost of padding is the pad positions. To keep it small, examples are batched by
length: a window of `group` batches (drawn in shuffled order) is sorted by length, cut
into batches, and the batches are put in a random order; rows then differ by a token or
two, and a batch still mixes tasks (built-in set, group 8: 5.7 of 8 tasks per batch of 16;
group 1, no grouping: 7.0).

Measured (tiny model 4 x 256, context 128, vocabulary 4096; built-in train set, 4800
conversations of 15..56 tokens, mean 30; batches of 16 conversations; AdamW steps on one
thread, real (non-pad) tokens per CPU-second, median of 3 runs of 12 steps; the 2 shared
cores were saturated by other jobs, so wall-clock figures were meaningless):

    padding to the full context (128)        fill 0.23     520 tokens/s
    padding to the longest, random batches   fill 0.71   1,680 tokens/s
    padding to the longest, grouped by 16    fill 0.96   2,230 tokens/s   <- this loader
    packing whole conversations, rows of 128 fill 0.89   2,090 tokens/s

(The default group of 8 fills 0.94.) So grouped padding is as fast as packing here, within
run-to-run noise, while keeping every example exact, and 4x faster than padding to the
context. Packing would win only for conversations of very different, longer lengths.

The loader has TokenLoader's interface (data/loader.py): next_batch() -> (x, y) int64
(B, T) tensors (T varies from batch to batch, at most block_size), one global stream of
batches, each a function of (seed, its number g) only, that rank r of world_size W reads
at g = step * W + r, and state_dict() = {"seed", "step"}: plain ints, so a resumed run
continues exactly.
"""

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from errors import UserError
from model import IGNORE_INDEX
from tokenizer.chat import ChatFormatError, fit_to_context, render_conversation, validate_messages

Conversation = list[dict]
MAX_REPORTED = 10  # malformed records listed one by one per file; the rest are counted


# ---------------------------------------------------------------------------- records


def to_conversation(record) -> Conversation:
    """One record (chat, Alpaca or Dolly) as a conversation; ValueError says why not."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        try:
            validate_messages(messages)
        except ChatFormatError as e:
            raise ValueError(str(e)) from None
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError("the last message must be the assistant's (the reply to learn)")
        if not messages[-1]["content"].strip():
            raise ValueError("the assistant's last message is empty")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" in record:
        if "output" in record:  # Alpaca
            extra_key, answer_key = "input", "output"
        elif "response" in record:  # Dolly
            extra_key, answer_key = "context", "response"
        else:
            raise ValueError("has 'instruction' but no 'output' (Alpaca) or 'response' (Dolly)")
        instruction, extra = record["instruction"], record.get(extra_key) or ""
        answer = record[answer_key]
        for key, value in (("instruction", instruction), (extra_key, extra), (answer_key, answer)):
            if not isinstance(value, str):
                raise ValueError(f"'{key}' must be a string, got {type(value).__name__}")
        if not instruction.strip() or not answer.strip():
            raise ValueError(f"'instruction' and '{answer_key}' must not be empty")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    keys = ", ".join(sorted(record)) or "none"
    raise ValueError(
        f"unknown format (keys: {keys}); expected chat (messages), Alpaca (instruction, "
        "input, output) or Dolly (instruction, context, response)"
    )


def _is_json_array(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return True
    if suffix in (".jsonl", ".ndjson"):
        return False
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read(4096).lstrip().startswith("[")


def read_records(path: str | Path) -> Iterator[tuple[str, object]]:
    """(where, record) for each record of a JSON or JSONL file, in order.

    where is "line N" (JSONL, 1-based) or "index N" (JSON array, 0-based). A JSONL line
    that is not valid JSON yields a ValueError as its record. A file that is missing, not
    UTF-8, or (JSON) not a valid array raises UserError.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"instruction data file {path} does not exist; fix the data paths")
    try:
        if _is_json_array(path):
            text = path.read_text(encoding="utf-8")
            if not text.strip():
                return  # an empty file: no records
            try:
                records = json.loads(text)
            except json.JSONDecodeError as e:
                raise UserError(
                    f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                    "fix it, or use JSONL with one record per line"
                ) from None
            if not isinstance(records, list):
                raise UserError(f"{path} must hold a JSON array of records, not a single value")
            for i, record in enumerate(records):
                yield f"index {i}", record
            return
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"line {n}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"line {n}", ValueError(f"not valid JSON ({e.msg}, column {e.colno})")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 (byte offset {e.start}); convert it") from None


@dataclass
class FileReport:
    """What reading one file found."""

    path: str
    records: int = 0
    conversations: list = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)  # "path:line N: why"


def read_instruction_file(
    path: str | Path, max_bad_fraction: float = 0.05, log: Callable[[str], None] = print
) -> FileReport:
    """The conversations of one file; malformed records are logged (file and line) and
    skipped. UserError when the file holds no records or too many malformed ones."""
    report = FileReport(str(path))
    for where, record in read_records(path):
        report.records += 1
        try:
            if isinstance(record, Exception):
                raise record
            report.conversations.append(to_conversation(record))
        except ValueError as e:
            report.malformed.append(f"{path}:{where}: {e}")
    bad = len(report.malformed)
    for message in report.malformed[:MAX_REPORTED]:
        log(f"skipping malformed record {message}")
    if bad > MAX_REPORTED:
        log(f"... and {bad - MAX_REPORTED} more malformed records in {path}")
    if report.records == 0:
        raise UserError(f"instruction data file {path} holds no records; fix or remove it")
    if bad / report.records > max_bad_fraction:
        raise UserError(
            f"{path}: {bad} of {report.records} records ({bad / report.records:.0%}) are "
            f"malformed, more than max_bad_fraction={max_bad_fraction:g} (first: "
            f"{report.malformed[0]}); fix the file or raise the threshold"
        )
    return report


# ---------------------------------------------------------------------------- mixing


def mix(parts: Sequence[tuple[Sequence[Conversation], float]], seed: int = 0) -> list[Conversation]:
    """One list from (conversations, weight) parts: round(weight * n) of each part's n
    conversations (whole copies, then a seeded random subset for the fraction)."""
    rng = np.random.default_rng([seed, 0x31C])
    out: list[Conversation] = []
    for conversations, weight in parts:
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise UserError(f"a data weight must be a number >= 0, got {weight!r}")
        n = len(conversations)
        whole, rest = divmod(round(weight * n), n) if n else (0, 0)
        out += list(conversations) * whole
        out += [conversations[i] for i in sorted(rng.permutation(n)[:rest])]
    return out


def load_instruction_data(
    sources: Sequence,
    max_bad_fraction: float = 0.05,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> list[Conversation]:
    """The mixture of files listed in `sources`: each a path, or {path, weight (default 1)}.

    Reads every file (see read_instruction_file), mixes them by weight, and logs what each
    contributed. UserError if there is nothing to train on.
    """
    parts = []
    for source in sources:
        if isinstance(source, (str, Path)):
            path, weight = source, 1.0
        else:
            path, weight = source["path"], source.get("weight", 1.0)
        report = read_instruction_file(path, max_bad_fraction, log)
        parts.append((report.conversations, weight))
        log(
            f"{path}: {len(report.conversations)} conversations "
            f"({len(report.malformed)} malformed skipped), weight {weight:g}"
        )
    conversations = mix(parts, seed)
    if not conversations:
        raise UserError(
            "no instruction data to train on: the data files and weights give no conversation"
        )
    return conversations


# ---------------------------------------------------------------------------- examples


@dataclass
class RenderReport:
    """How conversations became training examples; SFT prints it."""

    conversations: int = 0
    examples: int = 0
    truncated: int = 0  # cut from the left to fit the context, final reply kept
    dropped: int = 0  # even the final reply did not fit
    tokens: int = 0  # ids in all examples
    trained_tokens: int = 0  # ids with mask 1

    def summary(self) -> str:
        return (
            f"{self.conversations} conversations -> {self.examples} examples "
            f"({self.truncated} truncated on the left, {self.dropped} dropped as longer than "
            f"the context), {self.tokens} tokens of which {self.trained_tokens} trained"
        )


def render_examples(
    tok, conversations: Sequence[Conversation], block_size: int
) -> tuple[list[tuple[list[int], list[int]]], RenderReport]:
    """(ids, mask) per conversation, fitted to block_size + 1 ids (x and y are block_size
    long); truncated and dropped conversations are counted. UserError if none is left."""
    examples, report = [], RenderReport(conversations=len(conversations))
    for conversation in conversations:
        ids, mask = render_conversation(tok, conversation)
        fitted = fit_to_context(ids, mask, block_size + 1)
        if fitted is None or not any(fitted[1]):
            report.dropped += 1
            continue
        report.truncated += len(fitted[0]) < len(ids)
        examples.append(fitted)
        report.tokens += len(fitted[0])
        report.trained_tokens += sum(fitted[1])
    report.examples = len(examples)
    if not examples:
        raise UserError(
            f"all {len(conversations)} conversations are longer than the model's context "
            f"({block_size} tokens) even when cut to their final reply; nothing to train on"
        )
    return examples, report


def collate(examples: Sequence[tuple[list[int], list[int]]], pad_id: int):
    """Padded (x, y), int64 (B, T) with T the longest example's length - 1.

    x[i, t] = ids[t]; y[i, t] = ids[t + 1] where mask[t + 1] is 1, else -100. Pad
    positions are x = pad_id, y = -100.
    """
    T = max(len(ids) for ids, _ in examples) - 1
    x = np.full((len(examples), T), pad_id, dtype=np.int64)
    y = np.full((len(examples), T), IGNORE_INDEX, dtype=np.int64)
    for i, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        ids_a, mask_a = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)
        x[i, :n] = ids_a[:-1]
        y[i, :n] = np.where(mask_a[1:], ids_a[1:], IGNORE_INDEX)
    return torch.from_numpy(x), torch.from_numpy(y)


class SFTLoader:
    """Padded, length-grouped batches of examples; deterministic, resumable, per rank.

    The global stream of examples is epoch after epoch, each epoch a permutation drawn
    from (seed, epoch). Batches come in windows of `group` batches: window w holds the
    next group * batch_size examples of the stream, sorted by length, cut into batches
    and put in an order drawn from (seed, w). Rank r of world_size W reads global batch
    g = step * W + r.
    """

    def __init__(
        self,
        examples: Sequence[tuple[list[int], list[int]]],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pad_id: int = 0,
        group: int = 8,
    ):
        if batch_size < 1 or group < 1:
            raise ValueError(f"batch_size and group must be >= 1, got {batch_size}, {group}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if not examples:
            raise UserError("no training examples; nothing to train on")
        self.examples = list(examples)
        self.lengths = np.array([len(ids) for ids, _ in self.examples])
        self.batch_size, self.group, self.pad_id = batch_size, group, pad_id
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0  # batches this rank has drawn
        self._window: tuple[int, list[np.ndarray]] | None = None  # cache of the last window
        self._epochs: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> float:
        """Examples drawn by all ranks so far, in epochs."""
        seen = self.step * self.world_size * self.batch_size
        return seen / len(self.examples)

    def _stream(self, start: int, count: int) -> np.ndarray:
        """Example indices at stream positions start .. start + count - 1."""
        n = len(self.examples)
        positions = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(positions // n):
            if epoch not in self._epochs:
                if len(self._epochs) > 2:
                    self._epochs.pop(min(self._epochs))
                self._epochs[epoch] = np.random.default_rng([self.seed, 0, epoch]).permutation(n)
            here = positions // n == epoch
            out[here] = self._epochs[epoch][positions[here] % n]
        return out

    def _batch_indices(self, g: int) -> np.ndarray:
        """Example indices of global batch g."""
        w, j = divmod(g, self.group)
        if self._window is None or self._window[0] != w:
            size = self.group * self.batch_size
            idx = self._stream(w * size, size)
            idx = idx[np.argsort(self.lengths[idx], kind="stable")]  # shortest first
            order = np.random.default_rng([self.seed, 1, w]).permutation(self.group)
            batches = np.split(idx, self.group)
            self._window = (w, [batches[k] for k in order])
        return self._window[1][j]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 CPU tensors of shape (batch_size, T), T the batch's longest - 1."""
        g = self.step * self.world_size + self.rank
        self.step += 1
        return collate([self.examples[i] for i in self._batch_indices(g)], self.pad_id)

    def state_dict(self) -> dict:
        """The stream's position: plain ints, safe for torch.load(weights_only=True)."""
        return {"seed": int(self.seed), "step": int(self.step)}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.step = int(state["seed"]), int(state["step"])
        self._window, self._epochs = None, {}


def eval_batches(
    examples: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_id: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every example once, in order, in padded batches (the last may be smaller): for a
    validation loss on held-out conversations."""
    for start in range(0, len(examples), batch_size):
        yield collate(examples[start : start + batch_size], pad_id)
