"""Preference data: which of two replies to the same conversation is better.

What the reward model (and DPO) learn from is a group: one prompt (the conversation up to
the reply), the distinct responses to it, and the pairs among them whose order is known:

    PreferenceGroup(prompt=[messages], responses=[[assistant message(s)], ...],
                    pairs=[(better, worse), ...], task="...", scores=[...] or None)

Layouts read (JSON or JSONL, recognised record by record; a malformed record is reported
with its file and line and skipped, under the max_bad_fraction rule of instruction files):
    pairs     {"prompt", "chosen", "rejected"}: each a string or a message list (TRL's
              standard and conversational forms, multi-turn prompts allowed); chosen and
              rejected may also be whole conversations that start with the prompt
              (UltraFeedback's layout): the prompt is read once, with whatever else both
              share at the start; without "prompt", chosen and rejected are whole
              conversations and the messages they share at the start are the prompt
    HH        {"chosen", "rejected"} as Anthropic HH's transcripts ("\\n\\nHuman: ..."
              "\\n\\nAssistant: ..."): the turns both share are the prompt, the final
              Assistant turns are the two responses
    ranked    {"prompt", "responses": [...], "scores": [...]}: every pair with different
              scores, the higher-scored response preferred
Optional keys: "task" (the name per-task figures use; default the file's stem) and
"chosen_score" / "rejected_score", or "score_chosen" / "score_rejected" as TRL and
UltraFeedback spell them (a labeller's scores, on its own scale, kept for the reports).

Records of one file with the same prompt merge into one group, each distinct response
once, so the reward model runs each response through the model once and compares all
pairs of a prompt in the same batch (InstructGPT's K-wise batching). A comparison given
twice is merged; a pair given both ways (a over b, and b over a) is dropped, both ways;
each file's line in the log says how many of each. Text is only ever text: control
tokens typed in a message stay ordinary characters (tokenizer/chat.py).
"""

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from errors import UserError
from tokenizer.chat import ChatFormatError, fit_to_context, render_conversation, validate_messages

from .batching import pad_rows
from .instruct import mix, standard_messages
from .records import file_entry, read_data_file

Messages = list[dict]
# the two spellings of a pair's scores: ours, and TRL's and UltraFeedback's
SCORE_KEYS = (("chosen_score", "rejected_score"), ("score_chosen", "score_rejected"))


@dataclass
class PreferenceGroup:
    prompt: Messages
    responses: list[Messages] = field(default_factory=list)
    pairs: list[tuple[int, int]] = field(default_factory=list)  # (better, worse) indices
    task: str = ""
    scores: list[float | None] = field(default_factory=list)  # per response, when known

    def add(self, response: Messages, score: float | None = None) -> int:
        """The index of `response`, added if it is new."""
        key = _key(response)
        for i, known in enumerate(self.responses):
            if _key(known) == key:
                return i
        self.responses.append(response)
        self.scores.append(score)
        return len(self.responses) - 1


def _key(messages: Messages) -> str:
    return json.dumps([(m["role"], m["content"]) for m in messages])


# ------------------------------------------------------------------------------ records


def as_messages(value, role: str, what: str) -> Messages:
    """A string (one message of `role`) or a message list, checked."""
    if isinstance(value, str):
        value = [{"role": role, "content": value}]
    elif not isinstance(value, list):
        raise ValueError(f"'{what}' must be a string or a list of messages")
    messages = standard_messages(value, what)  # developer, text parts; no tools
    return [{"role": m["role"], "content": m["content"]} for m in messages]


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def hh_messages(transcript: str) -> Messages:
    """An Anthropic HH transcript as messages: "\\n\\nHuman: hi\\n\\nAssistant: hello"."""
    parts = _HH_TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError("not an HH transcript (no '\\n\\nHuman: ' turn at the start)")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[r], "content": c} for r, c in zip(parts[1::2], parts[2::2], strict=True)]


