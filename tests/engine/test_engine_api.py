"""The engine's own loop: add_request / step / abort / has_unfinished, requests with different
SamplingParams in one batch, other threads adding and aborting, and no state left behind."""

import asyncio
import gc
import threading
import weakref
from collections import deque

import pytest
import torch

from diffutron_engine import DiffutronError, Engine, ReferenceParams, SamplingParams, StepFailed
from diffutron_engine.reference import ReferenceSampler

BASE = dict(max_new_tokens=16, block_size=8, steps=16, early_stop=False)
# one entry per kind of request; each is used with two prompts (24 requests)
KINDS = [
    dict(),  # greedy, the schedule's counts
    dict(temperature=0.8, seed=11),
    dict(steps=9, block_size=5),
    dict(max_new_tokens=7, block_size=3, steps=7),
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.8, temperature=0.5, seed=3),
    dict(cfg_scale=0.7),
    dict(cfg_scale=1.5, cfg_keep_tokens=[6], suppress_tokens=[30]),
    dict(suppress_tokens=[30, 31, 32], begin_suppress_tokens=[33]),
    dict(right_shift_logits=True, max_new_tokens=12, block_size=4, steps=6),
    dict(remasking="random", seed=5, stochastic_transfer=True),
    dict(threshold=0.3, temperature=0.3, seed=8),
]
PROMPTS = [[5, 17, 23, 40, 41, 42], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17], [20, 21, 22],
           [44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54], [60]]


def _requests():
    out = []
    for i, kind in enumerate(KINDS):
        for j in range(2):
            prompt = PROMPTS[(i + 3 * j) % len(PROMPTS)]
            out.append((prompt, SamplingParams(**{**BASE, **kind, "seed": kind.get("seed", 0) + 100 * j})))
    return out


def _greedy(p: SamplingParams) -> bool:
    return (p.temperature == 0 and p.remasking == "low_confidence" and not p.stochastic_transfer
            and p.rule == "schedule")


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_mixed_parameters_share_one_batch(golden, backend):
    """24 requests of 12 kinds through one engine of 8 rows (rows join and leave mid-flight): each gives
    token for token what it gives alone, and the greedy ones what the oracle gives."""
    from diffutron_engine.backends import cpp_available, force_backend

    if backend == "cpp" and not cpp_available():
        pytest.skip("needs the compiled C++ extension")
    reqs = _requests()
    assert len(reqs) == 24
    with force_backend(backend):
        engine = Engine(golden.model, golden.tokenizer, max_batch=8)
        together = engine.generate([p for p, _ in reqs], [prm for _, prm in reqs])
        assert engine.runner.signatures, "nothing ran"
        assert max(s.rows for s in engine.runner.signatures) == 8
        alone_engine = Engine(golden.model, golden.tokenizer, max_batch=1)
        for (prompt, params), got in zip(reqs, together):
            alone = alone_engine.generate([prompt], [params])[0]
            assert got.tokens == alone.tokens, params
    oracle = ReferenceSampler(model=golden.model, tokenizer=golden.tokenizer)
    checked = 0
    for (prompt, params), got in zip(reqs, together):
        if not _greedy(params):
            continue
        ref = oracle.sample([prompt], ReferenceParams(**params.knobs()))[0].tolist()
        assert got.tokens == ref, params
        checked += 1
    assert checked >= 14


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_mixed_parameters_with_caches_do_not_depend_on_the_batch(golden, cache):
    reqs = _requests()
    engine = Engine(golden.model, golden.tokenizer, max_batch=8, cache=cache)
    together = engine.generate([p for p, _ in reqs], [prm for _, prm in reqs])
    alone_engine = Engine(golden.model, golden.tokenizer, max_batch=1, cache=cache)
    for (prompt, params), got in zip(reqs, together):
        assert got.tokens == alone_engine.generate([prompt], [params])[0].tokens, params


