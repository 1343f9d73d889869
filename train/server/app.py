"""The HTTP side: OpenAI's chat-completions API and the chat page, on FastAPI.

    GET  /                       the chat page (static/, shipped in the package)
    GET  /health                 {"status": "ok", "rows": .., "waiting": ..}: no key needed
    GET  /v1/models              the one model served, and GET /v1/models/{id}
    POST /v1/chat/completions    a chat.completion, or server-sent chunks (stream: true)

Every /v1 route wants `Authorization: Bearer <api_key>` when the server has a key. Errors
are OpenAI's body with the status that says what went wrong (schemas.APIError): 400 for
a body that is not JSON, a wrong field (pydantic's verdict, which FastAPI would answer
422) or a request beyond the limits; 401 a missing or wrong key; 404 another model; 413
a body over max_body_bytes; 429 a full queue, with Retry-After.

A request becomes a Plan (conversation.py), the Plan a Job for the engine (engine.py),
whose updates arrive in an asyncio queue. A client that goes away cancels its job: for a
stream Starlette cancels the response's generator when the connection closes; for a
plain reply a watcher waits for the disconnect message.
"""

import asyncio
import hmac
import json
from dataclasses import dataclass
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from . import schemas
from .conversation import Limits, Plan, plan_request
from .engine import Busy, Engine, Job, Update
from .schemas import APIError, ChatRequest

RETRY_AFTER_S = 1  # what a 429 asks the client to wait


@dataclass(frozen=True)
class ServerInfo:
    """What the app needs to know besides the engine."""

    model_name: str
    block_size: int
    limits: Limits
    api_key: str | None  # None: no key asked for
    max_body_bytes: int
    created: int  # when the server started (the model's "created")


