"""What makes a step capturable as one CUDA graph, checked on CPU over whole runs (mixed lengths, block
boundaries, rows joining and leaving):

- the device step never reads the device from the host (.item(), .tolist(), .cpu(), .numpy(), bool(),
  nonzero, boolean-mask indexing) nor builds a tensor from Python data (torch.tensor / as_tensor);
- every step of one StepShape issues the same ops on the same shapes (what a graph replays);
- the shapes come from buckets, so the number of distinct StepShapes stays within the bucket count;
- a step issues the same number of (non-view) ops whatever its batch and block size;
- a step makes no backend choice and reads no environment (the runner's Ops were chosen when it was made).
"""

import contextlib
import os
import random
from collections import defaultdict

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffutron_engine import Engine, SamplingParams
from diffutron_engine.engine.runner import batch_bucket, block_bucket, length_bucket
from diffutron_engine.engine.probe import is_view_op

# ops that read the device from the host or have data-dependent output shapes
SYNCING = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.lift_fresh.default",
           "aten.masked_select.default", "aten._unique2.default", "aten.unique_dim.default",
           "aten.repeat_interleave.Tensor", "aten.item.default"}


class StepAudit(TorchDispatchMode):
    """Records (op, argument shapes) and refuses the ops a CUDA graph cannot hold."""

    def __init__(self):
        super().__init__()
        self.trace = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in SYNCING:
            raise AssertionError(f"{name} inside the captured step")
        if name.startswith(("aten.index.", "aten.index_put", "aten._index_put")):
            indices = args[1] if len(args) > 1 else []
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices or []):
                raise AssertionError(f"{name} with a boolean mask (data-dependent shape) inside the captured step")
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        self.trace.append((name, shapes, is_view_op(func)))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_calls():
    """Python-level calls that sync or build tensors from Python data, refused while active."""
    patched = []

    def refuse(owner, name):
        def fail(*a, **k):
            raise AssertionError(f"{getattr(owner, '__name__', owner)}.{name} inside the captured step")
        patched.append((owner, name, getattr(owner, name)))
        setattr(owner, name, fail)

    for name in ("tolist", "cpu", "numpy", "item", "__bool__", "__int__", "__float__", "__index__"):
        refuse(torch.Tensor, name)
    for name in ("tensor", "as_tensor"):
        refuse(torch, name)
    try:
        yield
    finally:
        for owner, name, fn in reversed(patched):
            setattr(owner, name, fn)


class _RefusedEnviron(dict):
    def __getitem__(self, key):
        raise AssertionError(f"os.environ[{key!r}] read inside the captured step")

    def get(self, key, default=None):
        raise AssertionError(f"os.environ.get({key!r}) inside the captured step")

    __contains__ = get


@contextlib.contextmanager
def no_backend_choice():
    """The backend chooser (backends.Ops.select, pick, the forced backend) and the environment, refused
    while active: a step runs the Ops its runner keeps."""
    from diffutron_engine import backends

    patched = [(backends, name, getattr(backends, name)) for name in ("pick", "forced_backend")]
    patched += [(backends.Ops, "select", backends.Ops.__dict__["select"]), (os, "environ", os.environ)]

    def refuse(what):
        def fail(*a, **k):
            raise AssertionError(f"{what} inside the captured step")
        return fail

    for owner, name, _ in patched[:3]:
        setattr(owner, name, refuse(f"backends.{name}"))
    os.environ = _RefusedEnviron()
    try:
        yield
    finally:
        for owner, name, value in reversed(patched):
            setattr(owner, name, value)


def audited(engine):
    """Run every device step of `engine` under the audit; returns {(StepShape, capacities): traces}."""
    runner = engine.runner
    traces = defaultdict(set)
    step = runner._device_step

    def wrapped(sh):
        audit = StepAudit()
        with audit, no_host_calls(), no_backend_choice():
            step(sh)
        traces[(sh, runner.batch.version, id(runner.pool))].add(tuple(audit.trace))

    runner._device_step = wrapped
    return traces


