"""Measurement hooks on a running engine, for benchmarks (`bench overhead`) and tests: the device
step alone, and the ATen ops a step issues. They reach into the runner, so they live in engine/."""

from __future__ import annotations

import time
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode


def is_view_op(func) -> bool:
    """Ops that only make a new view (no kernel, no data): which of them the dispatcher uses depends on
    strides (a reshape of a size-1 dimension), so they are counted apart."""
    return func.is_view or func.__name__ in ("_unsafe_view.default", "alias.default", "detach.default")


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops that do work (views apart), and those of them issued inside the model."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.views = 0
        self.inside_model = 0
        self.depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_view_op(func):
            self.views += 1
        else:
            self.ops[str(func)] += 1
            self.inside_model += self.depth > 0
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def _count_model(counter: OpCounter, runner):
    """Wrap the runner's model entry points so ops inside them are attributed to the model."""
    m = runner.model
    originals = {name: getattr(m, name) for name in ("forward", "forward_partial", "lm_head")}

    def wrap(fn):
        def inner(*a, **k):
            counter.depth += 1
            try:
                return fn(*a, **k)
            finally:
                counter.depth -= 1
        return inner

    for name, fn in originals.items():
        setattr(m, name, wrap(fn))  # instance attributes shadow the methods until restored
    return lambda: [delattr(m, name) for name in originals]


def count_step_ops(engine) -> OpCounter:
    """The ops of one Engine.step(), those inside the model counted apart."""
    counter = OpCounter()
    restore = _count_model(counter, engine.runner)
    try:
        with counter:
            engine.step()
    finally:
        restore()
    return counter


def device_step_seconds(engine, n: int) -> float:
    """Seconds per device step (forward, head, sample, commit, counters; no host bookkeeping) of the
    engine's running batch, over n steps. The device runs ahead of the host's mirror: use an engine
    that is thrown away afterwards."""
    runner = engine.runner
    shape = runner.shape(engine.scheduler.running)
    t = time.perf_counter()
    for _ in range(n):
        runner._device_step(shape)
    return (time.perf_counter() - t) / n