def split_shared(a: Messages, b: Messages) -> tuple[Messages, Messages, Messages]:
    """(the messages a and b share at the start, the rest of a, the rest of b)."""
    n = 0
    while n < min(len(a), len(b)) - 1 and _key(a[n : n + 1]) == _key(b[n : n + 1]):
        n += 1
    return a[:n], a[n:], b[n:]


def after_prompt(
    prompt: Messages, chosen: Messages, rejected: Messages
) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen, rejected) where chosen and rejected may be whole conversations
    that repeat the prompt (UltraFeedback's layout): the prompt is then taken off them,
    and whatever else they share at the start joins it. So the prompt is the replies'
    shared start, read once."""
    rests = []
    for what, response in (("chosen", chosen), ("rejected", rejected)):
        n = len(prompt)
        if len(response) > n and _key(response[:n]) == _key(prompt):
            response = response[n:]
        elif response and response[0]["role"] != "assistant":
            raise ValueError(
                f"'{what}' starts with a {response[0]['role']} turn but not with the prompt; "
                "give the reply alone, or the whole conversation starting with the prompt"
            )
        rests.append(response)
    shared, chosen, rejected = split_shared(*rests)
    return prompt + shared, chosen, rejected


def _check_response(response: Messages, what: str) -> None:
    """A response ends with the assistant's reply. An empty reply is a reply (the
    end-of-turn token alone): the SFT model writes some, and DPO must read the file the
    reward model learned from as the reward model did."""
    if not response or response[-1]["role"] != "assistant":
        raise ValueError(f"'{what}' must end with the assistant's reply")


def comparisons(record, default_task: str) -> list[tuple]:
    """(prompt, better, worse, task, better_score, worse_score) for each comparison a
    record holds; ValueError says why a record holds none."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    task = record.get("task", default_task)
    if not isinstance(task, str):
        raise ValueError("'task' must be a string")
    if "responses" in record:
        return _ranked(record, task)
    if "chosen" not in record or "rejected" not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise ValueError(
            f"unknown format (keys: {keys}); expected prompt/chosen/rejected, HH "
            "chosen/rejected transcripts, or prompt/responses/scores"
        )
    prompt, chosen, rejected = _pair(record)
    for what, response in (("chosen", chosen), ("rejected", rejected)):
        _check_response(response, what)
    if _key(chosen) == _key(rejected):
        raise ValueError("chosen and rejected are the same reply")
    validate_messages(prompt + chosen)  # the whole conversation must be well-formed
    return [(prompt, chosen, rejected, task, *_scores(record))]


def _scores(record: dict) -> tuple[float | None, float | None]:
    """(chosen's score, rejected's score), each None when not given; spelled ours
    (chosen_score) or TRL's and UltraFeedback's (score_chosen), not both."""
    spellings = [keys for keys in SCORE_KEYS if any(k in record for k in keys)]
    if len(spellings) > 1:
        raise ValueError("has both 'chosen_score' and 'score_chosen'; keep one spelling")
    keys = spellings[0] if spellings else SCORE_KEYS[0]
    for key in keys:
        value = record.get(key)
        if value is not None and not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ):
            raise ValueError(f"'{key}' must be a number, got {value!r}")
    return record.get(keys[0]), record.get(keys[1])


def _pair(record: dict) -> tuple[Messages, Messages, Messages]:
    chosen, rejected = record["chosen"], record["rejected"]
    if "prompt" in record:
        return after_prompt(
            as_messages(record["prompt"], "user", "prompt"),
            as_messages(chosen, "assistant", "chosen"),
            as_messages(rejected, "assistant", "rejected"),
        )
    if isinstance(chosen, str) and isinstance(rejected, str):  # HH transcripts
        chosen, rejected = hh_messages(chosen), hh_messages(rejected)
    else:
        chosen = as_messages(chosen, "assistant", "chosen")
        rejected = as_messages(rejected, "assistant", "rejected")
    return split_shared(chosen, rejected)