def test_the_loop_by_hand(golden):
    engine = Engine(golden.model, golden.tokenizer, max_batch=2)
    assert not engine.has_unfinished() and engine.step() == []
    params = SamplingParams(max_new_tokens=8, block_size=4, steps=8, early_stop=False)
    a = engine.add_request([5, 6, 7], params, request_id="a")
    b = engine.add_request([8, 9], params)
    assert a == "a" and b != a and engine.has_unfinished()
    with pytest.raises(DiffutronError, match="already in use"):
        engine.add_request([1], params, request_id="a")
    finished, steps = {}, 0
    while engine.has_unfinished():
        outs = engine.step()
        steps += 1
        assert {o.request_id for o in outs} <= {a, b}
        for o in outs:
            assert o.committed >= 0 and o.forward_passes <= steps
            if o.finished:
                finished[o.request_id] = o
    assert set(finished) == {a, b} and steps == 8
    assert finished[a].tokens[:3] == [5, 6, 7] and finished[a].finish_reason == "complete"
    # the same request again gives the same tokens (a finished id can be reused)
    again = engine.generate([[5, 6, 7]], params)[0]
    assert again.tokens == finished[a].tokens


def test_abort_frees_the_slot_at_once(golden):
    engine = Engine(golden.model, golden.tokenizer, max_batch=1)
    params = SamplingParams(max_new_tokens=16, block_size=8, steps=16, early_stop=False)
    first = engine.add_request([5, 6, 7], params)
    second = engine.add_request([8, 9], params)
    engine.step()
    engine.step()
    engine.abort(first)
    outs = {o.request_id: o for o in engine.step()}
    assert outs[first].finished and outs[first].finish_reason == "abort"
    assert second in outs and not outs[second].finished  # admitted in the same step
    engine.abort("no-such-request")  # ignored
    while engine.has_unfinished():
        engine.step()
    assert engine.runner._free == [0]


def test_other_threads_add_and_abort_while_one_steps(golden):
    """A producer thread adds requests and a second one aborts some while the main thread steps: every
    request ends exactly once; the ones not aborted give their offline tokens."""
    engine = Engine(golden.model, golden.tokenizer, max_batch=4)
    params = SamplingParams(max_new_tokens=8, block_size=4, steps=8, early_stop=False)
    prompts = [[5 + i, 6, 7 + i % 3] for i in range(40)]
    offline = {tuple(p): r.tokens for p, r in zip(prompts, Engine(golden.model, golden.tokenizer, max_batch=8)
                                                  .generate(prompts, [params] * len(prompts)))}
    ids: list[str] = []
    added = threading.Event()

    def produce():
        for i, p in enumerate(prompts):
            ids.append(engine.add_request(p, params, request_id=f"r{i}"))
        added.set()

    def abort():
        for i in range(0, 40, 7):
            engine.abort(f"r{i}")

    producer = threading.Thread(target=produce)
    aborter = threading.Thread(target=abort)
    producer.start()
    aborter.start()
    results = {}
    while not added.is_set() or engine.has_unfinished():
        for out in engine.step():
            assert out.request_id not in results, "a request ended twice"
            if out.finished:
                results[out.request_id] = out
    producer.join()
    aborter.join()
    assert set(results) == {f"r{i}" for i in range(40)}
    for i, p in enumerate(prompts):
        r = results[f"r{i}"]
        if r.finish_reason != "abort":
            assert r.tokens == offline[tuple(p)]
    assert sorted(engine.runner._free) == [0, 1, 2, 3]


def _containers(engine) -> dict[str, int]:
    """Sizes of every container attribute of the engine and the parts that hold requests (scheduler,
    runner, device batch), by name. runner.signatures is left out: one entry per step shape (bounded by
    the buckets), which is what tests and benchmarks read, not per-request state."""
    parts = {"engine": engine, "scheduler": engine.scheduler, "runner": engine.runner, "batch": engine.runner.batch}
    return {f"{part}.{name}": len(value) for part, obj in parts.items() for name, value in vars(obj).items()
            if isinstance(value, (list, dict, set, deque)) and (part, name) != ("runner", "signatures")}


