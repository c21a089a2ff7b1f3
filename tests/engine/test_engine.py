"""The engine against the oracle: exact mode gives the oracle's greedy tokens and its distribution;
early stop, caches, parallel-decoding rules, batching and streaming."""

import json
import math
import os

import pytest
import torch

from diffutron_engine import DiffutronError, Engine, SamplingParams
from diffutron_engine.reference import ReferenceSampler
from where import GOLDEN

CASES = json.load(open(os.path.join(GOLDEN, "cases.json")))["cases"]
GREEDY = [c for c in CASES if not c["config"].get("temperature") and c["config"].get("remasking") != "random"
          and not c["config"].get("stochastic_transfer")]


@pytest.fixture(scope="module")
def engine(golden):
    return Engine(golden.model, golden.tokenizer, max_batch=2)  # 2 < 3 prompts: rows join as others finish


@pytest.mark.parametrize("case", GREEDY, ids=[c["name"] for c in GREEDY])
def test_exact_mode_gives_the_oracles_greedy_tokens(engine, case):
    cfg = SamplingParams(early_stop=False, **case["config"])
    run = engine.infill if case.get("kind") == "infill" else engine.generate
    results = run(case["prompts"], cfg)
    for r, expected in zip(results, case["expected"]):
        assert r.tokens == expected[: len(r.tokens)]
        assert set(expected[len(r.tokens):]) <= {1}  # the oracle's EOS tail of a shorter row


@pytest.mark.parametrize("extra", [dict(repetition_penalty=1.3), dict(repetition_penalty=0.8, cfg_scale=0.7),
                                   dict(stop_strings=["w5 ", "w77"]), dict(block_size=5, steps=7)])
def test_exact_mode_matches_oracle_with_penalty_and_stops(engine, golden, extra):
    prompts = [[5, 17, 23, 40, 41, 42], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17]]
    cfg = {**dict(max_new_tokens=20, block_size=10, steps=20), **extra}
    ref = ReferenceSampler(model=golden.model, tokenizer=golden.tokenizer).sample(prompts, **cfg)
    if "stop_strings" in extra:  # the case must exercise the stop rule: it pads the rest of a row
        assert (ref == golden.tokenizer.pad_token_id).any()
    results = engine.generate(prompts, SamplingParams(early_stop=False, **cfg))
    for r, row in zip(results, ref.tolist()):
        assert r.tokens == row[: len(r.tokens)]


def _first_with(pred):
    return next((c for c in GREEDY if pred(c)), None)


# one greedy golden case per feature: CFG, suppression, begin-suppression, right shift, infill
BACKEND_CASES = list({c["name"]: c for c in filter(None, [
    _first_with(lambda c: c["config"].get("cfg_scale")),
    _first_with(lambda c: c["config"].get("suppress_tokens")),
    _first_with(lambda c: c["config"].get("begin_suppress_tokens")),
    _first_with(lambda c: c["config"].get("right_shift_logits")),
    _first_with(lambda c: c.get("kind") == "infill"),
])}.values())


@pytest.mark.slow
@pytest.mark.gpu_suite
@pytest.mark.parametrize("backend", [pytest.param("torch"), pytest.param("cpp", marks=pytest.mark.cext),
                                     pytest.param("triton", marks=pytest.mark.triton)])
def test_exact_mode_on_every_backend(request, golden, backend):
    """Sampler, commit and attention forced onto one backend (Triton on the GPU, or in the interpreter
    on CPU): the oracle's greedy tokens, with and without the repetition penalty."""
    from diffutron_engine.backends import force_backend

    lm = request.getfixturevalue("golden_triton") if backend == "triton" else golden
    with force_backend(backend):  # the engine picks its backends when it is made
        eng = Engine(lm.model, lm.tokenizer, max_batch=2)
        assert eng.runner.ops.sample_backend == backend
        for case in BACKEND_CASES:
            cfg = SamplingParams(early_stop=False, **case["config"])
            run = eng.infill if case.get("kind") == "infill" else eng.generate
            for r, expected in zip(run(case["prompts"], cfg), case["expected"]):
                assert r.tokens == expected[: len(r.tokens)], case["name"]
        prompts = [[5, 17, 23, 40, 41, 42], [7, 8]]
        cfg = dict(max_new_tokens=12, block_size=6, steps=12, repetition_penalty=1.3, begin_suppress_tokens=[7])
        ref = ReferenceSampler(model=golden.model, tokenizer=golden.tokenizer).sample(prompts, **cfg)
        for r, row in zip(eng.generate(prompts, SamplingParams(early_stop=False, **cfg)), ref.tolist()):
            assert r.tokens == row[: len(r.tokens)]