def create_app(engine: Engine, info: ServerInfo) -> FastAPI:
    app = FastAPI(title="handgpt", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, max_bytes=info.max_body_bytes)
    add_error_handlers(app)
    static = resources.files("train.server") / "static"
    app.mount("/static", StaticFiles(packages=[("train.server", "static")]), name="static")

    async def authorized(request: Request) -> None:  # async: no thread for a comparison
        check_key(request.headers.get("authorization"), info.api_key)

    def card() -> dict:
        return schemas.model_card(
            info.model_name, info.created, info.block_size, info.limits.max_tokens
        )

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(str(static / "index.html"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": info.model_name, **engine.load()}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models() -> dict:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id}", dependencies=[Depends(authorized)])
    async def model(model_id: str) -> dict:
        check_model(model_id, info.model_name)
        return card()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatRequest, request: Request):
        check_model(body.model, info.model_name)
        # tokenizing a long conversation takes a while: not in the event loop
        plan = await asyncio.to_thread(plan_request, body, engine.tok, info.block_size, info.limits)
        job, updates = submit(engine, plan)
        reply = Reply(job, updates, plan, info.model_name, body)
        headers = {"X-Dropped-Messages": str(plan.dropped)}
        if body.stream:
            stream_headers = {**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(
                reply.events(), media_type="text/event-stream", headers=stream_headers
            )
        whole = await reply.whole(request)
        if whole is None:  # the client has gone: nobody reads this (nginx's "closed request")
            return JSONResponse({}, status_code=499)
        return JSONResponse(whole, headers=headers)

    return app


def check_key(header: str | None, api_key: str | None) -> None:
    """401 unless the Authorization header carries the key (compared in constant time, as
    bytes: compare_digest refuses strings with characters beyond ASCII)."""
    if api_key is None:
        return
    scheme, _, token = (header or "").partition(" ")
    same = hmac.compare_digest(token.strip().encode(), api_key.encode())
    if scheme.lower() != "bearer" or not same:
        raise APIError(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer <api_key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )


def check_model(name: str, served: str) -> None:
    if name != served:
        raise APIError(
            404,
            f"the model {name!r} does not exist here; this server has {served!r} (GET /v1/models)",
            param="model",
            code="model_not_found",
        )


def submit(engine: Engine, plan: Plan) -> tuple[Job, asyncio.Queue]:
    """Hand the plan to the engine; its updates come into the returned queue."""
    loop, updates = asyncio.get_running_loop(), asyncio.Queue()

    def post(batch: list[Update]) -> None:  # runs in the engine thread
        try:
            loop.call_soon_threadsafe(updates.put_nowait, batch)
        except RuntimeError:  # the loop has closed: the server is shutting down
            pass

    job = Job(plan, post)
    try:
        engine.submit(job)
    except Busy:
        raise APIError(
            429,
            "the server is busy (its queue is full); retry in a moment",
            kind="rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from None
    return job, updates


class Reply:
    """One request's reply as it arrives from the engine, in either of the two forms."""

    def __init__(
        self, job: Job, updates: asyncio.Queue, plan: Plan, model: str, body: ChatRequest
    ) -> None:
        self.job, self.updates, self.plan, self.model = job, updates, plan, model
        self.id, self.created = schemas.new_id(), schemas.now()
        self.with_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.finished: dict[int, str] = {}  # choice index -> finish_reason
        self.tokens = [0] * plan.n  # tokens written per choice

    async def next_updates(self) -> dict[int, Update]:
        """Every update that has come, merged per choice (what a slow reader missed comes
        at once: one chunk, not many); an engine error raises APIError."""
        batch = await self.updates.get()
        while not self.updates.empty():
            batch += self.updates.get_nowait()
        merged: dict[int, Update] = {}
        for u in batch:
            if u.error:
                raise APIError(500, u.error, kind="server_error", code="engine_error")
            m = merged.setdefault(u.index, Update(u.index, ""))
            m.text += u.text
            m.finish, m.tokens = u.finish or m.finish, max(m.tokens, u.tokens)
        for m in merged.values():
            self.tokens[m.index] = m.tokens
            if m.finish:
                self.finished[m.index] = m.finish
        return merged

    def usage(self) -> dict:
        return schemas.usage(len(self.plan.prompt), sum(self.tokens))

    async def whole(self, request: Request) -> dict | None:
        """The chat.completion, once every choice has ended; a client that goes away first
        cancels the job (None)."""
        texts = [""] * self.plan.n

        async def collect() -> None:
            while len(self.finished) < self.plan.n:
                for u in (await self.next_updates()).values():
                    texts[u.index] += u.text

        collecting = asyncio.ensure_future(collect())
        watching = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
            if not collecting.done():
                return None  # the client left
            collecting.result()  # an engine error raises here
        finally:
            self.job.cancelled = True  # a no-op once every choice has ended
            collecting.cancel()
            watching.cancel()
        finishes = [self.finished[i] for i in range(self.plan.n)]
        return schemas.chat_completion(
            self.id, self.created, self.model, texts, finishes, self.usage()
        )

    async def events(self):
        """Server-sent events: role deltas, content deltas, finish deltas, the usage
        (include_usage), [DONE]. Closing the connection cancels the job (finally)."""
        try:
            yield "".join(
                sse(self.chunk([schemas.delta(i, role=True)])) for i in range(self.plan.n)
            )
            while len(self.finished) < self.plan.n:
                try:
                    merged = await self.next_updates()
                except APIError as e:  # the stream has begun: the error is an event
                    yield sse(e.body())
                    return
                out = []
                for i in sorted(merged):
                    u = merged[i]
                    if u.text:
                        out.append(sse(self.chunk([schemas.delta(i, u.text)])))
                    if u.finish:
                        out.append(sse(self.chunk([schemas.delta(i, finish=u.finish)])))
                yield "".join(out)
            if self.with_usage:
                yield sse(self.chunk([], self.usage()))
            yield "data: [DONE]\n\n"
        finally:
            self.job.cancelled = True

    def chunk(self, choices: list[dict], use: dict | None = None) -> dict:
        return schemas.chunk(self.id, self.created, self.model, choices, self.with_usage, use)


def sse(obj: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --------------------------------------------------------------------------- errors, limits


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's body."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return await api_error(request, validation_error(e))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        code = "request_too_large" if e.status_code == 413 else None
        error = APIError(e.status_code, str(e.detail), code=code, headers=dict(e.headers or {}))
        return await api_error(request, error)


def validation_error(e: RequestValidationError) -> APIError:
    """pydantic's first complaint as one line naming the field: 400."""
    first = e.errors()[0]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON; send a JSON object")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    field = ".".join(loc) or None
    where = f"{field}: " if field else "the body: "
    return APIError(400, where + str(first.get("msg", "invalid")), param=field)


class BodyLimit:
    """ASGI middleware: a request body over max_bytes is answered 413 in OpenAI's body.

    A declared length over the limit is refused before the body is read; a body sent in
    chunks is counted as the route reads it, and refused the moment it passes the limit.
    (FastAPI's own max_body_size answers 413 in plain text.)
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def error(self) -> APIError:
        return APIError(
            413,
            f"the request body is over this server's limit of {self.max_bytes} bytes",
            code="request_too_large",
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            e = self.error()
            return await JSONResponse(e.body(), e.status)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:  # an HTTPException: FastAPI passes it to the handler
                raise HTTPException(413, self.error().message)
            return message

        await self.app(scope, counted, send)