def test_5000_requests_leave_no_state_behind(golden):
    """A long run, as a server sees it (requests added while others run, at most 512 in flight): no
    container grows with the number of requests served, every one is back to its size at rest when the
    last has finished, and no Request object (canvas, text state, stop rule, generator) stays alive."""
    engine = Engine(golden.model, golden.tokenizer, max_batch=256)
    at_rest = _containers(engine)
    made = []
    build = engine._make

    def tracked(*args, **kwargs):
        req = build(*args, **kwargs)
        made.append(weakref.ref(req))
        return req

    engine._make = tracked
    params = SamplingParams(max_new_tokens=1, block_size=1, steps=1)  # one step each: host work dominates
    total, in_flight, added, finished = 5000, 512, 0, 0
    peak: dict[str, int] = {}
    while finished < total:
        while added < total and added - finished < in_flight:
            engine.add_request([5, 6, 7 + added % 50], params, index=added)
            added += 1
        finished += sum(out.finished for out in engine.step())
        for name, size in _containers(engine).items():
            peak[name] = max(peak.get(name, 0), size)
    assert len(made) == total and not engine.has_unfinished()
    assert _containers(engine) == at_rest
    grown = {name: size for name, size in peak.items() if size > max(at_rest[name], in_flight)}
    assert not grown, f"containers that grew beyond the requests in flight: {grown}"
    gc.collect()
    alive = sum(ref() is not None for ref in made)
    assert alive == 0, f"{alive} of {total} requests are still referenced"


def test_bad_params_are_refused_before_anything_is_queued(golden):
    engine = Engine(golden.model, golden.tokenizer, max_batch=2)
    good = SamplingParams(max_new_tokens=4, block_size=4, steps=4)
    with pytest.raises(DiffutronError, match="outside the vocabulary"):
        engine.generate([[5], [6]], [good, good.override(suppress_tokens=[10**6])])
    with pytest.raises(DiffutronError, match="2 SamplingParams for 3 prompts"):
        engine.generate([[5], [6], [7]], [good, good])
    with pytest.raises(DiffutronError, match="must be a SamplingParams"):
        engine.add_request([5], dict(steps=4))
    with pytest.raises(DiffutronError, match="block_size must be >= 1 for generation"):
        engine.add_request([5], good.override(block_size=None))
    assert not engine.has_unfinished()
    with pytest.raises(DiffutronError, match="threshold must be in"):
        SamplingParams(threshold=2.0)


def test_an_abort_that_reaches_the_inbox_before_its_add(golden):
    """abort() from another thread while add_request() is still building the request (its add lands
    after the abort in the inbox): the request ends once, as aborted, and nothing is left behind."""
    engine = Engine(golden.model, golden.tokenizer, max_batch=2)
    params = SamplingParams(max_new_tokens=4, block_size=4, steps=4)
    engine.abort("x")  # queued first
    engine.add_request([5, 6], params, request_id="x")
    other = engine.add_request([7, 8], params)
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.finished]
    assert sorted((o.request_id, o.finish_reason) for o in outs) == sorted([("x", "abort"), (other, "complete")])
    assert engine.scheduler.num_waiting == 0 and sorted(engine.runner._free) == [0, 1]
    assert engine.step() == []


def test_params_are_copied_when_a_request_is_added(golden):
    """Changing a SamplingParams object after adding it changes nothing for the request."""
    engine = Engine(golden.model, golden.tokenizer, max_batch=2)
    params = SamplingParams(max_new_tokens=8, block_size=4, steps=8, temperature=0.9, repetition_penalty=1.3,
                            seed=4, early_stop=False)
    expected = Engine(golden.model, golden.tokenizer, max_batch=2).generate([[5, 6, 7]], params)[0].tokens
    rid = engine.add_request([5, 6, 7], params)
    params.temperature, params.repetition_penalty, params.seed = 0.0, 1.0, 99
    engine.add_request([8, 9], params)  # a second request with the changed object joins the batch
    finals = {}
    while engine.has_unfinished():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert finals[rid].tokens == expected