@pytest.mark.slow
@pytest.mark.gpu_suite
@pytest.mark.triton
def test_triton_backend_matches_torch_with_caches_and_sampling(golden_triton):
    """Dual cache (attention reads the pool in place), threshold rule and temperature: the same tokens
    on the Triton and torch backends (same Philox draws, same ranking rule), and with the LM head fused
    into the Triton sampler."""
    from diffutron_engine.backends import force_backend

    cfg = SamplingParams(max_new_tokens=12, block_size=6, steps=12, threshold=0.2, temperature=0.8,
                         seed=5, early_stop=False, repetition_penalty=1.2)
    prompts = [[5, 17, 23, 40, 41, 42], [7, 8, 9]]
    guided = cfg.override(cfg_scale=0.5)  # CFG rows take the unfused head (guidance mixes two rows' logits)
    runs = []
    for backend, fused in (("torch", False), ("triton", False), ("triton", True)):
        with force_backend(backend):
            eng = Engine(golden_triton.model, golden_triton.tokenizer, max_batch=2, cache="dual", fused_head=fused)
        assert eng.runner.fused_head == fused
        runs.append([r.tokens for r in eng.generate(prompts, [cfg, guided])])
    assert runs[0] == runs[1] == runs[2]


def test_fused_head_only_where_the_triton_sampler_runs(golden):
    eng = Engine(golden.model, golden.tokenizer, max_batch=1, fused_head=True)
    assert eng.runner.ops.sample_backend in ("cpp", "torch") and not eng.runner.fused_head


def test_early_stop_saves_forwards_and_keeps_the_text(golden):
    # Lean the tiny model towards EOS so that answers end early.
    model = golden.model
    bias = model.decoder.bias
    old = bias.data.clone()
    bias.data[golden.tokenizer.eos_token_id] += 6.0
    try:
        eng = Engine(model, golden.tokenizer, max_batch=4)
        prompts = [[5, 17, 23, 40, 41, 42], [7, 8], [9, 10, 11, 12, 13]]
        cfg = dict(max_new_tokens=24, block_size=8, steps=24)
        full = eng.generate(prompts, SamplingParams(early_stop=False, **cfg))
        early = eng.generate(prompts, SamplingParams(early_stop=True, **cfg))
    finally:
        bias.data.copy_(old)
    assert [r.text for r in early] == [r.text for r in full]
    assert all(e.forward_passes <= f.forward_passes for e, f in zip(early, full))
    assert sum(e.forward_passes for e in early) < sum(f.forward_passes for f in full)
    assert any(r.finish_reason == "answer ended" for r in early)