def _ranked(record: dict, task: str) -> list[tuple]:
    responses, scores = record.get("responses"), record.get("scores")
    if not isinstance(responses, list) or not isinstance(scores, list):
        raise ValueError("'responses' and 'scores' must be lists")
    if len(responses) != len(scores) or len(responses) < 2:
        raise ValueError("need as many scores as responses, and at least two of each")
    if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
        raise ValueError("'scores' must be numbers")
    prompt = as_messages(record.get("prompt"), "user", "prompt")
    replies = [as_messages(r, "assistant", f"responses[{i}]") for i, r in enumerate(responses)]
    for i, reply in enumerate(replies):
        _check_response(reply, f"responses[{i}]")
    out = [
        (prompt, replies[i], replies[j], task, scores[i], scores[j])
        for i in range(len(replies))
        for j in range(len(replies))
        if scores[i] > scores[j]
    ]
    if not out:
        raise ValueError("all responses have the same score: no preference to learn")
    return out


# ------------------------------------------------------------------------------ groups


@dataclass
class MergeReport:
    """What merging one file's comparisons did (read_preference_file logs it)."""

    records: int = 0
    comparisons: int = 0  # what the records held (a ranked record holds several)
    duplicates: int = 0  # a comparison given again: merged into the first
    contradicting: int = 0  # pairs given both ways (a over b, and b over a): dropped
    kept: int = 0  # the comparisons left
    prompts: int = 0

    def summary(self, path) -> str:
        line = (
            f"{path}: {self.records} records ({self.comparisons} comparisons) -> "
            f"{self.kept} comparisons of {self.prompts} prompts"
        )
        if self.duplicates:
            line += f"; {self.duplicates} duplicates merged"
        if self.contradicting:
            line += f"; {self.contradicting} pairs given both ways (contradicting) dropped"
        return line


def group_comparisons(items: Sequence[tuple]) -> tuple[list[PreferenceGroup], MergeReport]:
    """Comparisons with the same prompt merged into one group, in first-seen order, each
    pair once. A pair given both ways carries no preference (the labels contradict each
    other, whichever is counted more often): both directions are dropped, and a group
    left without a pair with them."""
    groups: dict[str, PreferenceGroup] = {}
    report = MergeReport(comparisons=len(items))
    for prompt, better, worse, task, better_score, worse_score in items:
        group = groups.setdefault(_key(prompt), PreferenceGroup(prompt, task=task))
        pair = (group.add(better, better_score), group.add(worse, worse_score))
        if pair in group.pairs:
            report.duplicates += 1
        else:
            group.pairs.append(pair)
    for group in groups.values():
        both_ways = {(a, b) for a, b in group.pairs if (b, a) in group.pairs}
        report.contradicting += len(both_ways) // 2
        group.pairs = [pair for pair in group.pairs if pair not in both_ways]
    kept = [g for g in groups.values() if g.pairs]
    report.kept, report.prompts = sum(len(g.pairs) for g in kept), len(kept)
    return kept, report


def read_preference_file(
    path: str | Path, max_bad_fraction: float = 0.05, log: Callable[[str], None] = print
) -> list[PreferenceGroup]:
    """The groups of one file in any of the layouts above; logs what it read and merged."""
    task = Path(path).stem

    def parse(record):
        try:
            return comparisons(record, task)
        except ChatFormatError as e:
            raise ValueError(str(e)) from None

    report = read_data_file(path, parse, max_bad_fraction, log, what="preference data")
    groups, merged = group_comparisons([c for found in report.items for c in found])
    merged.records = report.records
    log(merged.summary(path))
    return groups


