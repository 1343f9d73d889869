"""The chat format: one conversation -> token ids and a loss mask.

SFT training, evaluation and the chat CLI all render conversations with these functions,
so the model is always asked in exactly the format it was taught in.

A conversation is a list of messages, each {"role": ..., "content": ...}:

    [{"role": "system", "content": "Be brief."},        # optional, first only
     {"role": "user", "content": "Who is Polonius?"},
     {"role": "assistant", "content": "A lord."}, ...]

It is rendered with the tokenizer's control tokens, which no text can produce (encode()
never emits them), so a message cannot forge a turn:

    <bos> <system> enc(system text) <end> <user> enc(question) <end> <assistant> enc(reply) <end>
      0      0           0            0     0         0          0        0          1       1

The second row is the loss mask: 1 exactly on the assistant's content tokens and the <end>
that closes its turn (the model must learn when to stop), 0 on everything else. For
training, targets where the mask is 0 become -100 (data/batching.py: collate). An assistant
message with "weight": 0 (OpenAI's fine-tuning format) is context only: rendered the same,
mask 0, so that turn is not trained ("weight": 1, or none, trains it).

To ask for a reply, render_prompt renders the history and appends <assistant>; the model
writes the reply and ends it with <end> (the stop id for generation).
"""

from collections.abc import Sequence

ROLES = ("system", "user", "assistant")


class ChatFormatError(ValueError):
    """A conversation that cannot be rendered: not a list of messages, an unknown role,
    a system message that is not first, or content that is not a string. The message says
    which message is wrong; callers turn it into a UserError or skip the record."""


def _role_id(tok, role: str) -> int:
    return {"system": tok.system_id, "user": tok.user_id, "assistant": tok.assistant_id}[role]


def validate_messages(messages) -> None:
    """Raise ChatFormatError unless `messages` is a list of well-formed messages.

    Rules: a list of dicts, each with "role" in ROLES and "content" a string; "system"
    may only be the first message; "weight", when present, is 0 or 1 and only on an
    assistant message. Other keys in a message are ignored.
    """
    if not isinstance(messages, (list, tuple)):
        raise ChatFormatError(f"a conversation must be a list of messages, got {type(messages)}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"message {i} must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"message {i} has role {role!r}; use one of {', '.join(ROLES)}")
        if role == "system" and i != 0:
            raise ChatFormatError(f"message {i} is a system message; only the first may be")
        if not isinstance(m.get("content"), str):
            raise ChatFormatError(f"message {i} ({role}) must have a string 'content'")
        if "weight" in m and not (role == "assistant" and is_weight(m["weight"])):
            raise ChatFormatError(
                f"message {i} ({role}) has weight {m['weight']!r}; a weight is 0 (not trained) "
                "or 1 (trained), and only on an assistant message"
            )


def is_weight(value) -> bool:
    """0 or 1, the values OpenAI's per-message training weight may take."""
    return value in (0, 1) and not isinstance(value, bool)


def is_trained(message: dict) -> bool:
    """Whether the loss covers a message: an assistant's, unless its weight is 0."""
    return message["role"] == "assistant" and message.get("weight", 1) != 0


def render_conversation(tok, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 loss mask (same length) for a whole conversation.

    ids:  bos, then per message: role id, encode(content), end id.
    mask: 1 on each trained assistant message's content tokens and its end id (is_trained:
          every assistant message but those with weight 0), 0 elsewhere.
    Raises ChatFormatError for an empty or malformed conversation.
    """
    validate_messages(messages)
    if not messages:
        raise ChatFormatError("a conversation needs at least one message")
    return _render(tok, messages)


def render_prompt(tok, messages: Sequence[dict]) -> list[int]:
    """Ids that prime the model for the next assistant reply.

    The history rendered exactly as render_conversation does, then the assistant role id.
    Generation should stop at tok.end_id. An empty history gives [bos, assistant].
    """
    validate_messages(messages)
    ids, _ = _render(tok, messages)
    return ids + [tok.assistant_id]


def _render(tok, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    """The one rendering loop, for valid messages: bos, then per message its role id,
    content and end id; the mask 1 on a trained assistant's content and end id, else 0."""
    ids, mask = [tok.bos_id], [0]
    for m in messages:
        piece = _message_ids(tok, m)  # role id, content, end of turn
        trained = 1 if is_trained(m) else 0
        ids += piece
        mask += [0] + [trained] * (len(piece) - 1)
    return ids, mask


