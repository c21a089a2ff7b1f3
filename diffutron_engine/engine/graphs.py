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
Graphs share one memory pool: they are replayed one at a time and none keeps data in the pool from one
replay to the next (outputs go to persistent tensors). The caller clears the cache when a tensor that
graphs point at is reallocated.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch


class StepGraphs:
    def __init__(self, max_graphs: int = 128):
        self.max_graphs = max_graphs
        self.graphs: OrderedDict = OrderedDict()
        self.seen: set = set()
        self.eager: set = set()
        self.pool = None
        self.stream = None  # warm-up and capture share one side stream (per-stream lazy state, cuBLAS)

    def run(self, key, fn) -> None:
        if key in self.eager:
            fn()
            return
        graph = self.graphs.get(key)
        if graph is None:
            if key not in self.seen:  # first time: run it for real, which warms everything up
                self.seen.add(key)
                self._on_side_stream(fn)
                return
            try:
                graph = self._capture(fn)
            except Exception as exc:  # capture is best effort: run eagerly from now on for this shape
                warnings.warn(f"CUDA graph capture failed for {key!r} ({exc}); running eagerly", stacklevel=2)
                self.eager.add(key)
                fn()
                return
            self.graphs[key] = graph
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        graph.replay()

    def _side(self):
        if self.stream is None:
            self.stream = torch.cuda.Stream()
        return self.stream

    def _on_side_stream(self, fn) -> None:
        side, main = self._side(), torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            fn()
        main.wait_stream(side)

    def _capture(self, fn) -> "torch.cuda.CUDAGraph":
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool, stream=self._side()):
            fn()
        return graph

    def clear(self) -> None:
        self.graphs.clear()
        self.seen.clear()
        self.eager.clear()
