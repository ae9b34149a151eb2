"""An OpenAI-compatible HTTP server for a saved model, with a chat page at `/`.

Endpoints (the subset of OpenAI's API that a chat model needs, in OpenAI's JSON shapes so that the `openai` client
and tools built on it work unchanged; vLLM and llama.cpp's server offer the same subset):

* `GET /v1/models`: the one served model;
* `POST /v1/chat/completions`: a reply through the chat template (`stream: true` sends server-sent events in
  OpenAI's chunk format, ending with `data: [DONE]`);
* `POST /v1/completions`: plain continuation of a prompt;
* `GET /health`: liveness and the engine's load; `GET /`: the chat page (static/index.html).

Every request goes through one `Engine` (continuous batching on a background thread). Bad input gets OpenAI's
error shape, `{"error": {"message", "type", "param", "code"}}`, with status 400 (401 for a missing or wrong key
with --api-key, 403 for a request from another site or to a foreign host name, 404 for an unknown model or path,
413 for a body over the limit, 415 for a body not sent as application/json, 429 with Retry-After when the queue
is full); the server never answers a client's mistake with a 500. A 500 (a bug, or a failed decode step) says
only that something failed and a request id; the traceback goes to the server's log under the same id.

What a browser may do. Without a key the server trusts whoever can reach it, and a browser can be made to reach a
loopback server by any web site its user visits: a cross-site form or "simple" fetch POSTs text/plain without a
CORS preflight, and DNS rebinding points the attacker's own host name at 127.0.0.1 so that even reading answers
is same-origin. So (as Jupyter's and Vite's dev servers do) a request is refused unless its Host header is one
this server answers to (localhost, 127.0.0.1, [::1], the bound host or the address the client connected to, with
the server's port, or a name given with --allow-host), unless its Origin header, when present, is the server's own
(http:// + that Host) or one given with --allow-origin (which also gets CORS headers, so a page there can read
the answers), and unless a body is declared application/json (which a cross-site page cannot send without a
preflight that only an allowed origin passes). The chat page at `/` is same-origin and works unchanged.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from tiny_llama2_zh.errors import UsageError
from tiny_llama2_zh.infer.engine import Engine, Failed, Finished, GenerationRequest, QueueFull, TextDelta
from tiny_llama2_zh.infer.generate import turn_end_ids
from tiny_llama2_zh.tokenizer import chat_ids

logger = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_BODY_BYTES = 1 << 20
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "observation"}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _internal_error(request_id: str, what: str = "The server had an error while processing your request") -> APIError:
    """A 500 that tells the client nothing about the code (the log does, under `request_id`)."""
    return APIError(
        500,
        f"{what} (request id {request_id}); the server's log has the details",
        type="server_error",
        headers={"x-request-id": request_id},
    )


# ---------------------------------------------------------------------------------------- origin and host
def _split_host(value: str) -> tuple[str, str | None]:
    """A Host header or --allow-host value ('name', 'name:port', '[::1]:port', '::1') as (name, port or None),
    the name lower-cased and without an IPv6 address's brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name, rest[1:] if rest.startswith(":") else None
    if value.count(":") > 1:  # a bare IPv6 address
        return value, None
    name, colon, port = value.partition(":")
    return name, port if colon else None


def _allowed_host(value: str) -> tuple[str, str | None]:
    """An --allow-host value, checked: a host name or address, with or without a port."""
    name, port = _split_host(value)
    if not name or "/" in value or (port is not None and not port.isdigit()):
        raise UsageError(f"--allow-host expects a host name such as mybox.local or mybox.local:8000, got {value!r}")
    return name, port


def _allowed_origin(value: str) -> str:
    """An --allow-origin value, checked and normalised: scheme://host[:port] as browsers send it, or null."""
    origin = value.strip().lower().rstrip("/")
    scheme, separator, host = origin.partition("://")
    if origin != "null" and not (separator and scheme in ("http", "https") and host and "/" not in host):
        raise UsageError(
            f"--allow-origin expects an origin such as http://localhost:3000 (scheme, host and port, no path), "
            f"got {value!r}"
        )
    return origin


