"""The scheduler: plain Python, no tensors. It admits waiting requests into the running batch, groups
them by length bucket to limit padding, and retires rows whose answer is complete.

Continuous batching over blocks: a request joins the running batch as soon as a slot is free; it
starts at its own first block, whose first step is a full (cache-refreshing) forward, so joining never
disturbs the blocks that other rows are in the middle of.
"""

from __future__ import annotations

import time
from collections import deque

from typing import Callable

from .request import Request, Status


class Scheduler:
    def __init__(self, max_batch: int, mask_id: int, is_final: Callable[[Request], bool], bucket_width: int = 64):
        """`is_final(req)`: whether a request's answer can no longer change (early stop)."""
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_batch = max_batch
        self.mask_id = mask_id
        self.is_final = is_final
        self.bucket_width = bucket_width
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.finished: list[Request] = []

    def add(self, req: Request) -> None:
        req.skip_complete_blocks(self.mask_id)
        if req.done:  # nothing to fill
            req.status, req.finish_reason = Status.FINISHED, "complete"
            self.finished.append(req)
            return
        req.status = Status.WAITING
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _bucket(self, req: Request) -> int:
        return req.length // self.bucket_width

    def schedule(self) -> list[Request]:
        """The rows to run this step: every running request, after admitting waiting ones."""
        free = self.max_batch - len(self.running)
        if free > 0 and self.waiting:
            # Nearest length bucket first (the running batch's, or the oldest waiting request's), then
            # arrival order: rows of similar length waste little padding in a batch.
            target = self._bucket(self.running[0]) if self.running else self._bucket(self.waiting[0])
            order = {id(r): n for n, r in enumerate(self.waiting)}
            picked = sorted(self.waiting, key=lambda r: (abs(self._bucket(r) - target), order[id(r)]))[:free]
            now = time.perf_counter()
            for r in picked:
                self.waiting.remove(r)
                r.status, r.started_at = Status.RUNNING, now
                self.running.append(r)
        return list(self.running)

    def postprocess(self, batch: list[Request]) -> list[Request]:
        """Advance blocks and retire finished rows; returns the requests that finished this step."""
        done = []
        for req in batch:
            req.skip_complete_blocks(self.mask_id)
            reason = None
            if req.done:
                reason = "complete"
            elif req.config.early_stop and self.is_final(req):
                reason = "answer ended"
            if reason:
                req.status, req.finish_reason, req.finished_at = Status.FINISHED, reason, time.perf_counter()
                done.append(req)
        if done:
            self.running = [r for r in self.running if r.status is Status.RUNNING]
            self.finished.extend(done)
        return done
