"""Instruction data: JSON and JSONL files -> conversations -> (ids, mask) examples.

Reading. Files are JSON arrays or JSON Lines, recognised by content (data/records.py, which
also reports a malformed record with its file and line and applies max_bad_fraction). Each
record is recognised by its keys, record by record, so one file may mix layouts:

    chat       {"messages": [{"role": "system"|"developer"|"user"|"assistant",
                              "content": "..." or [{"type": "text", "text": "..."}, ...],
                              "weight": 0 or 1 (assistant only, optional)}, ...]}
               OpenAI's layout: developer is the system role; content given as text parts
               is their texts joined (as chat templates join them); an assistant message
               with "weight": 0 is context, not trained (tokenizer/chat.py)
    ShareGPT   {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}
               (also "user"/"assistant"/"chatgpt"; turns written with role/content read
               as chat)
    TRL        {"prompt": ..., "completion": ...}: strings (a user turn and the assistant's
               reply), or message lists (conversational); only the completion is trained,
               as TRL does, so assistant messages in the prompt get weight 0
    Alpaca     {"instruction": "...", "input": "..." (optional), "output": "..."}
    Dolly      {"instruction": "...", "context": "..." (optional), "response": "..."}

A top-level "system" string (LLaMA-Factory's layouts; any of the above) is the system
prompt, put first; a record that also starts with a system message is refused.
A system message may only come first; the last message must be the assistant's (the reply
to learn), and at least one assistant message must be trained. Alpaca and Dolly become
[user: instruction + "\\n\\n" + input/context, assistant: output/response]; input and context
must be strings when present (null counts as absent). Tool definitions, tool calls and
tool results (OpenAI's tools / tool_calls / role "tool", ShareGPT's function_call /
observation turns) are refused record by record, naming the feature: the chat format has no
place for them, and training on such a conversation without them would teach replies to
calls the model never saw. Images and other non-text parts are refused likewise.

Mixing. Several files, each with a weight: a file of n conversations with weight w
contributes round(w * n) of them per epoch: each conversation floor(w) times, plus a
seeded random subset for the fraction. Weight 1 is "as is", 2 doubles a small
high-quality set, 0.25 takes a quarter of a big one. Nothing to train on: UserError.

Examples. A conversation becomes one example (ids, mask) in the chat format
(tokenizer/chat.py), cut on the left to fit the context with its final reply kept;
conversations whose final reply does not fit are dropped (render_examples). A conversation
read from a file remembers where (`Conversation.where`, "path:line N"), so the cut and
dropped ones are reported by file and line. Batching is data/batching.py's work.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from errors import UserError
from tokenizer.chat import (
    ChatFormatError,
    fit_to_context,
    is_trained,
    render_conversation,
    validate_messages,
)

from .records import MAX_REPORTED, FileReport, file_entry, read_data_file


class Conversation(list):
    """A list of messages that remembers where it was read: `where` is "path:line N"
    ("path:index N" in a JSON array), or None for a conversation made in code."""

    where: str | None = None


# ---------------------------------------------------------------------------- messages

TOOL_ROLES = ("tool", "function", "ipython")
TOOL_KEYS = ("tool_calls", "function_call", "tool_call_id")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
}
SHAREGPT_TOOLS = ("function_call", "observation", "tool", "function")
NO_TOOLS = "tool calls are not supported (the chat format has no tool turns); leave it out"


def text_of(content, where: str) -> str:
    """A message's content as text: a string, or a list of text parts joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where} must have a string 'content' (or a list of text parts)")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"of type {kind!r}" if kind else repr(part)[:40]
            raise ValueError(f"{where} has a content part {what}; only text parts are supported")
        texts.append(part["text"])
    return "".join(texts)


def standard_messages(value, what: str = "messages") -> list[dict]:
    """OpenAI-style messages as {"role", "content"} dicts ("weight" kept when given):
    developer -> system, text parts joined; ValueError for tools, images, bad messages."""
    if not isinstance(value, list):
        raise ValueError(f"'{what}' must be a list of messages")
    out = []
    for i, m in enumerate(value):
        where = f"{what}[{i}]"
        if not isinstance(m, dict):
            raise ValueError(f"{where} must be an object with role and content")
        if m.get("role") in TOOL_ROLES or any(m.get(k) for k in TOOL_KEYS):
            raise ValueError(f"{where}: {NO_TOOLS}")
        role = "system" if m.get("role") == "developer" else m.get("role")
        message = {"role": role, "content": text_of(m.get("content"), f"{where} ({role})")}
        if "weight" in m:
            message["weight"] = m["weight"]
        out.append(message)
    try:
        validate_messages(out)
    except ChatFormatError as e:
        raise ValueError(f"'{what}': {e}") from None
    return out


