"""The server's engine loop: one thread steps one Engine; HTTP handlers (on the asyncio event loop) add
requests and await their outputs.

Why a thread: a step is a blocking call into torch (milliseconds to seconds on CPU); running it on the
event loop would stall every connection. The engine's add_request/abort are thread-safe (a locked
inbox drained by step()), so the serving layer calls add_request from its worker threads (tokenizing and
scheduling a request take milliseconds to seconds too) and abort from anywhere; outputs travel back
through one asyncio queue per request, filled with loop.call_soon_threadsafe. Requests that arrive
mid-flight join the running batch at the engine's next admission (its block boundary).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field

from ..engine import Engine, RequestOutput, StepFailed

log = logging.getLogger("diffutron_engine.server")


class ShuttingDown(RuntimeError):
    """What the requests still running get when the server stops: past the drain timeout, or the loop's end."""


# Upper bounds (seconds) of the step-time histogram's buckets, Prometheus style (the last one is +Inf).
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class StepStats:
    """What the loop measured, for /metrics (read without a lock: plain counters, torn reads harmless).
    Step times go straight into fixed histogram buckets: a server that is never scraped keeps a constant
    amount of them, not one number per step."""

    steps: int = 0
    step_hist: list[int] = field(default_factory=lambda: [0] * (len(STEP_BUCKETS) + 1))  # per bucket, +Inf last
    step_sum: float = 0.0
    running: int = 0  # rows of the running batch after the last step
    failed_steps: int = 0
    failed_requests: int = 0

    def observe(self, seconds: float) -> None:
        self.steps += 1
        self.step_sum += seconds
        self.step_hist[bisect.bisect_left(STEP_BUCKETS, seconds)] += 1


class EngineLoop:
    def __init__(self, engine: Engine, idle_wait: float = 0.05):
        self.engine = engine
        self.stats = StepStats()
        self._idle_wait = idle_wait
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="diffutron-engine-loop", daemon=True)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop stepping (after the current step); requests still live are aborted."""
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        with self._lock:
            return len(self._queues)

    # ------------------------------------------------------------------ requests (any thread)
    def submit(self, prompt, params, aloop: asyncio.AbstractEventLoop,
               prefix: str = "cmpl") -> tuple[str, asyncio.Queue]:
        """Queue a prompt; returns its id and the queue its outputs arrive on, in event loop `aloop`.
        Called from a worker thread (tokenizing and scheduling are not the event loop's work). Bad input
        raises the engine's DiffutronError here, before anything is registered."""
        rid = f"{prefix}-{uuid.uuid4().hex}"
        queue: asyncio.Queue = asyncio.Queue()  # bound to `aloop` at its first get, there
        with self._lock:  # registered before the engine can report on it
            self._queues[rid] = (aloop, queue)
        try:
            self.engine.add_request(prompt, params, request_id=rid)
        except BaseException:
            with self._lock:
                self._queues.pop(rid, None)
            raise
        self._wake.set()
        return rid, queue

    def abort(self, rid: str) -> None:
        """Stop a request (a client that went away): its slot is freed at the next step."""
        self.engine.abort(rid)
        self._wake.set()

    # ------------------------------------------------------------------ the loop (its own thread)
    def _run(self) -> None:
        while not self._stopping.is_set():
            if not self.engine.has_unfinished():
                self._wake.wait(self._idle_wait)
                self._wake.clear()
                continue
            t = time.perf_counter()
            try:
                outputs = self.engine.step()
            except StepFailed as exc:  # the engine already ended the step's requests with an error and
                # removed them: their clients get the error, everything else goes on
                log.error("engine step failed: %s", exc, exc_info=exc.__cause__)
                self.stats.failed_steps += 1
                outputs = exc.outputs
            except Exception as exc:  # not the engine's step: nothing in flight can be trusted
                log.exception("engine loop failed")
                self.stats.failed_steps += 1
                self.fail_all(exc)
                continue
            self.stats.observe(time.perf_counter() - t)
            # the rows still running: not the step's outputs, which also report aborted and finished ones
            self.stats.running = len(self.engine.scheduler.running)
            self._deliver(outputs)
        self.fail_all(ShuttingDown("the server is shutting down"))

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Each output to its request's queue; a request that failed (its step raised) gets the error
        instead, which its handler answers with 503. Finished requests leave the table."""
        for out in outputs:
            with self._lock:
                target = self._queues.pop(out.request_id, None) if out.finished else self._queues.get(out.request_id)
            item = out
            if out.finish_reason == "error":  # its handler answers 503 with the error's message
                self.stats.failed_requests += 1
                item = out.error
            if target is not None:
                loop, queue = target
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                except RuntimeError:  # its event loop is closed: nobody is waiting
                    pass

    def fail_all(self, exc: BaseException) -> None:
        """End every request in flight with `exc` (their handlers answer 503); the engine drops them at
        its next step. Thread-safe: the drain deadline calls it from a timer thread."""
        with self._lock:
            targets, self._queues = list(self._queues.items()), {}
        for rid, (loop, queue) in targets:
            self.engine.abort(rid)
            try:
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            except RuntimeError:  # its event loop is closed: nobody is waiting
                pass
