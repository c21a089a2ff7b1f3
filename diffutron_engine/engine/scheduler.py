"""The scheduler: plain Python, no tensors. It admits waiting requests into the running batch, groups
them by length bucket to limit padding, and removes finished or aborted ones.

Continuous batching over blocks: a request joins the running batch as soon as a slot is free; it
starts at its own first block, whose first step is a full (cache-refreshing) forward, so joining never
disturbs the blocks that other rows are in the middle of.

Admission costs O(log b) per admitted request, b the number of length buckets that hold waiting
requests: one FIFO queue per bucket, a sorted list of the non-empty buckets, and a FIFO of all waiting
requests for "the oldest one" (entries of requests that left are skipped when met).
"""

from __future__ import annotations

import bisect
import time
from collections import deque

from .request import Request, Status


class Scheduler:
    def __init__(self, max_batch: int, bucket_width: int = 64):
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_batch = max_batch
        self.bucket_width = bucket_width
        self.running: list[Request] = []  # in batch-row order
        self._queues: dict[int, deque[Request]] = {}
        self._keys: list[int] = []  # sorted buckets with a non-empty queue
        self._arrivals: deque[Request] = deque()  # every waiting request, oldest first
        self._waiting = 0
        self._arrival = 0
        # Bucket preference may pass over the oldest waiting request; after this many admissions of
        # others in a row it goes next, so a request of a rare length is never starved.
        self.max_bypass = 4 * max_batch
        self._bypassed = 0

    # ------------------------------------------------------------------ queues
    def _bucket(self, req: Request) -> int:
        return req.length // self.bucket_width

    def add(self, req: Request) -> None:
        req.status, req.arrival = Status.WAITING, self._arrival
        self._arrival += 1
        key = self._bucket(req)
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = deque()
            bisect.insort(self._keys, key)
        q.append(req)
        self._arrivals.append(req)
        self._waiting += 1

    def remove(self, req: Request) -> bool:
        """Take a waiting or running request out (abort); returns whether it was here."""
        if req.status is Status.WAITING:
            req.status = Status.FINISHED  # its queue entries are skipped when met
            self._waiting -= 1
            if not self._waiting:
                self._forget()
            return True
        if req.status is Status.RUNNING and req in self.running:
            self.running.remove(req)
            return True
        return False

    def retire(self, finished: list[Request]) -> None:
        if finished:
            gone = set(map(id, finished))
            self.running = [r for r in self.running if id(r) not in gone]

    @property
    def num_waiting(self) -> int:
        return self._waiting

    def _head(self, key: int) -> Request | None:
        """The oldest live request of bucket `key` (drops entries of requests that left)."""
        q = self._queues[key]
        while q and q[0].status is not Status.WAITING:
            q.popleft()
        if not q:
            del self._queues[key]
            self._keys.pop(bisect.bisect_left(self._keys, key))
            return None
        return q[0]

    def _oldest(self) -> Request:
        while self._arrivals[0].status is not Status.WAITING:  # admitted or aborted since
            self._arrivals.popleft()
        return self._arrivals[0]

    def _nearest(self, target: int) -> Request:
        """The head of the non-empty bucket nearest to `target` (the older head on a tie)."""
        while True:
            i = bisect.bisect_left(self._keys, target)
            picks = [k for k in self._keys[max(i - 1, 0): i + 1]]
            heads = [(abs(k - target), h.arrival, h) for k in picks if (h := self._head(k)) is not None]
            if heads:
                return min(heads, key=lambda t: (t[0], t[1]))[2]

    # ------------------------------------------------------------------ one step
    def schedule(self) -> list[Request]:
        """The rows to run this step: every running request, after admitting waiting ones while slots
        are free (the nearest length bucket to the running batch's first row, oldest first; the oldest
        waiting request when nothing runs or when it has been passed over `max_bypass` times)."""
        now = None
        while self._waiting and len(self.running) < self.max_batch:
            oldest = self._oldest()
            if self.running and self._bypassed < self.max_bypass:
                req = self._nearest(self._bucket(self.running[0]))
            else:  # nothing running, or the oldest request was passed over long enough: no starvation
                req = oldest
            self._bypassed = 0 if req is oldest else self._bypassed + 1
            q = self._queues[self._bucket(req)]
            while q[0] is not req:  # entries of requests that left (aborted) come first
                q.popleft()
            q.popleft()
            self._waiting -= 1
            now = now or time.perf_counter()
            req.status, req.started_at = Status.RUNNING, now
            self.running.append(req)
        if not self._waiting:
            self._forget()
        return self.running

    def _forget(self) -> None:
        """Nothing waits: drop the queues' entries of requests that left (they would keep finished
        requests alive in a long-running process)."""
        self._arrivals.clear()
        self._queues.clear()
        self._keys.clear()