def _workload(seed, n=30):
    rng = random.Random(seed)
    prompts = [[rng.randrange(5, 200) for _ in range(rng.randrange(1, 60))] for _ in range(n)]
    params = [SamplingParams(max_new_tokens=rng.choice([8, 16, 24]), block_size=rng.choice([4, 8]),
                             steps=rng.choice([8, 12, 24]), early_stop=rng.random() < 0.5, seed=i)
              for i in range(n)]
    return prompts, params


@pytest.mark.parametrize("cache", [pytest.param("none", marks=pytest.mark.cext), "prefix", "dual"])
def test_steps_are_capturable_and_shapes_come_from_buckets(golden, cache):
    engine = Engine(golden.model, golden.tokenizer, max_batch=6, cache=cache)
    traces = audited(engine)
    prompts, params = _workload(1, n=40)
    engine.generate(prompts, params)
    steps = sum(engine.runner.signatures.values())
    shapes = set(engine.runner.signatures)
    assert steps > 80
    for key, seen in traces.items():
        assert len(seen) == 1, f"steps of one shape issued different ops: {key[0]}"
    longest = max(len(p) + q.max_new_tokens for p, q in zip(prompts, params))
    rows = {batch_bucket(n) for n in range(1, 7)}
    lengths = {length_bucket(n) for n in range(1, longest + 1)}
    blocks = {block_bucket(n) for n in (4, 8)}
    candidates = {batch_bucket(n) for n in range(1, 6 * 8 + 1)}
    for sh in shapes:
        assert sh.rows in rows and sh.length in lengths and sh.block in blocks, sh
        assert sh.candidates in candidates and sh.candidates <= sh.rows * sh.block, sh
        assert sh.refresh in rows | {0} and sh.partial in rows | {0}
    bound = len(rows) * len(lengths) * len(blocks) * len(candidates)
    if cache != "none":  # which of the rows refresh and which reuse the cache
        bound *= (len(rows) + 1) ** 2 * (len(lengths) if cache == "prefix" else 1)
    assert len(shapes) <= bound
    if cache == "none":
        # one op sequence length for every batch and block size
        counts = {sum(1 for _, _, view in t if not view) for seen in traces.values() for t in seen}
        assert len(counts) == 1, counts


def test_mixed_parameters_are_capturable(golden):
    """CFG, penalty, suppression, right shift, random remasking, threshold and sampling in one run."""
    engine = Engine(golden.model, golden.tokenizer, max_batch=5)
    traces = audited(engine)
    kinds = [dict(cfg_scale=0.7), dict(repetition_penalty=1.3, temperature=0.6), dict(suppress_tokens=[30],
             begin_suppress_tokens=[33]), dict(right_shift_logits=True), dict(remasking="random"),
             dict(threshold=0.4), dict(factor=1.0), dict(stop_strings=["w5"]), dict(trace=True)]
    prompts, base = _workload(2, n=16)
    params = [b.override(**kinds[i % len(kinds)]) for i, b in enumerate(base)]
    engine.generate(prompts, params)
    assert all(len(seen) == 1 for seen in traces.values())
    assert any(sh.cfg_rows for sh in engine.runner.signatures)
    assert any(sh.trace for sh in engine.runner.signatures)  # a traced step is audited too


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_mixed_parameters_with_caches_are_capturable(golden, cache):
    engine = Engine(golden.model, golden.tokenizer, max_batch=4, cache=cache)
    traces = audited(engine)
    prompts, base = _workload(3, n=10)
    kinds = [dict(cfg_scale=0.5), dict(right_shift_logits=True), dict(temperature=0.9, repetition_penalty=1.2)]
    engine.generate(prompts, [b.override(**kinds[i % 3]) for i, b in enumerate(base)])
    assert all(len(seen) == 1 for seen in traces.values())
