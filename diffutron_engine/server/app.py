"""The HTTP layer of the OpenAI-compatible API: routes, the request guard, the bounded body read and the
disconnect watch. Request and response shapes live in protocol.py, the work in serving.py.

    GET  /health                  200 {"status": "ok"}, without the key (load balancers' probe)
    GET  /, /static/{file}        the playground (static/: a page that runs requests with "trace": true and
                                  draws the canvas step by step), without the key; what it fetches needs it
    GET  /v1/models, /v1/models/{id}
    GET  /v1/engine               the model, the engine's settings, the request defaults, every SamplingParams
                                  field's default and the bounds (the playground's controls)
    POST /v1/completions, /v1/chat/completions   (JSON, or server-sent events with "stream": true)
    GET  /metrics                 Prometheus text
    GET  /docs, /openapi.json     only with `--docs`

The guard is plain ASGI, not a BaseHTTPMiddleware: that one hands the route a `receive` that never
reports the client's disconnect, and the disconnect is what frees a gone client's rows in the engine.
Every error, 404 and 405 included, has OpenAI's shape; a bug is a logged 500, never a traceback.
Imports FastAPI at module level (the `serve` extra).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import os
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import MAX_STEPS, MAX_TEMPERATURE, REMASKING, SamplingParams
from .config import ServerConfig
from .loop import EngineLoop
from .metrics import Metrics
from .protocol import ApiError, error_body
from .serving import OpenAIServing

log = logging.getLogger("diffutron_engine.server")

# statuses after which the connection is closed: the client may still be sending a body nobody reads
_CLOSE = {408, 413}

# the playground's files (package data), served without the key; only these names, read once
STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}


def static_files() -> dict[str, tuple[bytes, str]]:
    """name -> (content, media type) of the playground's files; empty when the folder is missing."""
    files = {}
    if os.path.isdir(STATIC_DIR):
        for name in sorted(os.listdir(STATIC_DIR)):
            kind = _TYPES.get(os.path.splitext(name)[1])
            if kind is not None:
                with open(os.path.join(STATIC_DIR, name), "rb") as f:
                    files[name] = (f.read(), kind)
    return files


def engine_info(engine, config: ServerConfig) -> dict:
    """What GET /v1/engine answers: the served model, the engine's settings (and the dtype and device the
    model really runs in), the server's request defaults (`--fast` sets the threshold), every
    SamplingParams field's default and the bounds a request is checked against."""
    param = next(iter(engine.model.parameters()), None)
    settings = dataclasses.asdict(engine.config)
    if param is not None:
        settings["model_dtype"], settings["model_device"] = str(param.dtype).removeprefix("torch."), str(param.device)
    plain = SamplingParams()
    defaults = {f.name: getattr(plain, f.name) for f in dataclasses.fields(SamplingParams)}
    context = int(getattr(engine.model.config, "max_position_embeddings", 0) or 0)
    return {"object": "engine", "model": config.model_name, "engine": settings,
            "request_defaults": dict(config.defaults), "sampling_params": defaults,
            # the API's names of the fields it takes under OpenAI's names
            "api_names": {"max_new_tokens": "max_tokens", "stop_strings": "stop"},
            "bounds": {"max_steps": MAX_STEPS, "max_temperature": MAX_TEMPERATURE, "context": context,
                       "remasking": list(REMASKING), "max_n": config.max_n}}