def sharegpt_messages(turns) -> list[dict]:
    """ShareGPT's turns ({"from", "value"}) as messages."""
    if isinstance(turns, list) and turns and isinstance(turns[0], dict) and "role" in turns[0]:
        return standard_messages(turns, "conversations")  # written with role/content
    if not isinstance(turns, list):
        raise ValueError("'conversations' must be a list of turns")
    out = []
    for i, t in enumerate(turns):
        source = t.get("from") if isinstance(t, dict) else None
        if source in SHAREGPT_TOOLS:
            raise ValueError(f"conversations[{i}] is a {source} turn: {NO_TOOLS}")
        if source not in SHAREGPT_ROLES:
            roles = ", ".join(SHAREGPT_ROLES)
            raise ValueError(f"conversations[{i}] is from {source!r}; use one of {roles}")
        if not isinstance(t.get("value"), str):
            raise ValueError(f"conversations[{i}] must have a string 'value'")
        out.append({"role": SHAREGPT_ROLES[source], "content": t["value"]})
        if "weight" in t:
            out[-1]["weight"] = t["weight"]
    return standard_messages(out, "conversations")


def prompt_completion(record: dict) -> list[dict]:
    """TRL's prompt-completion record as messages; only the completion is trained."""
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    context = [
        {**m, "weight": 0} if m.get("role") == "assistant" else m
        for m in standard_messages(prompt, "prompt")
    ]
    return context + standard_messages(completion, "completion")


def alpaca_or_dolly(record: dict) -> list[dict]:
    """Alpaca (instruction, input, output) or Dolly (instruction, context, response)."""
    if "output" in record:
        extra_key, answer_key = "input", "output"
    elif "response" in record:
        extra_key, answer_key = "context", "response"
    else:
        raise ValueError("has 'instruction' but no 'output' (Alpaca) or 'response' (Dolly)")
    instruction, extra = record["instruction"], record.get(extra_key)
    extra = "" if extra is None else extra  # null: absent, as datasets writes missing values
    answer = record[answer_key]
    for key, value in (("instruction", instruction), (extra_key, extra), (answer_key, answer)):
        if not isinstance(value, str):
            raise ValueError(f"'{key}' must be a string, got {type(value).__name__} {value!r}")
    if not instruction.strip() or not answer.strip():
        raise ValueError(f"'instruction' and '{answer_key}' must not be empty")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


# ---------------------------------------------------------------------------- records


def _messages_of(record: dict) -> list[dict]:
    if record.get("tools") or record.get("functions"):
        raise ValueError(f"the record defines tools: {NO_TOOLS}")
    if "messages" in record:
        return standard_messages(record["messages"])
    if "conversations" in record:
        return sharegpt_messages(record["conversations"])
    if "prompt" in record:
        if "completion" not in record:
            raise ValueError(
                "has 'prompt' but no 'completion' (TRL's prompt-completion); a prompt alone "
                "is a PPO prompt (prompt_files), not a demonstration"
            )
        return prompt_completion(record)
    if "instruction" in record:
        return alpaca_or_dolly(record)
    keys = ", ".join(sorted(record)) or "none"
    raise ValueError(
        f"unknown format (keys: {keys}); expected chat (messages), ShareGPT (conversations), "
        "TRL (prompt, completion), Alpaca (instruction, input, output) or Dolly "
        "(instruction, context, response)"
    )


def with_system(record: dict, messages: list[dict]) -> list[dict]:
    """The messages after the record's top-level "system" prompt, when it has one (as
    LLaMA-Factory's ShareGPT and Alpaca layouts carry it); "" or null: none."""
    system = record.get("system")
    if system is None or system == "":
        return messages
    if not isinstance(system, str):
        raise ValueError(f"'system' must be a string, got {type(system).__name__}")
    if messages and messages[0]["role"] == "system":
        raise ValueError("has a system prompt both in 'system' and as the first message; keep one")
    return [{"role": "system", "content": system}, *messages]


