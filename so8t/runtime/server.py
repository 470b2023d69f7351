"""OpenAI-compatible HTTP API for the agent (FastAPI + uvicorn).

Endpoints (all but ``/healthz`` need an API key, ``Authorization: Bearer <key>``
or ``X-API-Key: <key>``):

* ``POST /v1/chat/completions``: the OpenAI Chat Completions schema
  (https://platform.openai.com/docs/api-reference/chat), non-streaming or
  ``"stream": true`` (Server-Sent Events: ``data: {chunk}`` lines, then
  ``data: [DONE]``). ``choices[0].message.content`` is the final answer only;
  the decision, confidence, citations (the documents the answer cites) and
  grounding flag (``cited``, ``abstained``, ``uncited``, ``unsupported``:
  an answer the documents do not back, ``no_passages``; ``null`` unless
  ALLOW; see :class:`so8t.runtime.agent.Answer`) ride along in an extra ``so8t``
  object. Sampling fields (``temperature``, ``top_p``...) are accepted and
  ignored: generation is greedy, as calibrated.
* ``POST /v1/decide``: ``{"prompt": "..."}`` or ``{"messages": [...]}`` ->
  ``{decision, confidence, answer, citations, grounding, ...}``.
* ``GET /v1/models``, ``GET /healthz``.

Each API key belongs to a user id (written to the audit log) and an access
level (what retrieval may show). Keys are stored as SHA-256 digests in
``runtime.server.api_keys_file`` (``so8t keygen`` prints an entry) or given in
the environment as ``SO8T_API_KEYS="key=user:level,..."``.

Limits: request bodies above ``max_request_bytes`` get 413; each key has a
token bucket (``rate_per_minute``, ``burst``) and gets 429 with
``Retry-After`` when it is empty (per server process). Bad JSON gets 400 and
a body of the wrong shape 422, each with a message naming the problem (the
OpenAI error shape ``{"error": {"message", "type"}}``); 500 is left for
faults of the server itself. A stream starts only after the answer is
decided (the answer is checked for leaked reasoning before any of it is
shown), so the status code of a failed request is still an error code.

Load: concurrent requests share the model through one batch
(:class:`so8t.runtime.engine.BatchingModel`: decisions scored together, answers
continuously batched). At most ``max_queue`` requests are inside the model at
once; one more gets 503 with ``Retry-After`` at once (backpressure: a queue
that cannot grow without bound). A request not answered within
``request_timeout_s`` is stopped, its slot freed, and gets 503; a client that
disconnects stops its own request the same way. The audit log locked by
another process beyond ``runtime.audit.lock_timeout_s``, or a full disk, gives
503 naming the file: an answer that cannot be audited is not returned.

Every request leaves exactly one audit row, refused ones included (401, 413,
429, 503, bad JSON, a wrong shape: decision ``ERROR``, the reason as output).
"""

import contextlib
import hashlib
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

from so8t.access import AccessLevel
from so8t.runtime.agent import Agent, AgentInputError, Answer, Principal
from so8t.runtime.audit import AuditError
from so8t.runtime.engine import Cancellation, EngineError, RequestCancelled
from so8t.guard import sentences
from so8t.console import info, warn
from so8t.runtime.model import ModelError
from so8t.errors import So8tError, error_location
from so8t.params import ServerParams

#: Environment variable with API keys: ``key=user:level`` entries separated by commas.
API_KEYS_ENV = "SO8T_API_KEYS"
#: Environment variable naming the params file for worker processes (``so8t serve --workers N``).
PARAMS_ENV = "SO8T_PARAMS"


class ServerConfigError(So8tError, ValueError):
    """API keys or limits are missing or malformed; the message names the file or variable."""


# ---------------------------------------------------------------- API keys and limits