class _SameOriginGuard:
    """ASGI middleware that refuses, with a 403 in OpenAI's shape, a request whose Host header is not a name this
    server answers to (DNS rebinding) or whose Origin header is neither the server's own origin nor an allowed one
    (a page on another site). See the module docstring; the `bound_hosts` and `allowed_hosts` come from `serve`."""

    def __init__(
        self,
        app: ASGIApp,
        bound_hosts: tuple[str, ...],
        allowed_hosts: tuple[tuple[str, str | None], ...],
        allowed_origins: frozenset[str],
    ) -> None:
        self.app = app
        self.own_names = {_split_host(host)[0] for host in (*LOOPBACK_NAMES, *bound_hosts)}
        self.allowed_hosts = allowed_hosts
        self.allowed_origins = allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(Headers(scope=scope), scope.get("server"))
            if refusal is not None:
                await refusal.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, headers: Headers, server: tuple[str, int | None] | None) -> APIError | None:
        address, port = server or (None, None)
        host = headers.get("host", "")
        name, given_port = _split_host(host)
        own_names = (self.own_names | {_split_host(address)[0]}) if address else self.own_names
        own = name in own_names and (port is None or given_port == str(port))
        allowed = any(name == other and other_port in (None, given_port) for other, other_port in self.allowed_hosts)
        if not (own or allowed):
            shown = f":{port}" if port is not None else ""
            expected = ", ".join(f"{_bracketed(known)}{shown}" for known in sorted(own_names))
            return APIError(
                403,
                f"the Host header {host!r} is not a name this server answers to ({expected}): refused, as a web page "
                f"may use DNS rebinding to reach a local server. If you reach the server by this name, start it with "
                f"--allow-host {_bracketed(name) if name else 'NAME'}",
                code="host_not_allowed",
            )
        origin = headers.get("origin")
        if origin is None or origin.lower() in (f"http://{host.lower()}", *self.allowed_origins):
            return None
        return APIError(
            403,
            f"the Origin header {origin!r} is not this server's own origin (http://{host}): refused, as a page on "
            f"another site may not use this server. To let that page call it, start the server with "
            f"--allow-origin {origin}",
            code="origin_not_allowed",
        )


def _bracketed(name: str) -> str:
    return f"[{name}]" if ":" in name else name


# ------------------------------------------------------------------------------------------ request bodies
class _Strict(BaseModel):
    """JSON types as OpenAI documents them: no "1" for 1 or 1 for true (strict), unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str
    content: str | list[TextPart]
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1, le=1)] = 1
    stop: (
        Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=4)]
    ) | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None  # what torch.Generator.manual_seed takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (load tests)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: Literal[False] | None = None


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: None = None


def _param(location: tuple) -> str:
    """pydantic's error location as OpenAI's `param` (messages[1].role), without pydantic's union branch names."""
    fields = {name for model in (ChatCompletionRequest, CompletionRequest, ChatMessage) for name in model.model_fields}
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in fields:
            text += f".{part}" if text else part
    return text


def _validation_error(error: ValidationError) -> APIError:
    first = error.errors()[0]
    param = _param(tuple(first["loc"]))
    return APIError(400, f"{param or 'body'}: {first['msg']}", param=param or None, code="invalid_value")