def to_conversation(record) -> Conversation:
    """One record (any layout of the module docstring) as a conversation; ValueError says
    why not."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    messages = with_system(record, _messages_of(record))
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's (the reply to learn)")
    if not messages[-1]["content"].strip():
        raise ValueError("the assistant's last message is empty")
    if not any(is_trained(m) for m in messages):
        raise ValueError("every assistant message has weight 0: nothing to train on")
    return Conversation(messages)


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
    messages = [{"role": m["role"], "content": m["content"]} for m in standard_messages(messages)]
    messages = with_system(record, messages)
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


def read_instruction_file(
    path: str | Path, max_bad_fraction: float = 0.05, log: Callable[[str], None] = print
) -> FileReport:
    """The conversations of one instruction file, each knowing its file and line."""
    report = read_data_file(path, to_conversation, max_bad_fraction, log)
    for conversation, where in zip(report.items, report.wheres, strict=True):
        conversation.where = f"{path}:{where}"
    return report


# ---------------------------------------------------------------------------- mixing


def mix(parts: Sequence[tuple[Sequence, float]], seed: int = 0) -> list:
    """One list from (conversations, weight) parts: round(weight * n) of each part's n
    conversations (whole copies, then a seeded random subset for the fraction)."""
    rng = np.random.default_rng([seed, 0x31C])
    out: list = []
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
    setting: str = "files",
) -> list[Conversation]:
    """The mixture of the files listed in `sources` (the setting named `setting`): each a
    path, or {path, weight (default 1)}.

    Reads every file (see read_instruction_file), mixes them by weight, and logs what each
    contributed. UserError for a bad entry, or if there is nothing to train on.
    """
    parts = []
    for source in sources:
        path, options = file_entry(source, setting)
        weight = options.get("weight", 1.0)
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
    truncated_at: list[str] = field(default_factory=list)  # "path:line N" of those from files
    dropped_at: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.conversations} conversations -> {self.examples} examples "
            f"({self.truncated} truncated on the left, {self.dropped} dropped as longer than "
            f"the context), {self.tokens} tokens of which {self.trained_tokens} trained"
        )

    def details(self, block_size: int) -> list[str]:
        """One line per file conversation truncated or dropped (MAX_REPORTED of each)."""
        lines = []
        for places, what in (
            (self.truncated_at, f"cut on the left to fit the context ({block_size} tokens)"),
            (self.dropped_at, f"dropped: its last reply alone exceeds {block_size} tokens"),
        ):
            places = list(dict.fromkeys(places))  # a conversation mixed in twice: once
            lines += [f"{where}: {what}" for where in places[:MAX_REPORTED]]
            if len(places) > MAX_REPORTED:
                lines.append(f"... and {len(places) - MAX_REPORTED} more {what.split(':')[0]}")
        return lines


def render_examples(
    tok, conversations: Sequence[list[dict]], block_size: int
) -> tuple[list[tuple[list[int], list[int]]], RenderReport]:
    """(ids, mask) per conversation, fitted to block_size + 1 ids (x and y are block_size
    long); truncated and dropped conversations are counted, and those read from files
    listed by file and line. UserError if none is left."""
    examples, report = [], RenderReport(conversations=len(conversations))
    for conversation in conversations:
        where = getattr(conversation, "where", None)
        ids, mask = render_conversation(tok, conversation)
        fitted = fit_to_context(ids, mask, block_size + 1)
        if fitted is None or not any(fitted[1]):
            report.dropped += 1
            report.dropped_at += [where] if where else []
            continue
        if len(fitted[0]) < len(ids):
            report.truncated += 1
            report.truncated_at += [where] if where else []
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


def prompt_messages(item: dict) -> list[dict]:
    """The conversation of an item up to the reply the model must write (the final assistant
    answer is left out when the item carries it)."""
    messages = list(item["messages"])
    if messages and messages[-1].get("role") == "assistant":
        messages = messages[:-1]
    return messages


def reference_tokens(tok, item: dict) -> int:
    """Tokens of the reply that would match: the final assistant message, else the answer."""
    last = item["messages"][-1] if item["messages"] else {}
    reference = last["content"] if last.get("role") == "assistant" else item["answer"]
    return len(tok.encode(reference))


def reply_budgets(tok, items: Sequence[dict], max_new_tokens: int | None) -> list[int]:
    """The evaluation's reply budget per item: 2 * n + 8 tokens (n: reference_tokens), at
    most max_new_tokens if set. A reply that needs more than twice the reference and eight
    is not going to match it, and a model that never stops would otherwise run on."""
    budgets = [2 * reference_tokens(tok, item) + 8 for item in items]
    return [min(b, max_new_tokens) for b in budgets] if max_new_tokens else budgets
