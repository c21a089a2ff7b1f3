"""The OpenAI-compatible HTTP API (WIP, issue 11): /v1/completions, /v1/chat/completions (with
server-sent-event streaming), /v1/models, /health. Errors in OpenAI's shape, never a traceback.
Imports FastAPI at module level (the `serve` extra): FastAPI resolves handler annotations from the
module's globals."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..config import SamplingParams
from ..errors import DiffutronError
from ..loading import encode_prompt
from .loop import STEP_BUCKETS, EngineLoop

log = logging.getLogger("diffutron_engine.server")

# request fields the API takes besides the diffusion knobs (SamplingParams' own names)
OPENAI_FIELDS = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "seed", "stop",
                 "n", "stream", "stream_options", "user"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type_, "param": param, "code": code}}


# OpenAI fields the engine has no counterpart for: accepted at their neutral values (clients send them by
# default), refused with a clear message otherwise
NEUTRAL = {"top_p": (1, 1.0, None), "frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None),
           "logprobs": (None, False), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
           "logit_bias": (None, {}), "suffix": (None,)}


def sampling_params(body: dict) -> SamplingParams:
    """SamplingParams from a request body: OpenAI's fields, and any SamplingParams field as an extra."""
    knobs = {}
    for key, value in body.items():
        if key in OPENAI_FIELDS:
            continue
        if key in NEUTRAL:
            if not any(value == v and type(value) is type(v) for v in NEUTRAL[key] if v is not None) \
                    and value is not None:
                raise ApiError(400, f"{key}={value!r} is not supported by a masked diffusion sampler "
                               f"(leave it out; repetition_penalty, temperature and the commit rules are)", param=key)
            continue
        if key not in SamplingParams.__dataclass_fields__:
            raise ApiError(400, f"unknown field {key!r}", param=key)
        knobs[key] = value
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        knobs["max_new_tokens"] = max_tokens
    for key in ("temperature", "seed"):
        if body.get(key) is not None:
            knobs[key] = body[key]
    if body.get("stop") is not None:
        knobs["stop_strings"] = [body["stop"]] if isinstance(body["stop"], str) else body["stop"]
    try:
        return SamplingParams(**knobs)
    except (DiffutronError, TypeError, ValueError) as exc:  # in the API's names
        raise ApiError(400, str(exc).replace("max_new_tokens", "max_tokens")) from None


def create_app(loop: EngineLoop, model_name: str, api_key: str | None = None, max_queue: int = 256,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    app = FastAPI(title="diffutron-engine")
    tokenizer = loop.engine.tokenizer
    metrics = Metrics(loop)
    app.state.metrics = metrics

    @app.middleware("http")
    async def _guard(request: Request, call_next):
        """Bearer key on /v1 (when one is set), and the body limit, before any handler runs."""
        if api_key is not None and request.url.path.startswith("/v1"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                metrics.outcome("unauthorized")
                return JSONResponse(ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                             code="invalid_api_key").body, status_code=401)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            metrics.outcome("too_large")
            return JSONResponse(ApiError(413, f"the request body is over {max_body_bytes} bytes").body, status_code=413)
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        metrics.outcome("rejected" if exc.status < 500 else "failed")
        return JSONResponse(exc.body, status_code=exc.status)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):  # a bug: logged, never a traceback in the response
        log.exception("unexpected error")
        metrics.outcome("failed")
        return JSONResponse(ApiError(500, "internal error", type_="server_error").body, status_code=500)

    @app.get("/metrics")
    async def prometheus():
        from fastapi.responses import PlainTextResponse

        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    async def _body(request: Request) -> dict:
        raw = await request.body()
        if len(raw) > max_body_bytes:  # no (or a false) Content-Length
            raise ApiError(413, f"the request body is over {max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        except RecursionError:  # the parser recurses once per level of nesting
            raise ApiError(400, "the request body is JSON nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if body.get("model") not in (None, model_name):
            raise ApiError(404, f"the model {body.get('model')!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return body

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "diffutron-engine"}]}

    async def _complete(request: Request, chat: bool):
        body = await _body(request)
        params = sampling_params(body)
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "messages must be a non-empty list", param="messages")
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages):
                raise ApiError(400, 'each message must be an object with a string "role" and "content"',
                               param="messages")
            prompts = [messages]
        else:
            prompt = body.get("prompt")
            prompts = [prompt] if isinstance(prompt, str) else prompt
            if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
                raise ApiError(400, "prompt must be a non-empty string or a list of them", param="prompt")
            prompts = [encode_prompt(tokenizer, p, chat=False) for p in prompts]
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 16:
            raise ApiError(400, "n must be an integer in [1, 16]", param="n")
        if loop.in_flight + len(prompts) * n > max_queue:
            raise ApiError(429, f"the server has {loop.in_flight} requests in flight (at most {max_queue}); retry later",
                           type_="rate_limit_error")
        jobs = []
        try:
            for i, prompt in enumerate(prompts):
                for j in range(n):
                    seed = None if params.seed is None else (params.seed + j) % 2**63
                    rid, queue = loop.submit(prompt, params.override(seed=seed) if seed is not None else params,
                                             prefix="chatcmpl" if chat else "cmpl")
                    jobs.append((i * n + j, rid, queue))
        except DiffutronError as exc:
            for _, rid, _ in jobs:
                loop.abort(rid)
            raise ApiError(400, str(exc).replace("max_new_tokens", "max_tokens")) from None
        created, rid0 = int(time.time()), jobs[0][1]
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_stream(request, jobs, chat, created, rid0, usage, n),
                                     media_type="text/event-stream")
        gathered = asyncio.ensure_future(asyncio.gather(*(_final(q) for _, _, q in jobs)))
        try:
            while not gathered.done():  # a client that goes away frees its slots at once
                await asyncio.wait([gathered], timeout=0.1)
                if not gathered.done() and await request.is_disconnected():
                    gathered.cancel()
                    metrics.outcome("disconnected")
                    raise ApiError(499, "the client closed the connection")
            finals = gathered.result()
        except BaseException:  # the client left, or a request failed: the others stop at the next step
            for _, rid, _ in jobs:
                loop.abort(rid)
            raise
        choices = [_choice(idx, out.text, _reason(out), chat) for (idx, _, _), out in zip(jobs, finals)]
        prompt_tokens = sum(len(out.prompt_token_ids) for out in finals[::n])
        completion = sum(out.new_tokens for out in finals)
        metrics.outcome("ok")
        metrics.tokens(prompt_tokens, completion)
        return {"id": rid0, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}

    async def _stream(request, jobs, chat, created, rid0, include_usage=False, n=1):
        kind = "chat.completion.chunk" if chat else "text_completion"
        pending = {rid: (idx, q) for idx, rid, q in jobs}
        finals, waiters = {}, {}
        try:
            waiters.update({asyncio.ensure_future(q.get()): rid for rid, (_, q) in pending.items()})
            while waiters:
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    rid = waiters.pop(fut)
                    out = fut.result()
                    if isinstance(out, BaseException):
                        raise out
                    idx = pending[rid][0]
                    if out.delta or out.finished:
                        choice = (_delta(idx, out.delta, _reason(out) if out.finished else None) if chat else
                                  _choice(idx, out.delta, _reason(out) if out.finished else None, False))
                        yield f"data: {json.dumps({'id': rid0, 'object': kind, 'created': created, 'model': model_name, 'choices': [choice]})}\n\n"
                    if not out.finished:
                        waiters[asyncio.ensure_future(pending[rid][1].get())] = rid
                    else:
                        finals[rid] = out
            prompt_tokens = sum(len(finals[rid].prompt_token_ids) for idx, rid, _ in jobs if idx % n == 0)
            completion = sum(out.new_tokens for out in finals.values())
            metrics.outcome("ok")
            metrics.tokens(prompt_tokens, completion)
            if include_usage:  # OpenAI's last chunk: no choices, the usage
                yield "data: " + json.dumps({"id": rid0, "object": kind, "created": created, "model": model_name,
                                             "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                                      "completion_tokens": completion,
                                                                      "total_tokens": prompt_tokens + completion}}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:  # also when the client goes away mid-stream: what has not finished stops at the next step
            for fut in waiters:
                fut.cancel()
            for rid in pending.keys() - finals.keys():
                loop.abort(rid)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(request, chat=True)

    return app


