"""CUDA graphs change nothing but launch overhead: an engine that replays its steps from graphs gives the
tokens of one that launches them op by op.

- On a GPU (marked cuda): Engine(cuda_graphs=True) against the same engine whose StepGraphs is replaced
  by a pass-through (every step runs eagerly on the graph path's shapes: candidates padded to the whole
  block, so both run the same GEMM shapes and differ only by capture and replay) over one scenario that
  uses every feature (cache modes, greedy and seeded sampling, repetition penalty, CFG, the parallel
  rules, suppression, right shift, random remasking) while rows join and leave mid-run, with and without
  the fused LM head, in float32 and bfloat16; the graph counters show replays and no eager fallback.
- On CPU the same scenario runs with a stand-in for StepGraphs: its "graph" for a key is the step seen
  at capture time, and every replay re-runs it while checking that it issues the captured work, which
  is what a real graph would replay: every torch op (seen by a TorchDispatchMode: the same ops, the
  same persistent tensors at the same addresses, the same shapes and non-tensor arguments) and every
  Triton launch (kernels.launch.Launch.run: the same kernel, grid, options and arguments, persistent
  tensors by address, non-tensor arguments by value). Work outside both, such as the C++ extension's
  sampler, is not seen: the CPU tests force the torch backend. The runner then takes its graph path
  (candidates padded to the whole block, graphs cleared when a tensor they point at is reallocated).
- StepGraphs' own bookkeeping (warm-up, capture, replay, fallback, stream ordering) against a fake
  torch.cuda namespace.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections import Counter

import pytest
import torch

from diffutron_engine import Engine, SamplingParams
from diffutron_engine.backends import force_backend
from diffutron_engine.config import CACHE_MODES
from diffutron_engine.engine.graphs import StepGraphs
from graph_util import CPUStepGraphs, EagerStepGraphs, TracedGraph
from where import GOLDEN_MODEL

# the GPU tier: bench/gpu_suite runs this file on the GPU machine
pytestmark = pytest.mark.gpu_suite



# ----------------------------------------------------------------------------- the scenario
def _long_prompt(n: int, start: int) -> list[int]:
    return [5 + (start + 7 * i) % 240 for i in range(n)]


# (step at which it is added, prompt, params). max_batch 3 < 8 requests: some wait for a slot; they are
# added while others run and finish at different steps (lengths, steps and rules differ); the request
# added at step 6 needs more canvas positions than the batch was made with (its tensors are reallocated
# mid-run), and the CFG request joining a cache-mode batch makes the K/V pool grow a second half. When
# all are done, the first three run again: the step shapes of the start, after the reallocations (a
# graph captured before them would read tensors that are gone).
PLAN = [
    (0, [5, 17, 23, 40, 41, 42], SamplingParams(max_new_tokens=12, block_size=4, steps=12)),
    (0, [7, 8], SamplingParams(max_new_tokens=8, block_size=8, steps=8, temperature=0.8, seed=11)),
    (0, [9, 10, 11, 12, 13], SamplingParams(max_new_tokens=16, block_size=8, steps=16, repetition_penalty=1.3)),
    (2, [14, 15, 16], SamplingParams(max_new_tokens=8, block_size=4, steps=8, cfg_scale=0.5)),
    (3, [20, 21, 22, 23, 24, 25, 26], SamplingParams(max_new_tokens=12, block_size=6, steps=12, threshold=0.5,
                                                     right_shift_logits=True)),
    (5, [30, 31], SamplingParams(max_new_tokens=8, block_size=4, steps=8, suppress_tokens=[30],
                                 begin_suppress_tokens=[33], remasking="random", seed=3)),
    (6, _long_prompt(262, 1), SamplingParams(max_new_tokens=8, block_size=8, steps=6, temperature=0.6,
                                             stochastic_transfer=True, seed=5)),
    (7, [50, 51, 52, 53], SamplingParams(max_new_tokens=12, block_size=4, steps=12, cfg_scale=0.7,
                                         temperature=0.9, repetition_penalty=0.8, factor=1.0, seed=7)),
]
ABORT = (2, 9)  # request 2 is aborted at step 9: a row leaving before it is done
AGAIN = 3  # PLAN[:AGAIN] is added again (as requests len(PLAN) + i) once the engine is idle


def run_scenario(lm, graphs: StepGraphs | None = None, **engine_kw):
    """Drive an engine through PLAN step by step; returns ({request index: (tokens, finish reason,
    forward passes)}, {request index: (first step it ran, step it finished)}, the engine). `graphs`
    replaces the runner's StepGraphs (the CPU stand-in)."""
    eng = Engine(lm.model, lm.tokenizer, max_batch=3, **engine_kw)
    if graphs is not None:
        eng.runner.graphs = graphs
    results, joined, left = {}, {}, {}
    step, last_add, again = 0, max(at for at, _, _ in PLAN), False

    def add(i, prompt, params):
        seed = params.seed if params.seed is not None else 100 + i
        eng.add_request(prompt, params.override(early_stop=False, seed=seed), request_id=f"r{i}")

    while step <= last_add or eng.has_unfinished() or not again:
        for i, (at, prompt, params) in enumerate(PLAN):
            if at == step:
                add(i, prompt, params)
        if step == ABORT[1]:
            eng.abort(f"r{ABORT[0]}")
        if step > last_add and not eng.has_unfinished():
            again = True
            for i, (_, prompt, params) in enumerate(PLAN[:AGAIN]):
                add(len(PLAN) + i, prompt, params)
        for out in eng.step():
            i = int(out.request_id[1:])
            joined.setdefault(i, step)
            if out.finished:
                results[i] = (out.tokens, out.finish_reason, out.forward_passes)
                left[i] = step
        step += 1
    assert sorted(results) == list(range(len(PLAN) + AGAIN))
    return results, {i: (joined[i], left[i]) for i in results}, eng


