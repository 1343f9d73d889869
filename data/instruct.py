"""Instruction data: JSON and JSONL files -> conversations -> (ids, mask) examples.

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

Examples. A conversation becomes one example (ids, mask) in the chat format
(tokenizer/chat.py), cut on the left to fit the context with its final reply kept;
conversations whose final reply does not fit are dropped and counted (render_examples).
Batching the examples, padded and grouped by length, is data/batching.py's work.
"""

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from errors import UserError
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


def to_prompt_item(record) -> dict:
    """A prompt record (PPO's prompts) as an item: {"messages": the conversation to reply
    to, and, when the record has one, "answer"}. Records: {"prompt": "..."}, {"prompt":
    [messages]} or {"messages": [...]} (a final assistant message is left out: the reply
    is the policy's to write); an optional "answer" lets the tasks' judge score replies
    (reward=tasks). ValueError says why a record is not one."""
    if not isinstance(record, dict) or not ({"prompt", "messages"} & record.keys()):
        raise ValueError("a prompt record needs 'prompt' (a string or messages) or 'messages'")
    value = record.get("prompt", record.get("messages"))
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
    try:
        validate_messages(messages)
    except ChatFormatError as e:
        raise ValueError(str(e)) from None
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages or messages[-1]["role"] == "system":
        raise ValueError("the prompt has no message to reply to")
    item = {"messages": messages}
    if "answer" in record:
        if not isinstance(record["answer"], str) or not record["answer"].strip():
            raise ValueError("'answer' must be a non-empty string")
        item["answer"] = record["answer"]
    return item


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
    items: list = field(default_factory=list)  # what the records parsed into
    malformed: list[str] = field(default_factory=list)  # "path:line N: why"

    @property
    def conversations(self) -> list:
        return self.items


def read_data_file(
    path: str | Path,
    parse: Callable[[object], object],
    max_bad_fraction: float = 0.05,
    log: Callable[[str], None] = print,
    what: str = "instruction data",
) -> FileReport:
    """parse(record) for every record of a JSON or JSONL file; a record it refuses (with a
    ValueError that says why) is logged with its file and line and skipped. UserError when
    the file holds no records, or more than max_bad_fraction malformed ones."""
    report = FileReport(str(path))
    for where, record in read_records(path):
        report.records += 1
        try:
            if isinstance(record, Exception):
                raise record
            report.items.append(parse(record))
        except ValueError as e:
            report.malformed.append(f"{path}:{where}: {e}")
    bad = len(report.malformed)
    for message in report.malformed[:MAX_REPORTED]:
        log(f"skipping malformed record {message}")
    if bad > MAX_REPORTED:
        log(f"... and {bad - MAX_REPORTED} more malformed records in {path}")
    if report.records == 0:
        raise UserError(f"{what} file {path} holds no records; fix or remove it")
    if bad / report.records > max_bad_fraction:
        raise UserError(
            f"{path}: {bad} of {report.records} records ({bad / report.records:.0%}) are "
            f"malformed, more than max_bad_fraction={max_bad_fraction:g} (first: "
            f"{report.malformed[0]}); fix the file or raise the threshold"
        )
    return report


def read_instruction_file(
    path: str | Path, max_bad_fraction: float = 0.05, log: Callable[[str], None] = print
) -> FileReport:
    """The conversations of one instruction file (read_data_file with to_conversation)."""
    return read_data_file(path, to_conversation, max_bad_fraction, log)


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