def key_digest(key: str) -> str:
    """Hex SHA-256 of an API key (what the keys file stores)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ApiKeys:
    """API key digest -> :class:`Principal`."""

    def __init__(self, principals: dict[str, Principal] | None = None) -> None:
        self._by_digest = dict(principals or {})

    def __len__(self) -> int:
        return len(self._by_digest)

    def add(self, key: str, user: str, level: str) -> None:
        self._by_digest[key_digest(key)] = Principal.of(user, level)

    def lookup(self, key: str) -> Principal | None:
        """The principal of ``key`` (compared by digest), or ``None``."""
        return self._by_digest.get(key_digest(key))

    @classmethod
    def load(cls, path: str | Path | None, env: str | None) -> "ApiKeys":
        """Keys from a YAML file of ``{user, access_level, sha256}`` and/or ``SO8T_API_KEYS``.

        Raises:
            ServerConfigError: naming the file entry or the variable's bad part.
        """
        keys = cls()
        if path is not None:
            path = Path(path)
            try:
                entries = yaml.safe_load(path.read_text(encoding="utf-8")) or []
            except FileNotFoundError:
                raise ServerConfigError(f"runtime.server.api_keys_file: {path} not found") from None
            except yaml.YAMLError as e:
                raise ServerConfigError(f"{path}: invalid YAML: {e}") from None
            if not isinstance(entries, list):
                raise ServerConfigError(f"{path}: expected a list of {{user, access_level, sha256}} entries")
            for i, e in enumerate(entries):
                try:
                    digest = str(e["sha256"]).lower()
                    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                        raise ValueError("sha256 must be 64 hex digits")
                    keys._by_digest[digest] = Principal.of(str(e["user"]), str(e["access_level"]))
                except (KeyError, TypeError, ValueError) as err:
                    raise ServerConfigError(
                        f"{path}: entry {i}: {err}; expected {{user: alice, access_level: 機密, sha256: <64 hex>}}"
                    ) from None
        for part in filter(None, (p.strip() for p in (env or "").split(","))):
            key, _, who = part.partition("=")
            user, _, level = who.partition(":")
            if not key or not user or not level:
                raise ServerConfigError(f"{API_KEYS_ENV}: {part.split('=')[0][:4]}...: expected key=user:level")
            try:
                keys.add(key, user, level)
            except ValueError as err:
                raise ServerConfigError(f"{API_KEYS_ENV}: user {user}: {err}") from None
        return keys


class RateLimiter:
    """Token bucket per key (Turner 1986): ``burst`` tokens, refilled at ``rate_per_minute / 60`` per second."""

    def __init__(self, rate_per_minute: float, burst: int, clock=time.monotonic) -> None:
        self.rate = rate_per_minute / 60.0
        self.burst = float(burst)
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """Spend one token of ``key``: 0.0 when allowed, else the seconds until one is available."""
        with self._lock:
            now = self.clock()
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


#: The audit row's user of a request without a valid API key.
ANONYMOUS = Principal.of("anonymous", AccessLevel.PUBLIC)


class Admission:
    """At most ``limit`` requests inside the model at once (thread-safe); the rest are refused.

    ``retry_after()`` estimates when a slot frees: the mean service time of recent requests
    (an exponentially weighted mean, weight 0.2), at least 1 s.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        self._mean_s = 1.0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.in_flight >= self.limit:
                return False
            self.in_flight += 1
            return True

    def leave(self, seconds: float) -> None:
        with self._lock:
            self.in_flight -= 1
            self._mean_s = 0.8 * self._mean_s + 0.2 * seconds

    def retry_after(self) -> int:
        return max(1, math.ceil(self._mean_s))