# --------------------------------------------------------------------------------------------- the app
def create_app(
    model_dir: str | Path,
    *,
    model_name: str = "tinyllm",
    api_key: str | None = None,
    max_batch: int = 8,
    queue_size: int = 32,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    device: str | None = None,
    bound_hosts: Sequence[str] = (),
    allow_hosts: Sequence[str] = (),
    allow_origins: Sequence[str] = (),
) -> FastAPI:
    """The server for the model folder `model_dir`, answering to `model_name`. The engine thread starts here and
    stops with the app's lifespan (uvicorn runs it; `app.state.engine.stop()` for callers that do not).

    Host headers accepted: the loopback names, `bound_hosts` (the address the server binds) and the address a
    client connected to, all with the server's port, and `allow_hosts` (a name: any port; name:port: that one).
    Origin headers accepted: the server's own (http:// + an accepted Host) and `allow_origins`, which also get CORS
    headers (their pages may send JSON and read the answers)."""
    from tiny_llama2_zh.loading import load_model

    allowed_hosts = tuple(_allowed_host(host) for host in allow_hosts)
    allowed_origins = frozenset(_allowed_origin(origin) for origin in allow_origins)
    model, tokenizer = load_model(model_dir, device or "cpu")
    engine = Engine(model, tokenizer, max_batch=max_batch, queue_size=queue_size).start()
    context = engine.context
    chat_stop_ids = frozenset(turn_end_ids(tokenizer))
    plain_stop_ids = frozenset({tokenizer.eos_token_id})
    has_template = bool(getattr(tokenizer, "chat_template", None))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.stop()

    app = FastAPI(title="tiny-llama2-zh", lifespan=lifespan, docs_url=None, redoc_url=None)
    if allowed_origins:  # Starlette's CORS: preflights answered and answers readable for these origins only
        app.add_middleware(
            CORSMiddleware,
            allow_origins=sorted(allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            allow_private_network=True,  # Chrome's Private Network Access: a public page calling a local server
        )
    # added last, so it runs first: a refused request reaches nothing else
    app.add_middleware(
        _SameOriginGuard, bound_hosts=tuple(bound_hosts), allowed_hosts=allowed_hosts, allowed_origins=allowed_origins
    )
    app.state.engine = engine
    app.state.model_name = model_name

    # ---------------------------------------------------------------------------------- errors
    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if error.status_code == 404 else None
        message = f"{request.method} {request.url.path}: {error.detail}"
        return APIError(error.status_code, message, code=code, headers=getattr(error, "headers", None)).response()

    @app.exception_handler(RequestValidationError)
    async def _fastapi_validation(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]  # FastAPI's own checks (path parameters): the same shape as the bodies' errors
        location = ".".join(str(part) for part in first.get("loc", ()))
        return APIError(400, f"{location}: {first.get('msg')}", param=location or None).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        request_id = f"req_{uuid.uuid4().hex}"
        logger.error(
            "internal error in %s %s, request id %s", request.method, request.url.path, request_id, exc_info=error
        )
        return _internal_error(request_id).response()

    # ---------------------------------------------------------------------------------- helpers
    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise APIError(
                401,
                "You didn't provide an API key: send it as the header 'Authorization: Bearer KEY'.",
                code="invalid_api_key",
            )
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        # Only a body declared JSON: a page on another site can send text/plain or form data without a CORS
        # preflight, never application/json (the MIME type's parameters, such as charset=utf-8, are fine).
        content_type = request.headers.get("content-type", "")
        if content_type.partition(";")[0].strip().lower() != "application/json":
            raise APIError(
                415,
                f"the request body is declared as {content_type or 'nothing'!r}; send JSON with the header "
                "'Content-Type: application/json'",
                code="unsupported_media_type",
            )
        # An oversized body is still read (and dropped) up to a hard cap, so that the client, which sends the whole
        # body before it reads the answer, gets the 413 instead of a broken connection.
        body = bytearray()
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size <= max_body_bytes:
                body += chunk
            elif size > max(16 * max_body_bytes, 64 << 20):
                break
        if size > max_body_bytes:
            raise APIError(413, f"the request body is at least {size:,} bytes, over the limit of {max_body_bytes:,}")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:  # RecursionError: [[[[…]]]]
            raise APIError(400, f"the body is not valid JSON ({error})", code="invalid_json") from error
        if not isinstance(data, dict):
            raise APIError(400, f"the body must be a JSON object, not {type(data).__name__}", code="invalid_json")
        return data

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server serves '{model_name}' (GET /v1/models)",
                param="model",
                code="model_not_found",
            )

    def token_budget(body: _Sampling, prompt_tokens: int) -> int:
        room = context - prompt_tokens
        if room <= 0:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens, and the prompt alone is {prompt_tokens} "
                "tokens: shorten it (or drop old messages)",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        wanted = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        if wanted is None:
            return room
        if wanted <= 0:
            raise APIError(400, f"{param} must be at least 1, got {wanted}", param=param, code="invalid_value")
        if wanted > room:
            raise APIError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_tokens + wanted} tokens ({prompt_tokens} in the prompt, {wanted} in the completion). "
                "Please reduce the prompt or the completion length.",
                param=param,
                code="context_length_exceeded",
            )
        return wanted

    async def generate(
        request: Request, body: _Sampling, prompt_ids: list[int], stop_ids: frozenset[int], chat: bool
    ) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(event) -> None:  # engine thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        job = GenerationRequest(
            prompt_ids=prompt_ids,
            max_tokens=token_budget(body, len(prompt_ids)),
            on_event=on_event,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop_ids=frozenset() if body.ignore_eos else stop_ids,
            stop_strings=stop,
            request_id=ident,
        )
        try:
            engine.submit(job)
        except QueueFull as error:
            raise APIError(
                429,
                f"the server is busy: {error}",
                type="requests",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            ) from error
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(job, events, ident, created, chat, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        pieces: list[str] = []
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                if isinstance(event, TextDelta):
                    pieces.append(event.text)
                elif isinstance(event, Failed):
                    raise _internal_error(ident, event.message)
                else:
                    break
        finally:
            job.cancel()  # a no-op once finished; frees the row if this handler was abandoned
        text = "".join(pieces)
        choice: dict[str, Any] = {"index": 0, "finish_reason": event.reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return JSONResponse(
            {
                "id": ident,
                "object": "chat.completion" if chat else "text_completion",
                "created": created,
                "model": model_name,
                "choices": [choice],
                "usage": _usage(event),
            }
        )

    async def _stream(
        job: GenerationRequest, events: asyncio.Queue, ident: str, created: int, chat: bool, include_usage: bool
    ) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                content: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
                if delta is not None:
                    content["content"] = delta
                choice = {"index": 0, "delta": content, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
            payload = {"id": ident, "object": kind, "created": created, "model": model_name, "choices": [choice]}
            return _sse(payload)

        try:
            if chat:
                yield chunk(None, None, role=True)
            while True:
                event = await events.get()
                if isinstance(event, TextDelta):
                    yield chunk(event.text, None)
                elif isinstance(event, Failed):
                    yield _sse(_internal_error(ident, event.message).body())
                    break
                else:
                    yield chunk(None, event.reason)
                    if include_usage:
                        yield _sse(
                            {
                                "id": ident,
                                "object": kind,
                                "created": created,
                                "model": model_name,
                                "choices": [],
                                "usage": _usage(event),
                            }
                        )
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()  # the client went away (the task is cancelled) or the reply is done: free the row now

    # ---------------------------------------------------------------------------------- routes
    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse((STATIC_DIR / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        check_key(request)
        return {"object": "list", "data": [_model_card(model_name, context)]}

    @app.get("/v1/models/{name:path}")
    async def model(request: Request, name: str) -> dict:
        check_key(request)
        check_model(name)
        return _model_card(model_name, context)

    async def validated_body(request: Request, schema):
        """The request's body as `schema`, after the key check; any problem is an OpenAI-shaped error."""
        check_key(request)
        data = await read_json(request)
        try:
            body = schema.model_validate(data)
        except ValidationError as error:
            raise _validation_error(error) from None
        check_model(body.model)
        return body

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await validated_body(request, ChatCompletionRequest)
        if not has_template:
            raise APIError(400, "this model's tokenizer has no chat template: use /v1/completions", code="no_template")
        messages = []
        for index, message in enumerate(body.messages):
            if message.role not in ROLES:
                raise APIError(
                    400,
                    f"messages[{index}].role: unknown role '{message.role}'; expected one of {', '.join(ROLES)}",
                    param=f"messages[{index}].role",
                    code="invalid_value",
                )
            content = message.content
            if isinstance(content, list):
                content = "".join(part.text for part in content)
            messages.append({"role": ROLES[message.role], "content": content})
        ids = chat_ids(tokenizer, messages, generation_prompt=True)
        return await generate(request, body, ids, chat_stop_ids, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await validated_body(request, CompletionRequest)
        prompt = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        ids = tokenizer(prompt)["input_ids"]  # starts with <s>, like every pretraining document
        return await generate(request, body, list(ids), plain_stop_ids, chat=False)

    return app


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(event: Finished) -> dict[str, int]:
    return {
        "prompt_tokens": event.prompt_tokens,
        "completion_tokens": event.completion_tokens,
        "total_tokens": event.prompt_tokens + event.completion_tokens,
    }


def _model_card(name: str, context: int) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "tiny-llama2-zh", "max_model_len": context}


def serve(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model_name: str = "tinyllm",
    max_batch: int = 8,
    queue_size: int = 32,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    allow_hosts: Sequence[str] = (),
    allow_origins: Sequence[str] = (),
) -> None:
    """`tinyllm serve`: run the app under uvicorn until Ctrl-C."""
    import uvicorn

    app = create_app(
        model_dir,
        model_name=model_name,
        api_key=api_key,
        max_batch=max_batch,
        queue_size=queue_size,
        max_body_bytes=max_body_bytes,
        bound_hosts=(host,),
        allow_hosts=allow_hosts,
        allow_origins=allow_origins,
    )
    print(f"serving {model_dir} as '{model_name}' on http://{host}:{port} (chat page at /, API at /v1)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=2)


@contextlib.contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1") -> Iterator[str]:
    """Run `app` under a real uvicorn on a free port of `host`, in a background thread; yields the base URL
    (http://host:port) and shuts the server and the app's engine down on exit. For tests and benchmarks."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        app.state.engine.stop()
