"""A chat request, checked against the server's limits, as a prompt and a budget.

    messages --(developer -> system)--> tokenizer/chat.py: drop_oldest_turns --> prompt ids

The conversation is rendered in the chat format SFT taught (tokenizer/chat.py), so text
that spells a control token stays text, and cut the way the terminal chat cuts it: the
prompt may use the context less room for the reply, min(max_tokens, block_size // 2); the
oldest turns go first, a system message stays (train/sample.py does the same). The number
of messages dropped goes back to the client in the X-Dropped-Messages header.

The reply's budget is the request's max_tokens (or max_completion_tokens; neither: the
server's limit), clamped to what is left of the context after the prompt: the reply then
ends with finish_reason "length". A prompt that leaves no room at all (the system message
and the last message alone fill the context) is answered 400 context_length_exceeded.

Decisions where the chat format is narrower than OpenAI's API:
  - "developer" is OpenAI's new name for "system" and is read as one;
  - a system message that is not the first is refused (400), not moved: moving it would
    change what the conversation says, and the client can move it itself;
  - content given as a list of text parts is their text joined; other parts: 400;
  - temperatures below 0.001 decode greedily (as 0 does): smaller ones only overflow.
"""

from dataclasses import dataclass

from tokenizer.chat import ChatFormatError, drop_oldest_turns

from .schemas import APIError, ChatRequest

MAX_STOPS = 4  # OpenAI's limit on stop strings
MAX_STOP_CHARS = 200  # per stop string: they are matched against the reply as it grows
MIN_TEMPERATURE = 1e-3  # below: greedy (train/settings.py: TEMPERATURE)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for: the server's settings (conf/serve.yaml)."""

    max_tokens: int  # per choice
    max_messages: int
    max_n: int


@dataclass(frozen=True)
class Plan:
    """What the engine is asked to do for one request."""

    prompt: list[int]
    max_tokens: int  # per choice, clamped to the context
    dropped: int  # messages cut from the start of the conversation
    n: int
    temperature: float
    top_p: float | None
    seed: int | None
    stops: tuple[str, ...]
    ignore_eos: bool = False  # the end-of-turn token does not end the reply (benchmarks)


def plan_request(req: ChatRequest, tok, block_size: int, limits: Limits) -> Plan:
    """Check `req` against the limits and render its prompt; APIError (400) when it asks
    for what this server does not give."""
    check_limits(req, limits)
    requested = req.max_completion_tokens or req.max_tokens or limits.max_tokens
    messages = chat_messages(req)
    budget = block_size - min(requested, block_size // 2)  # as train/sample.py: chat
    try:
        prompt, kept = drop_oldest_turns(tok, messages, budget)
    except ChatFormatError as e:
        raise APIError(400, f"the conversation cannot be rendered: {e}", param="messages") from e
    if len(prompt) >= block_size:
        raise APIError(
            400,
            f"the conversation needs {len(prompt)} tokens even with the older turns dropped "
            f"(the system message and the last message), but this model's context is "
            f"{block_size} tokens and a reply needs at least one; shorten the last message",
            param="messages",
            code="context_length_exceeded",
        )
    temperature = 1.0 if req.temperature is None else req.temperature
    return Plan(
        prompt=prompt,
        max_tokens=min(requested, block_size - len(prompt)),
        dropped=len(messages) - len(kept),
        n=req.n,
        temperature=0.0 if temperature < MIN_TEMPERATURE else temperature,
        top_p=req.top_p,
        seed=req.seed,
        stops=tuple(req.stop_strings()),
        ignore_eos=req.ignore_eos,
    )


def check_limits(req: ChatRequest, limits: Limits) -> None:
    """The limits of the server's settings, each a 400 naming the field."""
    if len(req.messages) > limits.max_messages:
        raise APIError(
            400,
            f"{len(req.messages)} messages; this server takes at most {limits.max_messages}",
            param="messages",
        )
    if req.n > limits.max_n:
        raise APIError(400, f"n is {req.n}; this server gives at most {limits.max_n}", param="n")
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(req, name)
        if value is not None and value > limits.max_tokens:
            raise APIError(
                400,
                f"{name} is {value}; this server writes at most {limits.max_tokens} tokens "
                "per reply",
                param=name,
            )
    stops = req.stop_strings()
    if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(
            400,
            f"stop takes up to {MAX_STOPS} strings of up to {MAX_STOP_CHARS} characters",
            param="stop",
        )


def chat_messages(req: ChatRequest) -> list[dict]:
    """The request's messages as tokenizer/chat.py's dicts; a misplaced system message: 400."""
    messages = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if role == "system" and i != 0:
            raise APIError(
                400,
                f"message {i} is a {m.role} message, but this model's chat format has one "
                "system message, the first; put it at the start of the conversation",
                param=f"messages.{i}.role",
            )
        messages.append({"role": role, "content": m.text()})
    return messages