class Metrics:
    """Prometheus text for /metrics: requests by outcome, tokens, queue length, running batch size and a
    histogram of step times."""

    def __init__(self, loop: EngineLoop):
        self.loop = loop
        self.outcomes: dict[str, int] = {}
        self.prompt_tokens = self.generated_tokens = 0

    def outcome(self, name: str) -> None:
        self.outcomes[name] = self.outcomes.get(name, 0) + 1

    def tokens(self, prompt: int, generated: int) -> None:
        self.prompt_tokens += prompt
        self.generated_tokens += generated

    def render(self) -> str:
        stats = self.loop.stats
        lines = ["# TYPE diffutron_requests_total counter"]
        lines += [f'diffutron_requests_total{{outcome="{k}"}} {v}' for k, v in sorted(self.outcomes.items())]
        lines += ["# TYPE diffutron_prompt_tokens_total counter", f"diffutron_prompt_tokens_total {self.prompt_tokens}",
                  "# TYPE diffutron_generation_tokens_total counter",
                  f"diffutron_generation_tokens_total {self.generated_tokens}",
                  "# TYPE diffutron_requests_in_flight gauge", f"diffutron_requests_in_flight {self.loop.in_flight}",
                  "# TYPE diffutron_running_batch_size gauge", f"diffutron_running_batch_size {stats.running}",
                  "# TYPE diffutron_failed_steps_total counter", f"diffutron_failed_steps_total {stats.failed_steps}",
                  "# TYPE diffutron_failed_requests_total counter",
                  f"diffutron_failed_requests_total {stats.failed_requests}",
                  "# TYPE diffutron_step_seconds histogram"]
        total = 0
        for b, c in zip(STEP_BUCKETS + (float("inf"),), list(stats.step_hist)):
            total += c
            lines.append(f'diffutron_step_seconds_bucket{{le="{"+Inf" if b == float("inf") else b}"}} {total}')
        lines += [f"diffutron_step_seconds_sum {stats.step_sum}", f"diffutron_step_seconds_count {total}"]
        return "\n".join(lines) + "\n"


async def _final(queue: asyncio.Queue):
    while True:
        out = await queue.get()
        if isinstance(out, BaseException):
            raise ApiError(503, f"the request failed: {out}", type_="server_error")
        if out.finished:
            return out


def _reason(out) -> str:
    return {"abort": "abort", "answer ended": "stop"}.get(out.finish_reason, "length")


def _choice(index: int, text: str, reason: str | None, chat: bool) -> dict:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}


def _delta(index: int, text: str, reason: str | None) -> dict:
    return {"index": index, "delta": {"content": text}, "finish_reason": reason}
