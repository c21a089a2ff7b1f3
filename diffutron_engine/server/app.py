"""The OpenAI-compatible HTTP API (WIP, issue 11): /v1/completions, /v1/chat/completions (with
server-sent-event streaming), /v1/models, /health. Errors in OpenAI's shape, never a traceback.
Imports FastAPI at module level (the `serve` extra): FastAPI resolves handler annotations from the
module's globals."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..config import SamplingParams
from ..errors import DiffutronError
from ..loading import encode_prompt
from .loop import EngineLoop

# request fields the API takes besides the diffusion knobs (SamplingParams' own names)
OPENAI_FIELDS = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "seed", "stop",
                 "n", "stream", "stream_options", "user"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.body = status, {"error": {"message": message, "type": type_, "param": param, "code": code}}


def sampling_params(body: dict) -> SamplingParams:
    """SamplingParams from a request body: OpenAI's fields, and any SamplingParams field as an extra."""
    knobs = {}
    for key, value in body.items():
        if key in OPENAI_FIELDS:
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
        knobs["stop"] = [body["stop"]] if isinstance(body["stop"], str) else body["stop"]
    try:
        return SamplingParams(**knobs)
    except (DiffutronError, TypeError, ValueError) as exc:
        raise ApiError(400, str(exc)) from None


def create_app(loop: EngineLoop, model_name: str) -> FastAPI:
    app = FastAPI(title="diffutron-engine")
    tokenizer = loop.engine.tokenizer

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return JSONResponse(exc.body, status_code=exc.status)

    async def _body(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
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
            raise ApiError(400, str(exc)) from None
        created, rid0 = int(time.time()), jobs[0][1]
        if body.get("stream"):
            return StreamingResponse(_stream(request, jobs, chat, created, rid0), media_type="text/event-stream")
        try:
            finals = await asyncio.gather(*(_final(q) for _, _, q in jobs))
        except asyncio.CancelledError:  # the client went away
            for _, rid, _ in jobs:
                loop.abort(rid)
            raise
        choices = [_choice(idx, out.text, _reason(out), chat) for (idx, _, _), out in zip(jobs, finals)]
        prompt_tokens = sum(len(out.prompt_token_ids) for out in finals[::n])
        completion = sum(out.new_tokens for out in finals)
        return {"id": rid0, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                          "total_tokens": prompt_tokens + completion}}

    async def _stream(request, jobs, chat, created, rid0):
        kind = "chat.completion.chunk" if chat else "text_completion"
        pending = {rid: (idx, q) for idx, rid, q in jobs}
        try:
            waiters = {asyncio.ensure_future(q.get()): rid for rid, (_, q) in pending.items()}
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
            yield "data: [DONE]\n\n"
        finally:
            for fut in list(locals().get("waiters", {})):
                fut.cancel()
            for rid in pending:
                loop.abort(rid)  # finished ones are ignored by the engine

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(request, chat=True)

    return app


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
