"""CUDA graphs for the whole denoising step.

Why: at batch 1 a step of the 22-layer model is a few hundred small kernels (forward, LM head, sampler,
commit, counters); launching them from Python costs more than running them on an H100. The runner's
step reads and writes only persistent device tensors (engine/batch.py) and syncs nothing, so it is
captured once per StepShape and replayed with one launch.

Contract: `run(key, fn)` performs fn() (a step: it mutates the persistent state) for a key that
identifies everything that changes the captured work. The first time a key is seen fn runs eagerly,
on the side stream that captures use: that is the step's real work and the warm-up a capture needs
(Triton compiles, cuBLAS handles and workspaces of that stream, lazily grown tables). The second time fn is captured, which records its kernels without running them, and the
graph is replayed once to do the step; later times only replay. A capture that fails falls back to
eager execution for that key, with a warning: a graph is an optimization, never a reason to fail.
The fallback is counted and its reason kept (`stats()`, `failures`), so that a caller who measures
graphs (the benchmark) can refuse a run that silently went eager.
Graphs share one memory pool: they are replayed one at a time and none keeps data in the pool from one
replay to the next (outputs go to persistent tensors). The caller clears the cache when a tensor that
graphs point at is reallocated.

Counters (cumulative over the object's life; `clear` drops graphs, not counts):
  warmups    first-sight eager runs on the side stream
  captures   graphs captured (a key captured again after eviction or `clear` counts again)
  replays    graph launches, including the one right after each capture
  fallbacks  steps run eagerly because their key's capture failed (the failing step included)
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch

COUNTERS = ("captures", "replays", "fallbacks", "warmups")


class StepGraphs:
    def __init__(self, max_graphs: int = 128, cuda=None):
        """cuda: the namespace the stream, graph and synchronization calls go through (torch.cuda;
        tests pass a stand-in to run this logic without a GPU)."""
        self.max_graphs = max_graphs
        self.cuda = torch.cuda if cuda is None else cuda
        self.graphs: OrderedDict = OrderedDict()
        self.seen: set = set()
        self.eager: set = set()
        self.failures: dict = {}  # key -> why its capture failed (kept across `clear`)
        self.counts = dict.fromkeys(COUNTERS, 0)
        self.pool = None
        self.stream = None  # warm-up and capture share one side stream (per-stream lazy state, cuBLAS)

    def stats(self) -> dict:
        """The counters, as a new dict (see the module's description)."""
        return dict(self.counts)

    def run(self, key, fn) -> None:
        if key in self.eager:
            self.counts["fallbacks"] += 1
            fn()
            return
        graph = self.graphs.get(key)
        if graph is None:
            if key not in self.seen:  # first time: run it for real, which warms everything up
                self.counts["warmups"] += 1
                self._on_side_stream(fn)
                self.seen.add(key)  # only a warm-up that completed counts as one
                return
            try:
                graph = self._capture(fn)
            except Exception as exc:  # capture is best effort: run eagerly from now on for this shape
                warnings.warn(f"CUDA graph capture failed for {key!r} ({exc}); running eagerly", stacklevel=2)
                self.eager.add(key)
                self.failures[key] = f"{type(exc).__name__}: {exc}"
                self.counts["fallbacks"] += 1
                fn()
                return
            self.counts["captures"] += 1
            self.graphs[key] = graph
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        self.counts["replays"] += 1
        graph.replay()

    def _side(self):
        if self.stream is None:
            self.stream = self.cuda.Stream()
        return self.stream

    def _on_side_stream(self, fn) -> None:
        side, main = self._side(), self.cuda.current_stream()
        side.wait_stream(main)
        try:
            with self.cuda.stream(side):
                fn()
        finally:  # whatever fn enqueued on the side stream, even if it then raised, precedes later work
            main.wait_stream(side)

    def _capture(self, fn):
        cuda = self.cuda
        cuda.synchronize()
        graph = cuda.CUDAGraph()
        if self.pool is None:
            self.pool = cuda.graph_pool_handle()
        side, main = self._side(), cuda.current_stream()
        try:
            with cuda.graph(graph, pool=self.pool, stream=side):
                fn()
        finally:  # a failed capture is followed by eager work on this stream
            main.wait_stream(side)
        return graph

    def clear(self) -> None:
        self.graphs.clear()
        self.seen.clear()
        self.eager.clear()