@pytest.mark.slow
def test_sampling_distribution_matches_softmax(golden):
    """Temperature > 0: many draws of one position against softmax(logits / tau)."""
    eng = Engine(golden.model, golden.tokenizer, max_batch=1024)
    prompt, tau, n = [5, 17, 23, 40, 41, 42], 0.7, 20_000
    cfg = SamplingParams(max_new_tokens=1, block_size=1, steps=1, temperature=tau, seed=123)
    draws = torch.tensor([r.tokens[-1] for r in eng.generate([prompt] * n, cfg)])
    x = torch.tensor([prompt + [golden.tokenizer.mask_token_id]])
    with torch.no_grad():
        p = torch.softmax(golden.model(x).logits[0, -1].double() / tau, -1)
    counts = torch.bincount(draws, minlength=p.numel()).double()
    # Pearson chi-square over the bins with enough expected mass, the rest pooled
    exp = p * n
    big = exp >= 5
    obs_b, exp_b = torch.cat([counts[big], counts[~big].sum()[None]]), torch.cat([exp[big], exp[~big].sum()[None]])
    chi2 = float(((obs_b - exp_b) ** 2 / exp_b).sum())
    dof = obs_b.numel() - 1
    # Wilson-Hilferty: P(chi2 > limit) ~ 1e-6 under the null
    limit = dof * (1 - 2 / (9 * dof) + 4.75 * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < limit, (chi2, limit, dof)
    assert (counts[p < 1e-12] == 0).all()


def test_request_draws_do_not_depend_on_the_batch(golden):
    eng = Engine(golden.model, golden.tokenizer, max_batch=8)
    prompts = [[5, 17, 23], [7, 8, 9, 10, 11], [12, 13]]
    cfg = SamplingParams(max_new_tokens=12, block_size=4, steps=12, temperature=0.9, seed=40, stochastic_transfer=True)
    together = eng.generate(prompts, cfg)
    for i, p in enumerate(prompts):
        alone = eng.generate([p], cfg.override(seed=40 + i))  # request i's seed is seed + i
        assert alone[0].tokens == together[i].tokens
    rnd = cfg.override(remasking="random", stochastic_transfer=False)
    assert eng.generate(prompts, rnd)[2].tokens == eng.generate([prompts[2]], rnd.override(seed=42))[0].tokens


# ----------------------------------------------------------------------------- caches and fast rules
def test_cache_modes_equal_exact_when_each_block_takes_one_step(engine, golden):
    prompts = [[5, 17, 23, 40, 41, 42], [7, 8]]
    base = dict(max_new_tokens=24, block_size=8, steps=3, early_stop=False)  # 3 blocks x 1 step
    exact = engine.generate(prompts, SamplingParams(**base))
    for cache in ("prefix", "dual"):
        eng = Engine(golden.model, golden.tokenizer, max_batch=2, cache=cache)
        assert [r.tokens for r in eng.generate(prompts, SamplingParams(**base))] == [r.tokens for r in exact]


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("extra", [{}, dict(cfg_scale=0.5), dict(right_shift_logits=True), dict(threshold=0.5)])
def test_cache_modes_fill_every_mask(golden, cache, extra):
    """Every mask is committed (the model never predicts the mask id here: it is suppressed), in at
    most the schedule's steps; and a request's tokens do not depend on its batch."""
    eng = Engine(golden.model, golden.tokenizer, max_batch=2, cache=cache)
    prompts = [[5, 17, 23, 40, 41, 42], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]
    mask = golden.tokenizer.mask_token_id
    params = SamplingParams(max_new_tokens=20, block_size=8, steps=20, early_stop=False, suppress_tokens=[mask],
                            **extra)
    res = eng.generate(prompts, params)
    for r, p in zip(res, prompts):
        assert r.tokens[: len(p)] == p and len(r.tokens) == len(p) + 20
        assert mask not in r.tokens  # every mask filled
        assert 0 < r.forward_passes <= 20
    alone = Engine(golden.model, golden.tokenizer, max_batch=1, cache=cache).generate(prompts[2:], params)
    assert alone[0].tokens == res[2].tokens


def test_threshold_commits_several_per_step(golden):
    eng = Engine(golden.model, golden.tokenizer, max_batch=4)
    prompts = [[5, 17, 23, 40, 41, 42], [7, 8]]
    fast = eng.generate(prompts, SamplingParams(max_new_tokens=24, block_size=8, steps=24, threshold=0.05,
                                                early_stop=False))
    assert all(r.forward_passes < 24 for r in fast)
    one = eng.generate(prompts, SamplingParams(max_new_tokens=24, block_size=8, steps=24, threshold=1.0,
                                               early_stop=False))
    assert all(r.forward_passes == 24 for r in one)  # tau = 1: only the forced one per step


# ----------------------------------------------------------------------------- streaming and API
def test_stream_deltas_add_up_to_the_final_text(golden):
    eng = Engine(golden.model, golden.tokenizer, max_batch=2)
    prompts = [[5, 17, 23, 40, 41, 42], [7, 8], [9, 10, 11]]
    cfg = SamplingParams(max_new_tokens=16, block_size=4, steps=16, early_stop=False)
    final = [r.text for r in eng.generate(prompts, cfg)]
    pieces = {i: [] for i in range(3)}
    done = []
    for ev in eng.stream(prompts, cfg):
        pieces[ev.index].append(ev.delta)
        if ev.finished:
            done.append(ev.index)
            assert ev.text == final[ev.index]
    assert sorted(done) == [0, 1, 2]
    assert ["".join(pieces[i]) for i in range(3)] == final
    assert max(len(v) for v in pieces.values()) > 1  # text arrives block by block


def test_engine_accepts_text_and_rejects_bad_input(tiny):
    eng = Engine(tiny.model, tiny.tokenizer)
    r = eng.generate(["Merhaba"], SamplingParams(max_new_tokens=4, steps=4, block_size=4))[0]
    assert r.prompt_token_ids and r.new_tokens <= 4
    with pytest.raises(DiffutronError, match="beyond the model's context"):
        eng.generate([[5] * 10], SamplingParams(max_new_tokens=600))
    with pytest.raises(DiffutronError, match="unknown cache"):
        Engine(tiny.model, tiny.tokenizer, cache="triple")
    with pytest.raises(DiffutronError, match="unknown sampling parameter"):
        SamplingParams().override(cache="dual")
    with pytest.raises(DiffutronError, match="either threshold or factor"):
        SamplingParams(threshold=0.9, factor=1.0)
    with pytest.raises(DiffutronError, match="no prompts"):
        eng.generate([], SamplingParams())
