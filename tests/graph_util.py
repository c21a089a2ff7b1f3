"""CPU stand-ins for the CUDA graph path: OpTrace records a step's ops and launches, TracedGraph replays
a captured step and fails if its work differs from the capture, CPUStepGraphs and EagerStepGraphs put
them in a runner's StepGraphs (tests/engine/test_cuda_graphs.py, tests/bench/test_bench.py)."""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffutron_engine.engine.graphs import StepGraphs


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class OpTrace(TorchDispatchMode):
    """Every torch op and every Triton launch (Launch.run) of a step with what a CUDA graph would bake
    into it: for tensors that existed before the step (persistent), their address, shape, strides and
    dtype; for tensors the step made, shape, strides and dtype; every other argument by value. Calls that
    are neither (the C++ extension's) are not seen."""

    def __init__(self):
        super().__init__()
        self.ops: list = []
        self._made: set = set()  # storages made by this step
        self._kept: set = set()  # storages that existed before it

    def _describe(self, x):
        if isinstance(x, torch.Tensor):
            layout = (tuple(x.shape), x.stride(), x.dtype)
            if x.numel() == 0:
                return ("empty",) + layout
            s = _storage(x)
            if s in self._made:
                return ("made",) + layout
            self._kept.add(s)
            return ("kept", x.data_ptr()) + layout
        if isinstance(x, torch.UntypedStorage):  # the Triton interpreter's copies: by size and origin
            return "storage", x.nbytes(), "kept" if x.data_ptr() in self._kept else "other"
        if isinstance(x, (list, tuple)):
            return type(x).__name__, tuple(self._describe(y) for y in x)
        if isinstance(x, dict):
            return tuple(sorted((k, self._describe(v)) for k, v in x.items()))
        return repr(x)

    def launch(self, launch) -> None:
        """Record a Triton launch: its kernel, grid, arguments and options."""
        self.ops.append(("launch", launch.name, launch.grid, self._describe(launch.args),
                         self._describe(launch.options)))

    @contextlib.contextmanager
    def launches(self):
        """Record every Launch.run made inside the block (through any hook already installed on it)."""
        from diffutron_engine.kernels.launch import Launch

        original = Launch.__dict__["run"]
        trace = self

        def run(launch) -> None:
            trace.launch(launch)
            original(launch)

        Launch.run = run
        try:
            yield self
        finally:
            Launch.run = original

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((str(func), self._describe(args), self._describe(kwargs)))
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (list, tuple)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() and _storage(t) not in self._kept:
                self._made.add(_storage(t))
        return out


class TracedGraph:
    """A captured step on CPU: the step function seen at capture, and the ops its first run issued.
    Every replay runs that function again and fails if its ops differ from the captured ones."""

    def __init__(self, fn):
        self.fn = fn
        self.ops = None

    def replay(self) -> None:
        trace = OpTrace()
        with trace.launches(), trace:
            self.fn()
        if self.ops is None:
            self.ops = trace.ops
            return
        if trace.ops != self.ops:
            i = next((i for i, (a, b) in enumerate(zip(trace.ops, self.ops)) if a != b), min(len(trace.ops), len(self.ops)))
            got = trace.ops[i] if i < len(trace.ops) else None
            want = self.ops[i] if i < len(self.ops) else None
            raise AssertionError(f"a replay would not do the captured work: op {i} is {str(got)[:400]}, "
                                 f"captured {str(want)[:400]}")


class CPUStepGraphs(StepGraphs):
    """StepGraphs' keying, counting and fallback, with TracedGraph for a graph and no streams.
    `fail(key)` true: that key's capture raises (to exercise the fallback)."""

    def __init__(self, fail=lambda key: False, **kw):
        super().__init__(cuda=object(), **kw)
        self.fail = fail
        self.clears = 0

    def _on_side_stream(self, fn) -> None:
        fn()

    def _capture(self, fn):
        if self.fail(self._key):
            raise RuntimeError("operation not permitted when stream is capturing")
        return TracedGraph(fn)

    def run(self, key, fn) -> None:
        self._key = key
        super().run(key, fn)

    def clear(self) -> None:
        self.clears += 1
        super().clear()


class EagerStepGraphs(StepGraphs):
    """The runner's graph path without graphs: every step runs eagerly on the current stream (same
    stats() and clear() as StepGraphs, counters left at zero). An engine with cuda_graphs=True and this
    in place of its StepGraphs runs the shapes a graphed engine runs (candidates padded to the whole
    block), so the two differ only by capture and replay."""

    def __init__(self):
        super().__init__(cuda=object())

    def run(self, key, fn) -> None:
        fn()