def create_app(loop: EngineLoop, config: ServerConfig) -> "Guard":
    metrics = Metrics(loop)
    serving = OpenAIServing(loop, config, metrics)
    api = FastAPI(title="diffutron-engine", docs_url="/docs" if config.docs else None,
                  openapi_url="/openapi.json" if config.docs else None, redoc_url=None)
    api.state.metrics, api.state.serving = metrics, serving

    @api.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        metrics.outcome(_outcome(exc.status, exc.body["error"]["code"]))
        return JSONResponse(exc.body, status_code=exc.status,
                            headers={"connection": "close"} if exc.status in _CLOSE else None)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):  # 404, 405 of the router
        message = {404: f"no route {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        metrics.outcome("rejected")
        return JSONResponse(error_body(exc.status_code, message), status_code=exc.status_code, headers=exc.headers)

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # a bug: logged, never a traceback in the response
        log.error("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
        metrics.outcome("failed")
        return JSONResponse(error_body(500, "internal error"), status_code=500)

    @api.get("/health")
    async def health():
        return {"status": "ok"}

    files = static_files()

    def static(name: str) -> Response:
        if name not in files:
            raise ApiError(404, f"no file {name!r:.100} in the playground")
        content, kind = files[name]
        return Response(content, media_type=kind, headers={"cache-control": "no-cache"})

    @api.get("/")
    async def playground():
        return static("index.html")

    @api.get("/static/{name}")
    async def static_file(name: str):
        return static(name)

    info = engine_info(loop.engine, config)

    @api.get("/v1/engine")
    async def engine():
        return info

    @api.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    model_card = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "diffutron-engine"}

    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @api.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != config.model_name:
            raise ApiError(404, f"the model {model_id!r:.100} does not exist", param="model", code="model_not_found")
        return model_card

    async def handle(request: Request, chat: bool):
        raw = await read_body(request.receive, config.max_body_bytes, config.timeout_body)
        req = await serving.parse(raw, chat)
        watcher = DisconnectWatcher(request.receive)
        try:
            result = await serving.create(req, watcher.on_gone)
        except BaseException:
            watcher.stop()
            raise
        if isinstance(result, dict):
            watcher.stop()
            return JSONResponse(result)
        return StreamingResponse(_watched(result, watcher), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache"})

    @api.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    return Guard(api, config, metrics, serving, open_paths={"/health", "/", *(f"/static/{n}" for n in files)})


def _outcome(status: int, code: str | None) -> str:
    if status == 503 and code == "shutdown":
        return "shutdown"
    return {401: "unauthorized", 408: "timeout", 413: "too_large", 499: "disconnected"}.get(
        status, "failed" if status >= 500 else "rejected")


async def read_body(receive, limit: int, timeout: float) -> bytes:
    """The request body, counted as it arrives (with a Content-Length or chunked): 413 past `limit`
    bytes, before more is held; 408 if the whole body takes longer than `timeout` seconds."""
    aloop = asyncio.get_running_loop()
    deadline = aloop.time() + timeout if timeout > 0 else None  # 0: no deadline, as --timeout-header's 0
    parts, total = [], 0
    while True:
        try:
            left = None if deadline is None else max(0.0, deadline - aloop.time())
            message = await asyncio.wait_for(receive(), left)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {timeout:g} s (--timeout-body)") from None
        if message["type"] == "http.disconnect":
            raise ApiError(499, "the client closed the connection")
        part = message.get("body", b"")
        total += len(part)
        if total > limit:
            raise ApiError(413, f"the request body is over {limit:,} bytes (--max-body-bytes)")
        parts.append(part)
        if not message.get("more_body", False):
            return b"".join(parts)


class DisconnectWatcher:
    """Waits for the client's disconnect once the body is read, and runs the registered callbacks (the
    abort of the request's engine requests) the moment it comes, streaming or not."""

    def __init__(self, receive):
        self.gone = False
        self._callbacks: list[Callable[[], None]] = []
        self._task = asyncio.ensure_future(self._watch(receive))

    async def _watch(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.05)  # a server that hands out empty bodies would otherwise spin
        self.gone = True
        for callback in self._callbacks:
            callback()

    def on_gone(self, callback: Callable[[], None]) -> None:
        if self.gone:
            callback()
        else:
            self._callbacks.append(callback)

    def stop(self) -> None:
        self._task.cancel()


async def _watched(events: AsyncIterator[bytes], watcher: DisconnectWatcher) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield event
    finally:
        watcher.stop()
        await events.aclose()


class Guard:
    """Plain ASGI in front of the routes: the bearer key on every route but the open ones (/health, the
    playground's page and files; compared in constant time), and a declared body over the limit refused
    before a byte of it is read."""

    def __init__(self, app, config: ServerConfig, metrics: Metrics, serving: OpenAIServing,
                 open_paths: set[str] = frozenset({"/health"})):
        self.app, self.metrics, self.serving = app, metrics, serving
        self.open_paths = frozenset(open_paths)
        self.max_body = config.max_body_bytes
        self._key = None if config.api_key is None else _digest(b"Bearer " + config.api_key.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":  # lifespan
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])  # lower-case names; a repeated header keeps its last value
        if self._key is not None and scope["path"] not in self.open_paths:
            if not hmac.compare_digest(_digest(headers.get(b"authorization", b"")), self._key):
                self.metrics.outcome("unauthorized")
                return await _send_json(send, 401, error_body(
                    401, "missing or wrong API key (send Authorization: Bearer KEY)", code="invalid_api_key"),
                    [(b"www-authenticate", b"Bearer")])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            self.metrics.outcome("too_large")
            return await _send_json(send, 413, error_body(
                413, f"the request body is over {self.max_body:,} bytes (--max-body-bytes)"),
                [(b"connection", b"close")])
        await self.app(scope, receive, send)


def _digest(value: bytes) -> bytes:
    # equal-length digests: compare_digest then takes the same time whatever the key's length
    return hashlib.sha256(value).digest()


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})
