"""Completions and chat completions over the engine loop.

A request's path: its body bounded as it is read (the app), parsed and validated without tokenizing
(protocol, in a worker thread), checked against the queue and given its places, tokenized and added to
the engine (a worker thread: both can take seconds, and the event loop must keep answering everyone),
then awaited: one JSON answer, or server-sent events as the text settles. A client that goes away has
its requests aborted as soon as its connection closes, so the engine frees their rows at its next step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from ..config import seed_for
from ..errors import DiffutronError
from ..inputs import ChatPrompt, TextPrompt, TokensPrompt
from . import protocol
from .config import ServerConfig
from .loop import EngineLoop, ShuttingDown
from .metrics import Metrics
from .protocol import ApiError, CompletionRequest
from .trace import TraceEncoder

log = logging.getLogger("diffutron_engine.server")

# (index among the response's choices, request id, its output queue)
Job = tuple[int, str, asyncio.Queue]


class OpenAIServing:
    def __init__(self, loop: EngineLoop, config: ServerConfig, metrics: Metrics, workers: int = 4):
        self.loop, self.config, self.metrics = loop, config, metrics
        self.traces = TraceEncoder(loop.engine.tokenizer)
        # bounded: a burst of large prompts waits here, not in the event loop nor in unbounded threads
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="diffutron-serving")
        self._reserved = 0  # places taken by requests being tokenized (read and written on the event loop)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def parse(self, raw: bytes, chat: bool) -> CompletionRequest:
        def work():
            return protocol.parse_request(protocol.parse_json(raw), chat=chat, config=self.config)

        return await asyncio.get_running_loop().run_in_executor(self._pool, work)

    async def create(self, req: CompletionRequest, on_gone: Callable[[Callable[[], None]], None]):
        """The answer to a validated request: a dict (non-streaming) or an async iterator of SSE bytes.
        `on_gone(cancel)` registers what to run when the client goes away."""
        jobs = await self._submit(req)
        on_gone(lambda: self._abort(jobs))
        created, rid0 = int(time.time()), jobs[0][1]
        if req.stream:
            return self._stream(req, jobs, created, rid0)
        return await self._complete(req, jobs, created, rid0)

    # ------------------------------------------------------------------ submission
    async def _submit(self, req: CompletionRequest) -> list[Job]:
        size = req.size
        in_flight = self.loop.in_flight + self._reserved
        if in_flight + size > self.config.max_queue:
            raise ApiError(429, f"the server has {in_flight} requests in flight (at most {self.config.max_queue}); "
                           "retry later", type_="rate_limit_error")
        self._reserved += size  # checked and taken in one event-loop turn: no other request slips in
        aloop = asyncio.get_running_loop()
        work = aloop.run_in_executor(self._pool, self._add, req, aloop)
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:  # the handler was cancelled mid-submission: undo what got added
            work.add_done_callback(lambda f: f.cancelled() or f.exception() or self._abort(f.result()))
            raise
        finally:
            self._reserved -= size

    def _add(self, req: CompletionRequest, aloop: asyncio.AbstractEventLoop) -> list[Job]:
        """Add each prompt's n choices, tokenized once by the engine (worker thread); all or none."""
        jobs: list[Job] = []
        prefix = "chatcmpl" if req.chat else "cmpl"
        try:
            for i, prompt in enumerate(req.prompts):
                # completions: the prompt as it is; chat: the messages through the chat template
                given = ChatPrompt(messages=prompt) if req.chat else TextPrompt(prompt=prompt, chat_template=False)
                ids = TokensPrompt(prompt_token_ids=self.loop.engine.encode(given))
                for j in range(req.n):
                    params = req.params
                    if params.seed is not None and j:  # choice j draws from seed + j, as prompt i offline
                        params = params.override(seed=seed_for(params.seed, j))
                    rid, queue = self.loop.submit(ids, params, aloop, prefix=prefix)
                    jobs.append((i * req.n + j, rid, queue))
        except DiffutronError as exc:
            self._abort(jobs)
            raise ApiError(400, str(exc).replace("max_new_tokens", "max_tokens"),
                           param="messages" if req.chat else "prompt") from None
        except BaseException:
            self._abort(jobs)
            raise
        return jobs

    def _abort(self, jobs: list[Job]) -> None:
        for _, rid, _ in jobs:
            self.loop.abort(rid)

    # ------------------------------------------------------------------ answers
    async def _complete(self, req: CompletionRequest, jobs: list[Job], created: int, rid0: str) -> dict:
        try:
            traces = [[] for _ in jobs] if req.params.trace else None
            finals = await asyncio.gather(*(_final(q, traces[i] if traces is not None else None)
                                            for i, (_, _, q) in enumerate(jobs)))
        except BaseException:  # one failed (or the handler was cancelled): the others stop at the next step
            self._abort(jobs)
            raise
        if any(out.finish_reason == "abort" for out in finals):  # the client went away: nobody to answer
            raise ApiError(499, "the client closed the connection")
        choices = [protocol.choice(idx, out.text, protocol.finish_reason(out), req.chat)
                   for (idx, _, _), out in zip(jobs, finals)]
        if traces is not None:  # every step of each choice
            for c, out, steps in zip(choices, finals, traces):
                c["trace"] = [self.traces.step(s, len(out.prompt_token_ids)) for s in steps]
        prompt_tokens = sum(len(out.prompt_token_ids) for out in finals[::req.n])
        completion = sum(out.new_tokens for out in finals)
        self.metrics.outcome("ok")
        self.metrics.tokens(prompt_tokens, completion)
        return protocol.response(rid0, created, self.config.model_name, choices,
                                 protocol.usage(prompt_tokens, completion), req.chat)

    async def _stream(self, req: CompletionRequest, jobs: list[Job], created: int, rid0: str
                      ) -> AsyncIterator[bytes]:
        model, chat = self.config.model_name, req.chat
        index = {rid: (idx, q) for idx, rid, q in jobs}
        finals, waiters = {}, {}
        try:
            waiters.update({asyncio.ensure_future(q.get()): rid for rid, (_, q) in index.items()})
            while waiters:
                done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    rid = waiters.pop(fut)
                    out = fut.result()
                    if isinstance(out, BaseException):
                        raise _as_api_error(out)
                    if out.finish_reason == "abort":  # the client went away
                        self.metrics.outcome("disconnected")
                        return
                    idx = index[rid][0]
                    if out.delta or out.finished or out.trace is not None:  # a traced request: every step
                        reason = protocol.finish_reason(out) if out.finished else None
                        choice = protocol.delta_choice(idx, out.delta, reason, chat)
                        if out.trace is not None:
                            choice["trace"] = self.traces.step(out.trace, len(out.prompt_token_ids))
                        yield protocol.sse(protocol.chunk(rid0, created, model, [choice], chat))
                    if out.finished:
                        finals[rid] = out
                    else:
                        waiters[asyncio.ensure_future(index[rid][1].get())] = rid
            prompt_tokens = sum(len(finals[rid].prompt_token_ids) for idx, rid, _ in jobs if idx % req.n == 0)
            completion = sum(out.new_tokens for out in finals.values())
            self.metrics.outcome("ok")
            self.metrics.tokens(prompt_tokens, completion)
            if req.include_usage:  # OpenAI's last chunk: no choices, the usage
                yield protocol.sse(protocol.chunk(rid0, created, model, [], chat,
                                                  protocol.usage(prompt_tokens, completion)))
            yield protocol.sse("[DONE]")
        except ApiError as exc:  # the status line is long gone: the error travels as an event
            self.metrics.outcome("shutdown" if exc.status == 503 and exc.body["error"]["code"] == "shutdown"
                                 else "failed")
            yield protocol.sse(exc.body)
            yield protocol.sse("[DONE]")
        except (asyncio.CancelledError, GeneratorExit):  # the response was torn down: the client left
            self.metrics.outcome("disconnected")
            raise
        finally:  # also when the client goes away mid-stream: what has not finished stops at the next step
            for fut in waiters:
                fut.cancel()
            self._abort([job for job in jobs if job[1] not in finals])


async def _final(queue: asyncio.Queue, traces: list | None = None):
    """The request's final output; every step's trace appended to `traces` on the way when given."""
    while True:
        out = await queue.get()
        if isinstance(out, BaseException):
            raise _as_api_error(out)
        if traces is not None and out.trace is not None:
            traces.append(out.trace)
        if out.finished:
            return out


def _as_api_error(exc: BaseException) -> ApiError:
    if isinstance(exc, ShuttingDown):
        return ApiError(503, f"the request did not finish before the server stopped: {exc}", type_="server_error",
                        code="shutdown")
    return ApiError(503, f"the request failed: {exc}", type_="server_error")