def load_preference_data(
    sources: Sequence,
    max_bad_fraction: float = 0.05,
    seed: int = 0,
    log=print,
    setting: str = "files",
) -> list[PreferenceGroup]:
    """The groups of several files, each a path or {path, weight}, mixed by weight."""
    parts = []
    for source in sources:
        path, options = file_entry(source, setting)
        weight = options.get("weight", 1.0)
        parts.append((read_preference_file(path, max_bad_fraction, log), weight))
    groups = mix(parts, seed)
    if not groups:
        raise UserError("no preference data: the files and weights give no comparison")
    return groups


def pair_records(group: PreferenceGroup) -> list[dict]:
    """The group in the pair layout (one record per pair), scores included when known."""
    records = []
    for better, worse in group.pairs:
        record = {
            "task": group.task,
            "prompt": group.prompt,
            "chosen": group.responses[better],
            "rejected": group.responses[worse],
        }
        if group.scores[better] is not None:
            record["chosen_score"] = group.scores[better]
            record["rejected_score"] = group.scores[worse]
        records.append(record)
    return records


# ------------------------------------------------------------------------------ batches


@dataclass
class RenderedGroup:
    """A group in token ids: per response (ids, mask) of prompt + response, the mask 1 on
    the response's assistant tokens only; pairs index into rows."""

    rows: list[tuple[list[int], list[int]]]
    pairs: list[tuple[int, int]]
    task: str
    scores: list[float | None]
    ref_logps: list[float] | None = None  # DPO: the reference's log pi_ref(response | prompt)

    @property
    def length(self) -> int:
        return max(len(ids) for ids, _ in self.rows)


def render_group(tok, group: PreferenceGroup, block_size: int) -> RenderedGroup | None:
    """The group rendered in the chat format, each row at most block_size ids (cut on the
    left, the response kept); responses whose own tokens do not fit are left out, with
    their pairs. None when no pair is left."""
    start = len(render_conversation(tok, group.prompt)[0]) if group.prompt else 1
    rows, index = [], {}
    for i, response in enumerate(group.responses):
        ids, mask = render_conversation(tok, group.prompt + response)
        mask = [0] * start + mask[start:]  # only the response's own assistant tokens
        fitted = fit_to_context(ids, mask, block_size)
        if fitted is not None and any(fitted[1]):
            index[i] = len(rows)
            rows.append(fitted)
    pairs = [(index[a], index[b]) for a, b in group.pairs if a in index and b in index]
    if not pairs:
        return None
    scores = [group.scores[i] for i in index]
    return RenderedGroup(rows, pairs, group.task, scores)


def collate_groups(groups: Sequence[RenderedGroup], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of groups: all their rows padded on the right into one tensor.

    ids      (R, T)  every response of every group, prompt included, pad_id after
    lengths  (R,)    real tokens per row (the reward is read at lengths - 1)
    mask     (R, T)  1 on the tokens of the response itself (DPO's log-probabilities)
    better, worse (P,)  the rows of each pair; group (P,): which group it belongs to
    gap      (P,)    score(better) - score(worse) when both are known (the judge's), else 0
    """
    rows, better, worse, owner, gap, offset = [], [], [], [], [], 0
    for g, group in enumerate(groups):
        rows += group.rows
        for a, b in group.pairs:
            better.append(offset + a)
            worse.append(offset + b)
            owner.append(g)
            known = group.scores[a] is not None and group.scores[b] is not None
            gap.append(group.scores[a] - group.scores[b] if known else 0.0)
        offset += len(group.rows)
    ids, lengths = pad_rows([r for r, _ in rows], pad_id)  # (R, T), (R,)
    mask, _ = pad_rows([m for _, m in rows], 0)  # (R, T)
    as_long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    batch = {
        "ids": ids,
        "lengths": lengths,
        "mask": mask,
        "better": as_long(better),
        "worse": as_long(worse),
        "group": as_long(owner),
        "gap": torch.tensor(gap, dtype=torch.float32),
    }
    if all(g.ref_logps is not None for g in groups):  # DPO's, computed once before training
        batch["ref_logps"] = torch.tensor([lp for g in groups for lp in g.ref_logps])  # (R,)
    return batch
