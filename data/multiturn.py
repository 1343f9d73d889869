"""Conversations of several built-in questions, so that a chat model holds a conversation.

A model tuned on single questions only answers the first question of a chat and then loses
the thread (it echoes earlier replies), and stumbles over a system line it never saw. So
the built-in set (data/tasks.py) also asks its questions inside conversations:

training    a share (`multi_turn`) of the training items is chained into conversations of
            2 or 3 questions, in random order; each answer depends only on its own
            question, and every answer is trained. A share (`system_share`) of all the
            training conversations opens with a system line (TRAIN_SYSTEM_LINES).
held out    `n_test_turns` held-out items of each task are asked again, as the 2nd or 3rd
            question (alternately) of a conversation whose earlier questions are other
            held-out items, given with their reference answers (weight 0: context only,
            so the held-out loss counts the last answer alone). A share (`system_share`)
            of these open with a system line never used in training
            (HELD_OUT_SYSTEM_LINES). Every item keeps its task, answer and source, and
            says its position ("turn"), so task_eval scores answers 1, 2 and 3 apart and
            compares each later answer with the same item asked alone.

Held out the same way: a held-out conversation holds held-out items only, a training one
training items only (their sources split as data/tasks.py says).

Length: a conversation's messages hold at most MAX_CHARS characters, so that it fits the
tiny model's 128-token context in the chat format (about 4 characters per token with the
Shakespeare tokenizer: 300 characters and 3 turns' control tokens are about 95 tokens).
"""

from collections.abc import Sequence

import numpy as np

TRAIN_SYSTEM_LINES = (
    "You are a helpful assistant.",
    "Answer briefly.",
    "You know Shakespeare's plays well.",
    "Give only the answer.",
    "Be exact.",
    "You are a careful reader of verse.",
)
HELD_OUT_SYSTEM_LINES = ("You are a friendly assistant.", "Keep your answers short.")
MAX_CHARS = 300


def length(item: dict) -> int:
    """Characters in an item's messages."""
    return sum(len(m["content"]) for m in item["messages"])


def chain(items: Sequence[dict], system: str | None = None, context_only: bool = False) -> dict:
    """One conversation asking the items' questions in turn; the item of its last question
    (task, answer, source), with "turn" its position. context_only: the earlier answers
    get weight 0 (not trained, not in the held-out loss)."""
    messages = [{"role": "system", "content": system}] if system else []
    for i, item in enumerate(items):
        question, answer = item["messages"][-2:]
        if context_only and i < len(items) - 1:
            answer = {**answer, "weight": 0}
        messages += [question, answer]
    last = items[-1]
    return {**last, "messages": messages, "turn": len(items), "system": bool(system)}


def training_conversations(
    items: Sequence[dict], multi_turn: float, system_share: float, rng: np.random.Generator
) -> list[dict]:
    """The training items as conversations: multi_turn of them chained 2 or 3 at a time
    (within MAX_CHARS), the rest alone; system_share of all open with a system line."""
    order = rng.permutation(len(items))
    n_chained = round(multi_turn * len(items))
    chained, alone = order[:n_chained], order[n_chained:]
    groups = [[items[i]] for i in alone]
    start = 0
    while start < len(chained):
        group = [items[chained[start]]]
        wanted = int(rng.integers(2, 4))
        while len(group) < wanted and start + len(group) < len(chained):
            candidate = items[chained[start + len(group)]]
            if sum(map(length, group)) + length(candidate) > MAX_CHARS and len(group) >= 2:
                break
            group.append(candidate)
        groups.append(group)
        start += len(group)
    out = []
    for group in groups:
        system = None
        if rng.random() < system_share:
            system = TRAIN_SYSTEM_LINES[rng.integers(len(TRAIN_SYSTEM_LINES))]
        out.append(chain(group, system) if len(group) > 1 or system else group[0])
    return out


def held_out_turns(
    test: Sequence[dict], n_per_task: int, system_share: float, rng: np.random.Generator
) -> list[dict]:
    """n_per_task held-out items of each task asked as the 2nd or 3rd question (in turn)
    after other held-out items, with their reference answers as context."""
    lengths = np.array([length(item) for item in test])
    out = []
    for task in dict.fromkeys(item["task"] for item in test):
        targets = [i for i, item in enumerate(test) if item["task"] == task][:n_per_task]
        for k, target in enumerate(targets):
            before = _fillers(lengths, target, 1 + k % 2, rng)
            system = None
            if rng.random() < system_share:
                system = HELD_OUT_SYSTEM_LINES[rng.integers(len(HELD_OUT_SYSTEM_LINES))]
            out.append(chain([*(test[i] for i in before), test[target]], system, True))
    return out


def _fillers(lengths: np.ndarray, target: int, n: int, rng: np.random.Generator) -> list[int]:
    """Indices of n other items to ask before the target, drawn at random among those that
    keep the conversation within MAX_CHARS (the shortest ones when none does)."""
    chosen: list[int] = []
    for _ in range(n):
        room = MAX_CHARS - lengths[target] - lengths[chosen].sum()
        free = np.ones(len(lengths), dtype=bool)
        free[[target, *chosen]] = False
        fits = np.flatnonzero(free & (lengths <= room))
        if len(fits) == 0:
            fits = np.flatnonzero(free)[np.argsort(lengths[free], kind="stable")[:1]]
        chosen.append(int(fits[rng.integers(len(fits))]))
    return chosen