def _message_ids(tok, m: dict) -> list[int]:
    """One message's ids: its role id, its content and the end of its turn."""
    return [_role_id(tok, m["role"])] + tok.encode(m["content"]) + [tok.end_id]


def drop_oldest_turns(tok, messages: Sequence[dict], budget: int) -> tuple[list[int], list[dict]]:
    """The prompt for the next reply (render_prompt) and the messages it renders, the
    oldest turns dropped until it is at most `budget` ids long.

    A system message (first) is kept; after it the oldest messages go, one at a time and
    then up to the next user message (a conversation resumes with a user turn), until the
    prompt fits or only the newest message is left: the result may then still be longer
    than `budget`, and the caller decides (the terminal chat crops its start, the server
    answers that the conversation does not fit). `messages` is not changed. Each message
    is encoded once (the server's conversations may be long).
    Raises ChatFormatError for a malformed conversation (render_prompt).
    """
    validate_messages(messages)
    pieces = [_message_ids(tok, m) for m in messages]
    first = 1 if messages and messages[0]["role"] == "system" else 0
    start = first  # messages[first:start] are dropped
    length = 2 + sum(map(len, pieces))  # bos ... assistant
    while length > budget and len(messages) - start > 1:
        length -= len(pieces[start])  # the oldest message after the system one
        start += 1
        while len(messages) - start > 1 and messages[start]["role"] != "user":
            length -= len(pieces[start])
            start += 1
    kept = list(messages[:first]) + list(messages[start:])
    ids = [tok.bos_id] + [i for piece in pieces[:first] + pieces[start:] for i in piece]
    return ids + [tok.assistant_id], kept


def fit_to_context(
    ids: Sequence[int], mask: Sequence[int], max_len: int
) -> tuple[list[int], list[int]] | None:
    """Make a rendered conversation at most max_len ids long, keeping its final reply.

    - Fits already: returned unchanged (as lists).
    - Too long: the first id (bos) is kept and the oldest ids after it are cut, so the
      result is ids[0] + the last max_len - 1 ids. The final assistant reply (its role id,
      content and end id) is always inside the kept tail. The history therefore starts
      mid-message; if the cut removes an earlier assistant reply's role id, that reply's
      remaining tokens are no longer trained (mask set to 0), since their start is gone.
    - Even bos + the final reply do not fit: None, and the caller drops the conversation.

    The final reply is the last run of mask-1 ids together with the role id just before it.
    A conversation with no trained ids has no reply to keep: it is cut the same way.
    For training, pass max_len = block_size + 1 (inputs are ids[:-1], targets ids[1:]).
    """
    if len(ids) != len(mask):
        raise ValueError(f"ids and mask differ in length ({len(ids)} vs {len(mask)})")
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2, got {max_len}")
    ids, mask = list(ids), list(mask)
    if len(ids) <= max_len:
        return ids, mask
    trained = [i for i, m in enumerate(mask) if m]
    if trained:
        start = trained[-1]  # walk back over the last run of trained ids to its role id
        while start > 0 and mask[start - 1]:
            start -= 1
        reply_start = max(start - 1, 1)
        if 1 + len(ids) - reply_start > max_len:
            return None
    cut = len(ids) - (max_len - 1)  # first kept id after bos
    tail_ids, tail_mask = ids[cut:], mask[cut:]
    j = 0  # a reply whose role id was cut off is no longer trained
    while j < len(tail_mask) and tail_mask[j]:
        tail_mask[j] = 0
        j += 1
    return [ids[0]] + tail_ids, [mask[0]] + tail_mask