# ---------------------------------------------------------------- request bodies


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def as_dict(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": text}


class ChatCompletionRequest(BaseModel):
    """The fields of an OpenAI chat completion request that matter here (others are ignored)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None


class DecideRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str | None = None
    messages: list[Message] | None = Field(default=None, min_length=1)
    max_tokens: PositiveInt | None = None

    @model_validator(mode="after")
    def _one_input(self) -> "DecideRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` (a question) or `messages` (a conversation)")
        return self

    def as_messages(self) -> list[dict]:
        if self.prompt is not None:
            return [{"role": "user", "content": self.prompt}]
        return [m.as_dict() for m in self.messages]


# ---------------------------------------------------------------- app


class _BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes`` (by Content-Length, or counted while reading)."""

    def __init__(self, app, max_bytes: int, on_reject=None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject  # called with (scope, message): the refused request's audit row

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._reject(send, scope)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _BodyTooLarge:
            if not started:
                await self._reject(send, scope)

    async def _reject(self, send, scope=None) -> None:
        message = f"request body larger than {self.max_bytes} bytes (runtime.server.max_request_bytes)"
        if self.on_reject is not None and scope is not None:
            import anyio

            with contextlib.suppress(AuditError):
                await anyio.to_thread.run_sync(self.on_reject, scope, message)
        body = json.dumps(_error(message, "invalid_request_error")).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _error(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind, "code": None}}


_ERROR_TYPES = {401: "authentication_error", 413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error"}


def _install_error_handlers(app) -> None:
    """Every error becomes a JSON body ``{"error": {"message", "type"}}`` with its status code."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        kind = _ERROR_TYPES.get(exc.status_code, "invalid_request_error")
        return JSONResponse(_error(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse(_error(_describe(exc.errors()), "invalid_request_error"), status_code=422)

    @app.exception_handler(AgentInputError)
    async def _input_error(request: Request, exc: AgentInputError):
        return JSONResponse(_error(str(exc), "invalid_request_error"), status_code=400)

    @app.exception_handler(ModelError)
    async def _model_error(request: Request, exc: ModelError):
        return JSONResponse(_error(str(exc), "invalid_request_error"), status_code=400)

    @app.exception_handler(RequestCancelled)
    async def _cancelled(request: Request, exc: RequestCancelled):
        # A timeout is the server's load; a disconnected client never reads this.
        return JSONResponse(_error(str(exc), "server_error"), status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError):
        return JSONResponse(_error(str(exc), "server_error"), status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(AuditError)
    async def _audit_error(request: Request, exc: AuditError):
        return JSONResponse(_error(f"{exc}; the request was not answered", "server_error"), status_code=503,
                            headers={"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        return JSONResponse(_error("internal server error (see the server log)", "server_error"), status_code=500)


def _authenticator(keys: ApiKeys, limits: ServerParams, on_refuse=None, audit_threads=lambda: None):
    """A FastAPI dependency: the caller of a request's API key, rate-limited per key (401 / 429).

    Args:
        on_refuse: called (in a worker thread) with ``(principal, path, message)`` for every
            refusal: its audit row (``principal`` is :data:`ANONYMOUS` without a valid key).
        audit_threads: returns the ``anyio.CapacityLimiter`` of those threads (``None``: anyio's default).
    """
    import anyio
    from fastapi import Request
    from starlette.exceptions import HTTPException

    limiter = RateLimiter(limits.rate_per_minute, limits.burst)
    failures = RateLimiter(limits.rate_per_minute, limits.burst)

    async def refused(request: Request, who: Principal, status: int, message: str, wait: float = 0.0):
        if on_refuse is not None:
            await anyio.to_thread.run_sync(on_refuse, who, request.url.path, f"{status}: {message}", limiter=audit_threads())
        headers = {"Retry-After": str(math.ceil(wait))} if wait > 0 else None
        return HTTPException(status, message, headers=headers)

    async def refuse(request: Request, message: str):
        """401, or 429 once a client address keeps failing (no free key guessing)."""
        client = request.client.host if request.client else "unknown"
        wait = failures.take(f"fail:{client}")
        if wait > 0:
            raise await refused(request, ANONYMOUS, 429, f"too many failed authentications; retry in {wait:.1f} s", wait)
        raise await refused(request, ANONYMOUS, 401, message)

    async def authenticate(request: Request) -> Principal:
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not key:
            await refuse(request, "missing API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>`")
        who = keys.lookup(key)
        if who is None:
            await refuse(request, "invalid API key")
        wait = limiter.take(key_digest(key))
        if wait > 0:
            raise await refused(
                request, who, 429,
                f"rate limit: {limits.rate_per_minute:g} requests per minute "
                f"(burst {limits.burst}); retry in {wait:.1f} s",
                wait,
            )
        return who

    return authenticate


async def _parse(request, model: type[BaseModel], on_error=None):
    """The request body validated as ``model`` (400 for bad JSON or a non-object, 422 for a wrong shape).

    Args:
        on_error: called with ``(raw body, message)`` before a rejection is raised (the audit row).
    """
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    import anyio

    raw = await request.body()

    async def reject(status: int, message: str):
        if on_error is not None:  # off the event loop: the audit write may wait for the db's lock
            await anyio.to_thread.run_sync(on_error, raw, message)
        return HTTPException(status, message)

    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        message = f"request body is not valid JSON: {e}"
    except RecursionError:
        message = "request body is nested too deeply"
    except ValueError as e:  # e.g. an integer of thousands of digits
        message = f"request body has a value that cannot be read: {e}"
    else:
        message = None if isinstance(data, dict) else f"request body must be a JSON object, got {type(data).__name__}"
    if message is not None:
        raise await reject(400, message)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
    if on_error is not None:
        await anyio.to_thread.run_sync(on_error, raw, _describe(errors))
    raise RequestValidationError(errors)


def _completion(ans: Answer, stream: bool):
    """The OpenAI-style response of an answer: one ``chat.completion`` or an SSE stream of chunks."""
    from fastapi.responses import StreamingResponse

    extra = {
        "decision": ans.decision,
        "confidence": ans.confidence,
        "citations": ans.citations,
        "grounding": ans.grounding,
        "model_decision": ans.model_decision,
        "override": ans.override,
        "request_id": ans.request_id,
    }
    head = {"id": f"chatcmpl-{ans.request_id}", "created": int(time.time()), "model": ans.model_id}
    if not stream:
        return {
            **head,
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ans.answer}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": ans.prompt_tokens,
                "completion_tokens": ans.completion_tokens,
                "total_tokens": ans.prompt_tokens + ans.completion_tokens,
            },
            "so8t": extra,
        }

    def chunk(delta: dict, finish: str | None = None, **more) -> str:
        body = {**head, "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **more}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def events():
        yield chunk({"role": "assistant", "content": ""})
        for piece in sentences(ans.answer):
            yield chunk({"content": piece})
        yield chunk({}, "stop", so8t=extra)
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _runner(agent: Agent, admission: Admission, limits: ServerParams, refusal, limiters):
    """The coroutine that answers one admitted HTTP request (see ``run`` below); ``limiters()`` gives the
    answer and refusal thread limiters, ``refusal(who, path, message)`` writes a refusal's audit row."""
    import anyio
    from fastapi import Request

    async def run(request: Request, messages: list[dict], who: Principal, channel: str, max_tokens: int | None) -> Answer:
        """The agent's answer, within the queue bound, the request timeout and the client's patience."""
        from starlette.exceptions import HTTPException

        if not admission.enter():
            wait = admission.retry_after()
            message = (f"server busy: {admission.limit} requests are being answered "
                       f"(runtime.server.max_queue); retry in {wait} s")
            await anyio.to_thread.run_sync(refusal, who, request.url.path, f"503: {message}", limiter=limiters()[1])
            raise HTTPException(503, message, headers={"Retry-After": str(wait)})
        t0 = time.monotonic()
        cancel = Cancellation(limits.request_timeout_s)
        outcome: list = []
        try:
            async with anyio.create_task_group() as tasks:

                async def watch() -> None:  # a client that goes away stops its request
                    try:
                        while not cancel.cancelled:
                            if await request.is_disconnected():
                                cancel.cancel("disconnected")
                                return
                            await anyio.sleep(0.2)
                    except Exception:  # noqa: BLE001 - the connection is unusable: treat it as gone
                        cancel.cancel("disconnected")

                tasks.start_soon(watch)
                try:
                    # Callers are untrusted: their system turns and unsigned assistant turns are refused (400).
                    outcome.append(await anyio.to_thread.run_sync(
                        agent.answer, messages, who, channel, max_tokens, True, cancel, limiter=limiters()[0]
                    ))
                except Exception as e:  # noqa: BLE001 - raised below, outside the task group (which would wrap it)
                    outcome.append(e)
                tasks.cancel_scope.cancel()
        finally:
            admission.leave(time.monotonic() - t0)
        if isinstance(outcome[0], Exception):
            raise outcome[0]
        return outcome[0]

    return run


def create_app(agent: Agent, keys: ApiKeys, limits: ServerParams = ServerParams(), close_agent: bool = False):
    """The FastAPI application serving ``agent``.

    Args:
        keys: accepted API keys (at least one).
        limits: body size and rate limits.
        close_agent: close the agent (free the model) when the server shuts down.

    Raises:
        ServerConfigError: no API keys.
    """
    import anyio
    from fastapi import Depends, FastAPI, Request

    if not len(keys):
        raise ServerConfigError(
            f"no API keys: set runtime.server.api_keys_file (entries from `so8t keygen`) or {API_KEYS_ENV}"
        )

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if close_agent:
            agent.close()

    app = FastAPI(title="so8t", version="1", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    def refusal(who: Principal, path: str, message: str) -> None:
        """The audit row of a request refused before the agent (no valid key, rate, size, queue)."""
        agent.reject(who, f"http:{path}", "", message)

    app.add_middleware(
        BodyLimit, max_bytes=limits.max_request_bytes,
        on_reject=lambda scope, message: refusal(ANONYMOUS, scope.get("path", ""), f"413: {message}"),
    )
    _install_error_handlers(app)
    _limiters: list = []

    def limiters():
        """Threads for answers (one per admitted request, whatever anyio's default of 40) and for
        refusals' audit rows (a few: a flood of refusals must not wait behind the answers)."""
        if not _limiters:  # made in the event loop (anyio needs one)
            _limiters.extend([anyio.CapacityLimiter(limits.max_queue), anyio.CapacityLimiter(4)])
        return _limiters
    Caller = Annotated[Principal, Depends(_authenticator(keys, limits, refusal, lambda: limiters()[1]))]
    admission = Admission(limits.max_queue)
    app.state.admission = admission

    run = _runner(agent, admission, limits, refusal, limiters)

    @app.get("/healthz")
    async def healthz():
        from fastapi.responses import JSONResponse

        if not getattr(agent.model, "alive", True):
            return JSONResponse({"status": "model stopped", "model": agent.model.model_id}, status_code=503)
        return {"status": "ok", "model": agent.model.model_id, "in_flight": admission.in_flight}

    @app.get("/v1/models")
    async def models(who: Caller):
        return {"object": "list", "data": [{"id": agent.model.model_id, "object": "model", "owned_by": "so8t"}]}

    def audited(who: Principal, channel: str):
        """An ``on_error`` for :func:`_parse`: a rejected body still leaves its audit row."""
        return lambda raw, message: agent.reject(who, channel, raw.decode("utf-8", errors="replace"), message)

    @app.post("/v1/decide")
    async def decide(request: Request, who: Caller):
        req = await _parse(request, DecideRequest, audited(who, "http:/v1/decide"))
        ans = await run(request, req.as_messages(), who, "http:/v1/decide", req.max_tokens)
        return ans.to_dict()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, who: Caller):
        req = await _parse(request, ChatCompletionRequest, audited(who, "http:/v1/chat/completions"))
        messages = [m.as_dict() for m in req.messages]
        ans = await run(request, messages, who, "http:/v1/chat/completions", req.max_completion_tokens or req.max_tokens)
        return _completion(ans, req.stream)

    return app


def _describe(errors) -> str:
    parts = []
    for e in errors:
        loc = error_location(e, skip=("body",)) or "(body)"
        parts.append(f"{loc}: {e.get('msg')}")
    return "invalid request: " + "; ".join(parts)


# ---------------------------------------------------------------- running


def app_from_params(params_path: str | Path, model=None):
    """The app configured by a params file: agent, API keys (file and ``SO8T_API_KEYS``), limits."""
    from so8t.params import load_params
    from so8t.runtime.agent import build_agent, resolve

    params_path = Path(params_path).resolve()
    params = load_params(params_path)
    base = params_path.parent
    srv = params.runtime.server
    keys_file = resolve(base, srv.api_keys_file) if srv.api_keys_file else None
    keys = ApiKeys.load(keys_file, os.environ.get(API_KEYS_ENV))
    if not len(keys):  # fail before loading the model
        raise ServerConfigError(
            f"no API keys: set runtime.server.api_keys_file (entries from `so8t keygen`) or {API_KEYS_ENV}"
        )
    agent = build_agent(params, base, model=model, warn=warn, info=info, batching=True)
    return create_app(agent, keys, srv, close_agent=True)






def app_from_env():
    """uvicorn factory for worker processes: the params file named by ``SO8T_PARAMS``."""
    return app_from_params(os.environ.get(PARAMS_ENV, "params.yaml"))


def serve(params_path: str | Path, host: str, port: int, workers: int = 1) -> None:
    """Run the server with uvicorn; ``workers > 1`` starts processes that each load the model."""
    import uvicorn

    if workers > 1:
        os.environ[PARAMS_ENV] = str(Path(params_path).resolve())
        uvicorn.run("so8t.runtime.server:app_from_env", factory=True, host=host, port=port, workers=workers)
    else:
        uvicorn.run(app_from_params(params_path), host=host, port=port)