# ----------------------------------------------------------------------------- a CPU stand-in for graphs
def _graphs_used(graphs: StepGraphs) -> dict:
    s = graphs.stats()
    assert s["replays"] > 0 and s["captures"] > 0, s
    assert s["fallbacks"] == 0 and not graphs.failures, (s, graphs.failures)
    return s


def _check_the_scenario_ran(spans: dict, results: dict, reruns_match: bool = True) -> None:
    """Rows joined after the start and left at different steps; one was aborted, the others completed.
    reruns_match: a request that runs again gives the same tokens. The rerun's batch is made of other
    rows than the first run's (other row counts, so other GEMM shapes): checked in float32, not in
    bfloat16, where cuBLAS's kernel for another shape may round a row differently."""
    assert len({left for _, left in spans.values()}) >= 4
    assert sum(first > 0 for first, _ in spans.values()) >= 4
    reasons = Counter(reason for _, reason, _ in results.values())
    assert reasons == {"complete": len(PLAN) + AGAIN - 1, "abort": 1}
    if reruns_match:
        for i in range(AGAIN):
            if i != ABORT[0]:
                assert results[len(PLAN) + i][0] == results[i][0]


@pytest.mark.parametrize("cache", CACHE_MODES)
def test_graph_path_gives_the_eager_tokens_on_cpu(golden, cache):
    with force_backend("torch"):  # every op a torch op, which the stand-in's trace sees (not the C++ sampler)
        eager, spans, _ = run_scenario(golden, cache=cache)
        _check_the_scenario_ran(spans, eager)
        graphs = CPUStepGraphs()
        graphed, spans_g, eng = run_scenario(golden, graphs=graphs, cache=cache)
    assert graphed == eager and spans_g == spans
    _graphs_used(graphs)
    assert graphs.clears >= 2  # tensors graphs point at were reallocated mid-run (longer canvas; CFG's pool)
    # the graph path pads the LM head's candidates to the whole block: other shapes than the eager run's
    assert all(sh.candidates == sh.rows * sh.block for sh in eng.runner.signatures)


# Triton on CPU tensors runs only in the interpreter, which tests/conftest.py switches on when there is no
# GPU; with one, the Triton backend refuses the CPU model (the GPU tests cover Triton there)
needs_interpreter = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 "
                                              "(set by tests/conftest.py when no GPU is present)")


@pytest.mark.slow
@pytest.mark.triton
@needs_interpreter
def test_graph_path_with_the_fused_head_on_cpu(golden):
    """The Triton sampler (interpreter) with the LM head fused into it, on the graph path; its replays
    are checked launch by launch too. The eager reference runs on the torch backend, whose tokens every
    backend gives (tests/engine/test_engine.py): one interpreter run instead of two keeps the suite's time."""
    with force_backend("torch"):
        eager, _, _ = run_scenario(golden, cache="dual")
    with force_backend("triton"):
        graphs = CPUStepGraphs()
        graphed, _, eng = run_scenario(golden, graphs=graphs, cache="dual", fused_head=True)
        assert eng.runner.fused_head
    assert graphed == eager
    _graphs_used(graphs)


