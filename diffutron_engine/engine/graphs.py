"""CUDA graphs for the runner's forwards.

Why: at batch 1 a denoising step of the 22-layer model is a few hundred small kernels; launching them
from Python costs more than running them on an H100. A graph captured once per input shape replays the
whole forward with one launch. Shapes repeat: a batch keeps its canvas length for the whole generation,
and the partial forwards of the caches always recompute a block-sized window.

Contract: `run(key, fn, inputs)` calls fn(*inputs) through a graph captured for `key` (which must
identify everything that changes the captured work: shapes, dtypes, the K/V pool object). Inputs are
copied into the graph's static buffers; the output is cloned out of the graph's buffer, because the
next replay of the same graph overwrites it (CFG runs the same shapes twice per step). Tensors that fn
closes over (weights, the K/V pool) are used in place. A capture that fails falls back to eager
execution for that key, once, with a warning: a graph is an optimization, never a reason to fail.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch


class GraphCache:
    def __init__(self, max_graphs: int = 32):
        self.max_graphs = max_graphs
        self.graphs: OrderedDict = OrderedDict()
        self.pool = None  # one memory pool shared by all graphs of this cache
        self.eager_keys: set = set()

    def run(self, key, fn, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if key in self.eager_keys:
            return fn(*inputs)
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(fn, inputs)
            except Exception as exc:  # capture is best effort: run eagerly from now on for this shape
                warnings.warn(f"CUDA graph capture failed for {key!r} ({exc}); running eagerly", stacklevel=2)
                self.eager_keys.add(key)
                return fn(*inputs)
            self.graphs[key] = entry
            if len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        graph, static_in, static_out = entry
        for buf, x in zip(static_in, inputs):
            buf.copy_(x)
        graph.replay()
        return static_out.clone()

    def _capture(self, fn, inputs):
        static_in = tuple(x.clone() for x in inputs)
        # warm-up on a side stream (lazy initializations, autotuning, allocator) before capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = fn(*static_in)
        return graph, static_in, static_out

    def clear(self) -> None:
        self.graphs.clear()
        self.eager_keys.clear()
