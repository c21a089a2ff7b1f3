"""The per-step trace (SamplingParams(trace=True)): it redraws a request's canvas at every step exactly,
changes no token on any backend, costs nothing when off, and its confidences obey the commit rules."""

import math

import pytest

from diffutron_engine import Engine, SamplingParams
from diffutron_engine.backends import force_backend

PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]


def _run(engine, prompts, params):
    """generate with on_step: the outputs of every step, and each request's canvas after every step."""
    steps, canvases = [], {}

    def on_step(outs):
        steps.append(outs)
        for o in outs:
            canvases.setdefault(o.request_id, []).append(list(o.tokens) if o.finished else engine.canvas(o.request_id))

    finals = engine.generate(prompts, params, on_step=on_step)
    return finals, steps, canvases


def _redraw(traces):
    """The canvas after each step, from the trace alone."""
    canvas, out = list(traces[0].start), []
    for t in traces:
        for pos, tok in zip(t.positions, t.tokens):
            canvas[pos] = tok
        if t.canvas is not None:
            canvas = list(t.canvas)
        out.append(list(canvas))
    return out


def _traces(steps):
    by_request = {}
    for outs in steps:
        for o in outs:
            by_request.setdefault(o.request_id, []).append(o.trace)
    return by_request


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_a_trace_redraws_every_step_of_a_64_token_answer(golden, cache):
    engine = Engine(golden.model, golden.tokenizer, max_batch=2, cache=cache)
    params = SamplingParams(max_new_tokens=64, steps=64, block_size=16, temperature=0.7, seed=3, trace=True,
                            early_stop=False)
    finals, steps, canvases = _run(engine, PROMPTS, params)
    for rid, traces in _traces(steps).items():
        assert len(traces) == 64 and [t.step for t in traces] == list(range(1, 65))
        assert traces[0].start is not None and all(t.start is None for t in traces[1:])
        assert _redraw(traces) == canvases[rid]
        mask = golden.tokenizer.mask_token_id
        assert traces[0].start.count(mask) == 64 and mask not in canvases[rid][-1]
        for t in traces:  # the block worked holds every position committed at that step
            assert all(t.block[0] <= p < t.block[1] for p in t.positions)
            assert len(t.positions) == len(t.tokens) == len(t.confidences)


def test_a_stop_string_rewrite_is_in_the_trace(golden):
    """The host rewrites the canvas after a stop string: that step's trace carries the whole canvas."""
    engine = Engine(golden.model, golden.tokenizer, max_batch=1)
    base = SamplingParams(max_new_tokens=32, steps=32, block_size=8, seed=5, early_stop=False)
    answer = engine.generate([PROMPTS[0]], base)[0].token_ids
    stop = golden.tokenizer.decode(answer[10:12])
    assert stop.strip()
    finals, steps, canvases = _run(engine, [PROMPTS[0]], base.override(stop_strings=[stop], trace=True))
    (rid, traces), = _traces(steps).items()
    assert any(t.canvas is not None for t in traces)  # the rewrite happened and was traced
    assert _redraw(traces) == canvases[rid] and canvases[rid][-1] == finals[0].tokens


def test_trace_off_costs_nothing_and_mixes_with_traced_requests(golden):
    engine = Engine(golden.model, golden.tokenizer, max_batch=2)
    plain = SamplingParams(max_new_tokens=16, steps=16, block_size=8, seed=1)
    finals, steps, _ = _run(engine, PROMPTS, plain)
    assert all(o.trace is None for outs in steps for o in outs)
    assert not any(shape.trace for shape in engine.runner.signatures)  # no confidence plane was copied
    # one request traced, one not, in one batch: the same tokens, a trace only where asked
    engine2 = Engine(golden.model, golden.tokenizer, max_batch=2)
    mixed, steps2, _ = _run(engine2, PROMPTS, [plain.override(trace=True), plain.override(seed=2)])
    assert mixed[0].tokens == finals[0].tokens and mixed[1].tokens == finals[1].tokens
    assert all((o.trace is not None) == (o.index == 0) for outs in steps2 for o in outs)
    assert any(shape.trace for shape in engine2.runner.signatures)


@pytest.mark.parametrize("backend", [pytest.param("torch"), pytest.param("cpp", marks=pytest.mark.cext),
                                     pytest.param("triton", marks=pytest.mark.triton)])
def test_exact_tokens_do_not_change_with_the_trace_on_any_backend(golden, backend):
    n = 16 if backend == "triton" else 32  # the interpreter is slow
    params = SamplingParams(max_new_tokens=n, steps=n, block_size=8, seed=2)
    with force_backend(backend):
        off = Engine(golden.model, golden.tokenizer, max_batch=2).generate(PROMPTS, params)
        engine = Engine(golden.model, golden.tokenizer, max_batch=2)
        on, steps, canvases = _run(engine, PROMPTS, params.override(trace=True))
    assert [o.tokens for o in on] == [o.tokens for o in off]
    for rid, traces in _traces(steps).items():
        assert _redraw(traces) == canvases[rid]


def test_confidences_obey_the_commit_rule(golden):
    """Hard rules: a confidence is a probability; under a threshold every step commits either only
    positions at or above it, or its single most confident one."""
    engine = Engine(golden.model, golden.tokenizer, max_batch=2, cache="dual")
    params = SamplingParams(max_new_tokens=32, steps=32, block_size=16, seed=4, threshold=0.3, trace=True)
    _, steps, _ = _run(engine, PROMPTS, params)
    seen = 0
    for traces in _traces(steps).values():
        for t in traces:
            assert all(math.isfinite(c) and 0.0 < c <= 1.0 for c in t.confidences), t
            assert len(t.confidences) == 1 or all(c >= 0.3 for c in t.confidences), t
            seen += len(t.confidences)
    assert seen > 0


def test_trace_must_be_a_boolean():
    from diffutron_engine import DiffutronError

    with pytest.raises(DiffutronError, match="trace must be true or false"):
        SamplingParams(trace="yes")