def test_infill_never_stops_early_and_generation_refuses_masks_in_the_prompt(golden):
    engine = Engine(golden.model, golden.tokenizer, max_batch=2)
    mask, eos = golden.tokenizer.mask_token_id, golden.tokenizer.eos_token_id
    seq = [5, eos, 7, mask, mask, 9, mask]  # an EOS before the first mask: not an end for infill
    out = engine.infill([seq], SamplingParams(block_size=4, steps=4, suppress_tokens=[mask]))[0]
    assert mask not in out.tokens and out.finish_reason == "complete"
    with pytest.raises(DiffutronError, match="holds the mask token at position 1"):
        engine.add_request([5, mask, 6], SamplingParams(max_new_tokens=4, block_size=4, steps=4))


def test_streamed_text_is_never_taken_back_by_a_stop_string(golden):
    """With stop strings, text within the stop rule's reach of the settled frontier is held back, so the
    deltas always add up to the final text, cut or not."""
    tok = golden.tokenizer
    engine = Engine(golden.model, tok, max_batch=4)
    prompts = [[5, 17, 23, 40, 41, 42], [7, 8], [9, 10, 11, 12, 13], [20, 21]]
    finals = engine.generate(prompts, SamplingParams(max_new_tokens=24, block_size=4, steps=24, early_stop=False))
    # stop strings taken from the answers themselves, so that the rule fires
    stops = sorted({r.text[len(r.text) // 2: len(r.text) // 2 + 3] for r in finals if len(r.text) > 6})
    assert stops
    params = SamplingParams(max_new_tokens=24, block_size=4, steps=24, stop_strings=stops)
    pieces, texts = {}, {}
    for out in engine.stream(prompts, params):
        pieces.setdefault(out.index, []).append(out.delta)
        if out.finished:
            texts[out.index] = out.text
    assert all("".join(pieces[i]) == texts[i] for i in texts) and len(texts) == 4
    cut = [i for i in texts if len(texts[i]) < len(finals[i].text)]
    assert cut  # the rule did cut some answers


# ----------------------------------------------------------------------------- a step that fails
PROMPTS_3 = [[5, 6, 7], [8, 9], [10, 11, 12]]
STEP8 = SamplingParams(max_new_tokens=8, block_size=4, steps=8, early_stop=False)


def _fail_once(monkeypatch, obj, name, at_call: int, exc=None):
    """Make obj.name raise on its `at_call`-th call (1-based), and only then."""
    real, calls = getattr(obj, name), {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise exc or RuntimeError("device lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(obj, name, flaky)


def _assert_clean(engine):
    sched = engine.scheduler
    assert not engine.has_unfinished() and not engine._live and not engine._inbox
    assert not sched.running and sched.num_waiting == 0 and not sched._arrivals and not sched._queues
    assert sorted(engine.runner._free) == list(range(engine.max_batch))


def test_a_failed_step_reaches_generate_and_leaves_the_engine_clean(golden, monkeypatch):
    fresh = Engine(golden.model, golden.tokenizer, max_batch=2).generate(PROMPTS_3, STEP8)
    engine = Engine(golden.model, golden.tokenizer, max_batch=2)
    _fail_once(monkeypatch, engine.runner, "execute", at_call=3)
    with pytest.raises(StepFailed, match="RuntimeError: device lost") as info:
        engine.generate(PROMPTS_3, STEP8)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert [o.finish_reason for o in info.value.outputs] == ["error", "error"]
    _assert_clean(engine)  # the failed step's requests and the call's waiting one are gone
    again = engine.generate(PROMPTS_3, STEP8)  # the same engine answers as a fresh one
    assert [o.tokens for o in again] == [o.tokens for o in fresh]
    _assert_clean(engine)


@pytest.mark.parametrize("where", ["execute", "admit", "advance"])
def test_a_failed_step_fails_only_its_own_requests(golden, monkeypatch, where):
    """By hand: the step that raises (in the device work, the admission, or the host's mirror of the
    commits) finishes its running requests with finish_reason "error" and raises StepFailed with their
    outputs; the waiting request runs next and gives the tokens it gives on a fresh engine."""
    fresh = Engine(golden.model, golden.tokenizer, max_batch=2).generate(PROMPTS_3, STEP8)
    engine = Engine(golden.model, golden.tokenizer, max_batch=2)
    target, name = {"execute": (engine.runner, "execute"), "admit": (engine.runner, "admit"),
                    "advance": (engine, "_advance")}[where]
    _fail_once(monkeypatch, target, name, at_call=1)
    ids = [engine.add_request(p, STEP8, index=i) for i, p in enumerate(PROMPTS_3)]
    with pytest.raises(StepFailed, match="device lost") as info:
        engine.step()
    first = info.value.outputs
    assert sorted(o.request_id for o in first) == ids[:2]
    assert all(o.finished and o.finish_reason == "error" and str(o.error) == "device lost" for o in first)
    assert engine.scheduler.num_waiting == 1 and not engine.scheduler.running
    assert sorted(engine.runner._free) == [0, 1]
    finals = {}
    while engine.has_unfinished():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert list(finals) == [ids[2]] and finals[ids[2]].finish_reason == "complete"
    assert finals[ids[2]].tokens == fresh[2].tokens
    _assert_clean(engine)


def test_a_request_that_fails_in_the_inbox_does_not_take_the_others_with_it(golden, monkeypatch):
    engine = Engine(golden.model, golden.tokenizer, max_batch=2)
    _fail_once(monkeypatch, engine.scheduler, "add", at_call=1)
    ids = [engine.add_request(p, STEP8, index=i) for i, p in enumerate(PROMPTS_3[:2])]
    with pytest.raises(StepFailed) as info:
        engine.step()
    assert [(o.request_id, o.finish_reason) for o in info.value.outputs] == [(ids[0], "error")]
    finals = {}
    while engine.has_unfinished():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    assert list(finals) == [ids[1]] and finals[ids[1]].finish_reason == "complete"
    _assert_clean(engine)


def test_an_interrupted_step_leaves_no_half_run_request(golden, monkeypatch):
    """KeyboardInterrupt inside a step propagates after the step's requests were taken out (their host
    and device state disagree half-way through a step); the waiting one runs on as on a fresh engine,
    and generate() interrupted the same way leaves nothing behind."""
    fresh = Engine(golden.model, golden.tokenizer, max_batch=2).generate(PROMPTS_3, STEP8)
    engine = Engine(golden.model, golden.tokenizer, max_batch=2)
    _fail_once(monkeypatch, engine.runner, "execute", at_call=2, exc=KeyboardInterrupt())
    ids = [engine.add_request(p, STEP8, index=i) for i, p in enumerate(PROMPTS_3)]
    engine.step()
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    assert set(engine._live) == {ids[2]} and not engine.scheduler.running
    assert sorted(engine.runner._free) == [0, 1]
    last = []
    while engine.has_unfinished():
        last += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in last] == [ids[2]] and last[0].tokens == fresh[2].tokens
    _fail_once(monkeypatch, engine.runner, "execute", at_call=2, exc=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        engine.generate(PROMPTS_3, STEP8)
    _assert_clean(engine)
    assert [o.tokens for o in engine.generate(PROMPTS_3, STEP8)] == [o.tokens for o in fresh]


def test_the_server_loop_reports_a_failed_step_and_keeps_serving(golden, monkeypatch):
    """The server's engine loop: the request of the failed step gets the error on its queue (its
    handler answers 503), the waiting one and a later one are served, and nothing stays registered."""
    from diffutron_engine.server.loop import EngineLoop

    params = SamplingParams(max_new_tokens=4, block_size=4, steps=4, early_stop=False)
    expected = Engine(golden.model, golden.tokenizer, max_batch=1).generate([[8, 9]], params)[0].tokens
    engine = Engine(golden.model, golden.tokenizer, max_batch=1)
    _fail_once(monkeypatch, engine.runner, "execute", at_call=1)
    loop = EngineLoop(engine, idle_wait=0.01)

    async def final(queue):
        while True:
            out = await asyncio.wait_for(queue.get(), 60)
            if isinstance(out, BaseException) or out.finished:
                return out

    async def serve():
        here = asyncio.get_running_loop()
        _, qa = loop.submit([5, 6, 7], params, here)  # both queued before the loop runs: a first (max_batch 1)
        _, qb = loop.submit([8, 9], params, here)
        loop.start()
        a, b = await final(qa), await final(qb)
        _, qc = loop.submit([8, 9], params, here)
        return a, b, await final(qc)

    try:
        a, b, c = asyncio.run(serve())
    finally:
        loop.stop(timeout=30)
    assert isinstance(a, RuntimeError) and str(a) == "device lost"  # its handler answers 503 with it
    assert b.finish_reason == "complete" and b.tokens == c.tokens == expected
    assert loop.in_flight == 0 and loop.stats.failed_requests == 1 and loop.stats.failed_steps == 1
    _assert_clean(engine)


def test_seeds_of_one_params_for_many_prompts_wrap_around(golden):
    """generate() with one SamplingParams gives prompt i the seed (seed + i) mod 2**63: no overflow
    at the largest seed, and prompt 1 draws exactly what it draws alone with seed 0."""
    engine = Engine(golden.model, golden.tokenizer, max_batch=2)
    params = SamplingParams(max_new_tokens=8, block_size=4, steps=8, temperature=0.9, seed=2**63 - 1,
                            early_stop=False)
    outs = engine.generate([[5, 6, 7], [8, 9]], params)
    assert [o.seed for o in outs] == [2**63 - 1, 0]
    assert outs[1].tokens == engine.generate([[8, 9]], params.override(seed=0))[0].tokens


def test_request_ids_are_strings_and_prompts_hold_tokens(golden):
    """A request id that is not a string is refused (str(5) once stored "5", and abort(5) then never
    matched it); an empty token-id prompt is refused, except under right shift, where it starts from
    BOS as dllm's sampler does."""
    engine = Engine(golden.model, golden.tokenizer, max_batch=2)
    params = SamplingParams(max_new_tokens=4, block_size=4, steps=4)
    for bad in (5, b"id", "", 3.0, ("a",)):
        with pytest.raises(DiffutronError, match="request id must be a non-empty string"):
            engine.add_request([5, 6], params, request_id=bad)
        with pytest.raises(DiffutronError, match="request id must be a non-empty string"):
            engine.abort(bad)
    for empty in ([], torch.tensor([], dtype=torch.long)):
        with pytest.raises(DiffutronError, match="empty prompt"):
            engine.add_request(empty, params)
    assert not engine.has_unfinished()
    out = engine.generate([[]], params.override(right_shift_logits=True))[0]
    assert out.prompt_token_ids == [golden.tokenizer.bos_token_id] and out.finished


@pytest.mark.parametrize("how", ["generate", "stream"])
def test_a_request_added_before_generate_keeps_its_outputs(golden, how):
    """generate()/stream() step every request in the engine; one added earlier by the caller is not
    theirs: its outputs are held and the caller's next step() returns them, the final one included."""
    engine = Engine(golden.model, golden.tokenizer, max_batch=4)
    params = SamplingParams(max_new_tokens=8, block_size=4, steps=8, early_stop=False)
    alone = Engine(golden.model, golden.tokenizer, max_batch=4).generate([[9, 10, 11]], params)[0]
    rid = engine.add_request([9, 10, 11], params, request_id="mine")
    if how == "generate":
        engine.generate([[5, 6, 7]], params.override(max_new_tokens=16, steps=16))
    else:
        list(engine.stream([[5, 6, 7]], params.override(max_new_tokens=16, steps=16)))
    seen = []
    for _ in range(50):  # bounded: a lost output fails the test instead of hanging it
        seen += [o for o in engine.step() if o.request_id == rid]
        if seen and seen[-1].finished:
            break
    assert seen and seen[-1].finished and seen[-1].tokens == alone.tokens
    assert engine.step() == []  # nothing held twice


def test_a_stream_left_early_leaves_nothing_held(golden):
    """A consumer that stops reading a stream: its requests end at once, and none of their outputs stays
    held for a later step() (they grew with every abandoned stream)."""
    engine = Engine(golden.model, golden.tokenizer, max_batch=2)
    params = SamplingParams(max_new_tokens=16, block_size=4, steps=16, early_stop=False)
    for _ in range(3):
        stream = engine.stream([[5, 6], [7, 8]], params)
        next(stream)
        stream.close()
        engine.generate([[9, 10]], params)
    assert not engine.has_unfinished() and engine._held == [] and engine.step() == []


def test_on_step_sees_each_step_of_the_call_and_can_end_it(golden):
    """generate/infill/stream call on_step after every step with that step's outputs of their own
    requests (never another caller's); an on_step that raises ends the call and leaves nothing behind."""
    engine = Engine(golden.model, golden.tokenizer, max_batch=2)
    params = SamplingParams(max_new_tokens=8, block_size=4, steps=8, early_stop=False)
    other = engine.add_request([9, 10], params, request_id="other")
    seen = []
    outs = engine.generate([[5, 6], [7, 8]], params, on_step=seen.append)
    assert sum(o.committed for step in seen for o in step) == 16 and seen[-1] and all(
        o.request_id != other for step in seen for o in step)
    assert [o.tokens for o in outs] == [o.tokens for o in Engine(golden.model, golden.tokenizer, max_batch=2).generate(
        [[5, 6], [7, 8]], params)]
    streamed = []
    assert len(list(engine.stream([[5, 6]], params, on_step=streamed.append))) >= 1 and streamed

    def stop(outputs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.infill([[5, golden.tokenizer.mask_token_id, 6]], params, on_step=stop)
    finals = []
    while engine.has_unfinished() or engine._held:
        finals += [o.request_id for o in engine.step() if o.finished]
    assert finals == [other] and engine.step() == []  # the other caller's request got its final output


def test_engine_settings_are_one_engine_config(golden):
    """Engine takes an EngineConfig (keyword settings replace some of its fields) and refuses a dtype or
    device that contradicts the model it was given, instead of running something else than asked."""
    from diffutron_engine import EngineConfig

    engine = Engine(golden.model, golden.tokenizer, EngineConfig(max_batch=3, cache="prefix"), max_batch=2)
    assert engine.config == EngineConfig(max_batch=2, cache="prefix") and engine.max_batch == 2
    assert Engine(golden.model, golden.tokenizer, dtype="float32", device="cpu").config.device == "cpu"
    with pytest.raises(DiffutronError, match="dtype='bfloat16' but the model's weights are float32"):
        Engine(golden.model, golden.tokenizer, dtype="bfloat16")
    with pytest.raises(DiffutronError, match="device='cuda' but the model is on cpu"):
        Engine(golden.model, golden.tokenizer, EngineConfig(device="cuda"))
    with pytest.raises(DiffutronError, match="unknown engine setting"):
        Engine(golden.model, golden.tokenizer, threshold=0.9)
    with pytest.raises(DiffutronError, match="config must be an EngineConfig"):
        Engine(golden.model, golden.tokenizer, {"max_batch": 2})
