"""OpenAI's wire format: the request body as pydantic models, the replies as dicts.

Only what this server does is modelled; other fields of OpenAI's API (tools, logprobs,
response_format, ...) are ignored, as OpenAI-compatible servers do, so that clients that
send them still work. One field is not OpenAI's: ignore_eos (as vLLM has it; the openai
client sends it with extra_body={"ignore_eos": True}) lets a reply run past its end of turn
to max_tokens, for benchmarks that want replies of one length. Limits that depend on the
server's settings (how many messages, how many tokens) are checked in
train/server/conversation.py, not here.

    request:  {"model": ..., "messages": [{"role": ..., "content": ...}], "max_tokens": ...,
               "temperature": ..., "top_p": ..., "n": ..., "stop": ..., "seed": ...,
               "stream": ..., "stream_options": {"include_usage": ...}}
    reply:    chat.completion (chat_completion), or server-sent chat.completion.chunk
              objects (chunk), then "data: [DONE]"
    errors:   {"error": {"message", "type", "param", "code"}} (APIError.body)
"""

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class APIError(Exception):
    """An answer in OpenAI's error body: the HTTP status, one line, and what it is about."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers or {}

    def body(self) -> dict:
        error = {"message": self.message, "type": self.kind, "param": self.param}
        return {"error": {**error, "code": self.code}}


# --------------------------------------------------------------------------- the request


class TextPart(BaseModel):
    """One part of a message's content given as a list: only text parts are understood."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, tool_calls, ...: ignored
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's new system
    content: str | list[TextPart]

    def text(self) -> str:
        """The content as one string: the text parts joined as they are."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The body of POST /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name, preferred
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # not OpenAI's (vLLM's): write max_tokens, past the end of turn

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


# --------------------------------------------------------------------------- the replies


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion(
    id_: str, created: int, model: str, texts: list[str], finishes: list[str], use: dict
) -> dict:
    """The whole reply: one choice per text, in order."""
    choices = [
        {
            "index": i,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
            "logprobs": None,
        }
        for i, (text, finish) in enumerate(zip(texts, finishes, strict=True))
    ]
    return {
        "id": id_,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": use,
    }


def chunk(
    id_: str,
    created: int,
    model: str,
    choices: list[dict],
    with_usage: bool,
    use: dict | None = None,
) -> dict:
    """One streamed event. choices: [{"index", "delta", "finish_reason"}]; with_usage
    (stream_options.include_usage): every chunk has "usage", null but in the last one."""
    out = {
        "id": id_,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
    }
    if with_usage:
        out["usage"] = use
    return out


def delta(index: int, content: str | None = None, finish: str | None = None, role=False) -> dict:
    """One choice of a chunk: the first carries the role, the last the finish_reason."""
    d = {"role": "assistant", "content": ""} if role else {}
    if content:
        d["content"] = content
    return {"index": index, "delta": d, "finish_reason": finish, "logprobs": None}


def model_card(name: str, created: int, context: int, max_tokens: int) -> dict:
    """An entry of GET /v1/models; context_length and max_tokens are this server's extras
    (the page shows them)."""
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "handgpt",
        "context_length": context,
        "max_tokens": max_tokens,
    }


def now() -> int:
    return int(time.time())