def test_a_replay_is_checked_launch_by_launch():
    """A replay whose Triton launch has another Python scalar, or another persistent tensor, than the
    captured launch (a real graph would replay the captured ones) fails; the same launch passes. The
    launches have an empty grid: Launch.run records them and runs nothing."""
    from diffutron_engine.kernels.launch import Launch

    def _kernel():  # never runs (empty grid)
        pass

    bufs, args = [torch.zeros(4), torch.zeros(4)], {"buf": 0, "n": 3}
    graph = TracedGraph(lambda: Launch(_kernel, (0,), (bufs[args["buf"]], args["n"]), {"BLOCK": 8}).run())
    graph.replay()  # the capture
    graph.replay()
    assert graph.ops == [("launch", "_kernel", (0,), ("tuple", (("kept", bufs[0].data_ptr(), (4,), (1,),
                                                                 torch.float32), "3")), (("BLOCK", "8"),))]
    for change in ({"n": 4}, {"n": 3, "buf": 1}):
        args.update(change)
        with pytest.raises(AssertionError, match="would not do the captured work: op 0 is \\('launch'"):
            graph.replay()
    args.update(buf=0, n=3)
    graph.replay()


def test_a_capture_that_fails_falls_back_and_is_counted(golden):
    with force_backend("torch"):
        eager, _, _ = run_scenario(golden)
        graphs = CPUStepGraphs(fail=lambda key: key.cfg_rows > 0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            graphed, _, _ = run_scenario(golden, graphs=graphs)
    assert graphed == eager
    s = graphs.stats()
    assert s["fallbacks"] > 0 and s["replays"] > 0
    assert graphs.failures and all(key.cfg_rows for key in graphs.failures)
    assert any("running eagerly" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------- on the GPU
_CUDA_MODELS: dict = {}


def _golden_on_cuda(dtype: str):
    from diffutron_engine.loading import load_model

    if dtype not in _CUDA_MODELS:
        _CUDA_MODELS[dtype] = load_model(GOLDEN_MODEL, dtype=dtype, device="cuda")
    return _CUDA_MODELS[dtype]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("fused_head", [False, True], ids=["head", "fused-head"])
@pytest.mark.parametrize("cache", CACHE_MODES)
def test_cuda_graphs_give_the_eager_tokens(cache, fused_head, dtype):
    lm = _golden_on_cuda(dtype)
    # the reference: the graph path's shapes, run eagerly (a plain eager engine runs other LM-head shapes)
    eager, spans, eng_eager = run_scenario(lm, graphs=EagerStepGraphs(), cache=cache, fused_head=fused_head,
                                           cuda_graphs=True)
    assert isinstance(eng_eager.runner.graphs, EagerStepGraphs)
    _check_the_scenario_ran(spans, eager, reruns_match=dtype == "float32")
    graphed, spans_g, eng = run_scenario(lm, cache=cache, fused_head=fused_head, cuda_graphs=True)
    assert eng.runner.graphs is not None and eng.runner.fused_head == eng_eager.runner.fused_head
    if fused_head:
        assert eng.runner.fused_head  # the Triton sampler runs on the GPU
    assert graphed == eager and spans_g == spans
    _graphs_used(eng.runner.graphs)


# ----------------------------------------------------------------------------- StepGraphs itself
class FakeStream:
    def __init__(self, name, cuda):
        self.name, self.cuda = name, cuda

    def wait_stream(self, other) -> None:
        self.cuda.log.append(("wait", self.name, other.name))


class FakeGraph:
    def __init__(self, cuda):
        self.cuda, self.kernels = cuda, []

    def replay(self) -> None:
        self.cuda.log.append(("replay", self.cuda.current.name))
        for k in self.kernels:
            self.cuda.launch(k)


class FakeCuda:
    """The torch.cuda calls StepGraphs makes, logged. A step launches named kernels through `launch`:
    they run on the current stream, or are recorded into the graph being captured."""

    def __init__(self):
        self.log: list = []
        self.main = FakeStream("main", self)
        self.current = self.main
        self.capturing = None

    def Stream(self):
        return FakeStream("side", self)

    def current_stream(self):
        return self.current

    @contextlib.contextmanager
    def stream(self, s):
        prev, self.current = self.current, s
        try:
            yield
        finally:
            self.current = prev

    def synchronize(self) -> None:
        self.log.append(("sync",))

    def CUDAGraph(self):
        return FakeGraph(self)

    def graph_pool_handle(self):
        return "pool"

    @contextlib.contextmanager
    def graph(self, graph, pool=None, stream=None):
        assert pool == "pool"
        prev, self.current, self.capturing = self.current, stream, graph
        self.log.append(("capture", stream.name))
        try:
            yield
        finally:
            self.current, self.capturing = prev, None

    def launch(self, name: str) -> None:
        if self.capturing is not None:
            self.capturing.kernels.append(name)
        else:
            self.log.append(("run", name, self.current.name))


def test_step_graphs_warm_up_then_capture_then_replay():
    cuda = FakeCuda()
    g = StepGraphs(cuda=cuda)
    step = lambda: cuda.launch("step")  # noqa: E731
    g.run("a", step)  # first sight: for real, on the side stream, ordered after and before main
    assert cuda.log == [("wait", "side", "main"), ("run", "step", "side"), ("wait", "main", "side")]
    assert g.stats() == {"captures": 0, "replays": 0, "fallbacks": 0, "warmups": 1}
    cuda.log.clear()
    g.run("a", step)  # second: captured (nothing runs), then replayed once on the main stream
    assert cuda.log == [("sync",), ("capture", "side"), ("wait", "main", "side"), ("replay", "main"),
                        ("run", "step", "main")]
    assert g.stats() == {"captures": 1, "replays": 1, "fallbacks": 0, "warmups": 1}
    cuda.log.clear()
    g.run("a", step)
    assert cuda.log == [("replay", "main"), ("run", "step", "main")]
    g.run("b", step)
    assert g.stats() == {"captures": 1, "replays": 2, "fallbacks": 0, "warmups": 2}
    g.clear()  # graphs go, counts stay; the key is warmed up and captured again
    g.run("a", step)
    g.run("a", step)
    assert g.stats() == {"captures": 2, "replays": 3, "fallbacks": 0, "warmups": 3}
    assert cuda.current is cuda.main and not g.failures


def test_step_graphs_fall_back_with_a_warning_and_count_it():
    cuda = FakeCuda()
    g = StepGraphs(cuda=cuda)

    def step():
        if cuda.capturing is not None:
            raise RuntimeError("operation not permitted when stream is capturing")
        cuda.launch("step")

    g.run("k", step)
    cuda.log.clear()
    with pytest.warns(UserWarning, match="capture failed for 'k'.*running eagerly"):
        g.run("k", step)
    # the failed capture is followed by the step, eagerly, on the main stream ordered after the side one
    assert cuda.log == [("sync",), ("capture", "side"), ("wait", "main", "side"), ("run", "step", "main")]
    assert g.failures == {"k": "RuntimeError: operation not permitted when stream is capturing"}
    cuda.log.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later steps of that key: eager, no new capture, no new warning
        g.run("k", step)
    assert cuda.log == [("run", "step", "main")]
    assert g.stats() == {"captures": 0, "replays": 0, "fallbacks": 2, "warmups": 1}
    assert cuda.current is cuda.main


def test_a_step_that_fails_on_the_side_stream_still_orders_the_main_stream():
    cuda = FakeCuda()
    g = StepGraphs(cuda=cuda)

    def broken():
        cuda.launch("half")
        raise ValueError("step failed")

    with pytest.raises(ValueError, match="step failed"):
        g.run("k", broken)
    assert cuda.log == [("wait", "side", "main"), ("run", "half", "side"), ("wait", "main", "side")]
    assert cuda.current is cuda.main
    cuda.log.clear()
    g.run("k", lambda: cuda.launch("step"))  # a warm-up that failed does not count: warmed up again
    assert cuda.log == [("wait", "side", "main"), ("run", "step", "side"), ("wait", "main", "side")]
    assert g.stats()["captures"] == 0 and g.stats()["warmups"] == 2


def test_a_step_that_fails_inside_a_capture_falls_back_and_then_raises_eagerly():
    """A step whose capture fails and whose eager run fails too: the error reaches the caller (a failed
    step, not a graph problem); the streams are left ordered and current."""
    cuda = FakeCuda()
    g = StepGraphs(cuda=cuda)
    calls = Counter()

    def step():
        calls["n"] += 1
        if calls["n"] > 1:
            raise ValueError("bad step")
        cuda.launch("step")

    g.run("k", step)
    cuda.log.clear()
    with pytest.warns(UserWarning, match="capture failed"), pytest.raises(ValueError, match="bad step"):
        g.run("k", step)
    assert ("wait", "main", "side") in cuda.log and cuda.current is cuda.main
    assert g.stats()["fallbacks"] == 1 and "k" in g.failures


def test_old_graphs_are_evicted_and_captured_again():
    cuda = FakeCuda()
    g = StepGraphs(max_graphs=1, cuda=cuda)
    for key in ("a", "a", "b", "b", "a", "a"):
        g.run(key, lambda: cuda.launch("step"))
    assert list(g.graphs) == ["a"]
    assert g.stats() == {"captures": 3, "replays": 4, "fallbacks": 0, "warmups": 2}
