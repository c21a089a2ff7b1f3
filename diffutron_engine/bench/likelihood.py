"""`diffutron-engine bench eval`: what lm-eval asks of a masked diffusion LM, plain vs the engine's way.

    diffutron-engine bench eval                           # mmBERT width and vocabulary, 2 layers, CPU
    diffutron-engine bench eval --layers 22 --device cuda --save bench/results
    diffutron-engine bench eval --phases generation --gen-requests 32 --gen-new-tokens 64

Two phases on one model (`--phases`, both by default):

likelihood: the same multiple-choice requests (Turkish contexts, four continuations each) are scored twice from
the same seed: by the plain implementation of the estimator (full [B, T, V] logits, one request at a
time, as dllm's harness computes it: integrations/mc_likelihood.loglikelihood_plain) and by the batched
one that DiffutronLM uses (copies of all requests packed by length, the LM head only at scored positions
through the fused cross-entropy). Reports requests/s of each, the speed-up, forwards, peak working memory
and the largest difference between the two sets of numbers (absolute and relative); a table, then one
JSON line.

generation: lm-eval-style `generate_until` requests (Turkish few-shot "Soru: ... Cevap:" contexts, stop
strings as lm-eval's `until`, greedy, steps = max_new_tokens, blocks of 32) answered twice: one request at a
time by the oracle (diffutron_engine.reference.ReferenceSampler), as dllm's harness samples per request,
(`--gen-plain-requests`: on an evenly spaced
few of them, its requests/s not depending on how many wait), and all at once by the engine in exact mode with continuous batching up to max_batch (what
DiffutronLM.generate_until runs). Reports requests/s of each, the speed-up, forward passes (model calls;
the engine's run one step of the whole running batch), peak working memory, and how far the answers
agree: token for token over every position the engine decided, and the texts cut at the stop strings
(in float32 greedy both must be 100%).

The model is the real mmBERT architecture with random weights (`--layers` fewer to fit a CPU); its
numbers measure speed and agreement, not quality.
"""

from __future__ import annotations

import time

from .measure import PeakMemory, machine_info, sync

# torch is imported inside the functions: the command line checks --phases without it

PHASES = ("likelihood", "generation")
# lm-eval's `until` of a few-shot question-answer task: the next question, a blank line
GEN_STOP_STRINGS = ["Soru:", "\n\n"]


def check_phases(phases) -> tuple[str, ...]:
    """`phases` (names, or one comma-separated string of them) as a tuple in PHASES' order; ValueError
    naming the unknown ones, or when none is given."""
    if isinstance(phases, str):
        phases = phases.split(",")
    names = {p.strip() for p in phases if p.strip()}
    unknown = sorted(names - set(PHASES))
    if unknown:
        raise ValueError(f"unknown phase(s) {', '.join(unknown)}; choose from {', '.join(PHASES)}")
    if not names:
        raise ValueError(f"no phase given; choose from {', '.join(PHASES)}")
    return tuple(p for p in PHASES if p in names)


def _lines() -> list[str]:
    from ..models.random_weights import _CORPUS

    return [l.strip() for l in _CORPUS.splitlines() if len(l.split()) >= 6 and not l.startswith("[")]


def _requests(tokenizer, n: int) -> list[tuple[str, str]]:
    """n (context, continuation) pairs in the style of a multiple-choice task: each context of a few
    sentences of the built-in Turkish text, four candidate endings each."""
    lines = _lines()
    out = []
    for i in range(0, n, 4):
        base = lines[(i // 4) % len(lines)]
        words = base.split()
        context = " ".join(lines[(i // 4 + 1) % len(lines)].split()) + " Soru: " + " ".join(words[:-3]) + " Cevap:"
        for j in range(4):
            other = lines[(i // 4 + j) % len(lines)].split()
            out.append((context, " " + " ".join(other[-3 + (j % 2):])))
    return out[:n]


def _gen_contexts(n: int) -> list[str]:
    """n generation contexts in the style of a few-shot question-answer task: 1-3 worked examples
    ("Soru: ... Cevap: ...", a blank line between them), then the question whose answer is asked for;
    their lengths differ, as a task's do."""
    lines = _lines()
    out = []
    for i in range(n):
        shots = []
        for k in range(1 + i % 3):
            words = lines[(i + 2 * k) % len(lines)].split()
            shots.append(f"Soru: {' '.join(words[:-3])}?\nCevap: {' '.join(words[-3:])}")
        question = lines[(i + 7) % len(lines)].split()
        out.append("\n\n".join(shots) + f"\n\nSoru: {' '.join(question[:-3])}?\nCevap:")
    return out


def _build(layers: int, vocab: int, device: str, dtype: str, seed: int):
    from ..loading import resolve_device, resolve_dtype
    from ..models.random_weights import build_tokenizer, random_mmbert

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    tok = build_tokenizer(1000)
    model = random_mmbert(layers=layers, vocab_size=vocab, seed=seed, dtype=torch_dtype, device=device)
    return device, tok, model


def _timed(device: str, seed: int, fn):
    """fn() from torch seed `seed`, under no_grad: (its value, seconds, peak working memory in MiB)."""
    import torch

    torch.manual_seed(seed)
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        with torch.no_grad():
            vals = fn()
        sync(device)
        secs = time.perf_counter() - t0
    return vals, secs, mem.peak


def _peak(peak):
    return None if peak is None else round(peak, 1)


def run(layers: int = 2, requests: int = 16, mc_num: int = 32, batch_size: int = 32, vocab: int = 256_000,
        device: str = "cpu", dtype: str = "float32", seed: int = 0, token_budget: int | None = None,
        log=print, phases=("likelihood",), gen_requests: int = 32, gen_new_tokens: int = 32,
        gen_max_batch: int = 32, gen_plain_requests: int | None = None) -> dict:
    """The report of the phases asked for (the likelihood alone unless `phases` says otherwise; the
    command line runs both by default), on one random-weight model."""
    from ..integrations.mc_likelihood import check_mc
    from ..models.random_weights import MMBERT_BASE

    phases = check_phases(phases)
    if "likelihood" in phases:
        check_mc(mc_num, batch_size)
    for name, value in (("gen_requests", gen_requests), ("gen_new_tokens", gen_new_tokens),
                        ("gen_max_batch", gen_max_batch), ("gen_plain_requests", gen_plain_requests or 1)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if gen_plain_requests is not None and gen_plain_requests > gen_requests:
        raise ValueError(f"gen_plain_requests ({gen_plain_requests}) must be <= gen_requests ({gen_requests})")
    device, tok, model = _build(layers, vocab, device, dtype, seed)
    report = {"bench": "eval", "phases": list(phases),
              "config": {"layers": layers, "vocab": vocab, "hidden": MMBERT_BASE["hidden_size"], "device": device,
                         "dtype": dtype, "seed": seed},
              "machine": machine_info(device)}
    if "likelihood" in phases:
        lik = _likelihood(model, tok, device, dtype, layers, vocab, requests, mc_num, batch_size, seed,
                          token_budget, log)
        report["config"].update(lik.pop("config"))
        report.update(lik)
    if "generation" in phases:
        report["generation"] = _generation(model, tok, device, seed, gen_requests, gen_new_tokens, gen_max_batch,
                                           gen_plain_requests or gen_requests, log)
    return report


def _likelihood(model, tok, device, dtype, layers, vocab, requests, mc_num, batch_size, seed, token_budget,
                log) -> dict:
    from ..integrations.mc_likelihood import (check_requests, default_token_budget, encode_pair,
                                              loglikelihood_batched, loglikelihood_plain, pack)
    from ..model.modernbert import ModernBert

    texts = _requests(tok, requests)
    pairs = [encode_pair(tok, c, x) for c, x in texts]
    check_requests(pairs, model.config.max_position_embeddings, texts)
    runner = ModernBert(model)
    budget = token_budget or default_token_budget(device)
    log(f"likelihood: {len(pairs)} requests, context {min(len(p.context) for p in pairs)}-"
        f"{max(len(p.context) for p in pairs)} tokens, continuation {min(len(p.target) for p in pairs)}-"
        f"{max(len(p.target) for p in pairs)}; mc_num {mc_num}, batch {batch_size}; {layers} layers, "
        f"vocab {vocab:,}, {device} {dtype}")

    scored = sum(len(p.target) for p in pairs)
    forwards = {"plain": len(pairs) * (mc_num // batch_size)}
    forwards["batched"] = len(pack(sorted((p.length for p in pairs for _ in range(mc_num)), reverse=True), budget))
    # warm-up of each path on one request (first-call allocations, MKL initialization)
    loglikelihood_plain(model, pairs[:1], tok.mask_token_id, batch_size, batch_size)
    loglikelihood_batched(runner, pairs[:1], tok.mask_token_id, tok.pad_token_id, batch_size, batch_size, budget)
    # the same seed for both: the same masks (the estimator consumes torch's generators)
    plain, t_plain, m_plain = _timed(device, seed, lambda: loglikelihood_plain(model, pairs, tok.mask_token_id,
                                                                               mc_num, batch_size))
    fast, t_fast, m_fast = _timed(device, seed, lambda: loglikelihood_batched(
        runner, pairs, tok.mask_token_id, tok.pad_token_id, mc_num, batch_size, budget))
    abs_diff = max(abs(a - b) for a, b in zip(plain, fast))
    rel_diff = max(abs(a - b) / max(abs(a), 1e-30) for a, b in zip(plain, fast))
    log(f"  likelihood: plain {t_plain:.2f} s, batched {t_fast:.2f} s")

    def row(name, secs, peak):
        return {"name": name, "seconds": round(secs, 3), "requests_per_s": round(len(pairs) / secs, 3),
                "forwards": forwards[name], "peak_mem_mb": _peak(peak)}

    return {
        "config": {"requests": len(pairs), "mc_num": mc_num, "batch_size": batch_size, "token_budget": budget,
                   "continuation_tokens": scored},
        "results": [row("plain", t_plain, m_plain), row("batched", t_fast, m_fast)],
        "speedup": round(t_plain / t_fast, 2),
        "max_abs_diff": abs_diff,
        "max_rel_diff": rel_diff,
        "loglikelihoods": {"plain": plain, "batched": fast},
    }


def _cut(text: str, stops: list[str]) -> str:
    """lm-eval's answer: the text up to its first stop string (DiffutronLM.generate_until cuts so)."""
    for stop in stops:
        text = text.split(stop)[0]
    return text


def _generation(model, tok, device, seed, n, new_tokens, max_batch, n_plain, log) -> dict:
    import torch

    from ..config import EngineConfig, SamplingParams, seed_for
    from ..engine import Engine
    from ..inputs import TextPrompt, encode_text
    from ..loading import check_context, decode_answer
    from ..reference import ReferenceSampler

    contexts = _gen_contexts(n)
    ids = [encode_text(tok, c, chat=False) for c in contexts]  # as the engine encodes a TextPrompt below
    for p in ids:
        check_context(model.config, len(p) + new_tokens)
    stops = list(GEN_STOP_STRINGS)
    block = min(32, new_tokens)
    knobs = dict(max_new_tokens=new_tokens, steps=new_tokens, block_size=block, temperature=0.0,
                 remasking="low_confidence", stop_strings=stops)
    # What DiffutronLM.generate_until hands the engine for a task's requests (exact mode, every request at
    # once, one SamplingParams each: lm-eval's `until` as stop strings, checked as the text settles):
    # integrations/lm_eval.py builds these, without lm_eval being needed here.
    prompts = [TextPrompt(prompt=c, chat_template=False) for c in contexts]
    params = [SamplingParams(seed=seed_for(seed, i), **knobs) for i in range(n)]
    engine = Engine(model, tok, EngineConfig(max_batch=max_batch, cache="none"))
    sampler = ReferenceSampler(model=model, tokenizer=tok)
    # The plain path answers one request at a time, so its requests/s does not depend on how many wait:
    # it may be timed on n_plain of the requests, evenly spaced (their prompt lengths cycle), to save time.
    # Agreement is checked on those.
    picked = [i * n // n_plain for i in range(n_plain)]
    log(f"generation: {n} requests, prompt {min(map(len, ids))}-{max(map(len, ids))} tokens, {new_tokens} new "
        f"tokens, steps {new_tokens}, block {block}, greedy, stop {stops!r}; engine max_batch {max_batch}; "
        f"plain path on {n_plain} of them")

    def plain():
        # dllm's harness: one request at a time through the sampler, its text then cut at `until`. The
        # oracle applies the same stop rule as the engine while it samples (the two then decide every
        # position alike; on these random weights a stop string is rare).
        outs = []
        for p in (ids[i] for i in picked):
            torch.manual_seed(seed)
            outs.append(sampler.sample([p], return_dict=True, **knobs))
        return outs

    def batched():
        steps = []
        outs = engine.generate(prompts, params, on_step=lambda step: steps.append(len(step)))
        return outs, len(steps)

    # warm-up of each path (first-call allocations, MKL initialization): two requests, two new tokens
    small = dict(knobs, max_new_tokens=2, steps=2, block_size=2)
    with torch.no_grad():
        sampler.sample([ids[0]], **small)
        engine.generate(prompts[:2], [SamplingParams(seed=seed_for(seed, i), **small) for i in range(2)])
    oracle, t_plain, m_plain = _timed(device, seed, plain)
    log(f"  generation: plain (one request at a time) {t_plain:.2f} s")
    (outs, engine_steps), t_fast, m_fast = _timed(device, seed, batched)
    log(f"  generation: engine (batched) {t_fast:.2f} s")

    mask = tok.mask_token_id
    same = compared = texts_equal = undecided = 0
    for p, o, e in zip((ids[i] for i in picked), oracle, (outs[i] for i in picked)):
        if list(e.prompt_token_ids) != p:
            raise RuntimeError("the engine encoded a prompt differently from the benchmark's oracle input")
        ref = o.sequences[0, len(p): len(p) + new_tokens].tolist()
        got = list(e.token_ids)
        for a, b in zip(got, ref):
            if a == mask:  # an early-stopped answer leaves positions it no longer needs undecided
                undecided += 1
                continue
            compared += 1
            same += a == b
        ref_text, _ = decode_answer(tok, o.sequences[0].tolist(), len(p))
        texts_equal += _cut(e.text, stops) == _cut(ref_text, stops)
    reasons: dict[str, int] = {}
    for e in outs:
        reasons[e.finish_reason] = reasons.get(e.finish_reason, 0) + 1

    def row(name, count, secs, peak, forwards, row_forwards):
        return {"name": name, "requests": count, "seconds": round(secs, 3), "requests_per_s": round(count / secs, 3),
                "forwards": forwards, "row_forwards": row_forwards, "peak_mem_mb": _peak(peak)}

    plain_fwd = sum(o.forward_passes for o in oracle)
    return {
        "config": {"requests": n, "new_tokens": new_tokens, "steps": new_tokens, "block_size": block,
                   "temperature": 0.0, "remasking": "low_confidence", "stop_strings": stops,
                   "max_batch": max_batch, "cache": "none", "plain_requests": n_plain,
                   "prompt_tokens": [min(map(len, ids)), max(map(len, ids))]},
        "results": [row("plain", n_plain, t_plain, m_plain, plain_fwd, plain_fwd),
                    row("engine", n, t_fast, m_fast, engine_steps, sum(e.forward_passes for e in outs))],
        "speedup": round((n / t_fast) / (n_plain / t_plain), 2),  # the ratio of the requests/s
        "agreement": round(100.0 * same / compared, 4) if compared else None,
        "tokens_compared": compared,
        "tokens_undecided": undecided,
        "texts_equal": texts_equal,
        "finish_reasons": reasons,
    }


def problems(report: dict) -> list[str]:
    """What a float32 report shows wrong, one line each: likelihoods that differ beyond float rounding, or
    greedy generation whose tokens or texts differ from the oracle's (exact mode must give its tokens)."""
    out = []
    exact = report.get("config", {}).get("dtype", "float32") in ("float32", "float64")
    if exact and report.get("max_rel_diff") is not None and report["max_rel_diff"] > 1e-4:
        out.append(f"likelihood: the two implementations differ by {report['max_rel_diff']:.2g} (relative)")
    gen = report.get("generation")
    if exact and gen:
        if gen.get("agreement") is not None and gen["agreement"] < 100.0:
            out.append(f"generation: {gen['agreement']:g}% of the engine's tokens equal the oracle's; greedy exact "
                       "mode must give the oracle's tokens (100%)")
        checked = gen["config"].get("plain_requests", gen["config"]["requests"])
        if gen.get("texts_equal") != checked:
            out.append(f"generation: {gen['texts_equal']} of {checked} answers equal the oracle's")
    return out


def format_table(report: dict) -> str:
    lines = []
    if report.get("results"):
        lines.append(f"likelihood       {'req/s':>8} {'seconds':>9} {'forwards':>9} {'peak MB':>9}")
        for r in report["results"]:
            peak = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
            lines.append(f"{r['name']:<16} {r['requests_per_s']:>8.3f} {r['seconds']:>9.2f} {r['forwards']:>9} "
                         f"{peak:>9}")
        lines.append(f"speed-up {report['speedup']:.2f}x; largest difference {report['max_abs_diff']:.3g} "
                     f"(relative {report['max_rel_diff']:.2g})")
    gen = report.get("generation")
    if gen:
        cfg = gen["config"]
        if lines:
            lines.append("")
        lines.append(f"generation       {'requests':>8} {'req/s':>8} {'seconds':>9} {'forwards':>9} {'row fwd':>9} "
                     f"{'peak MB':>9}")
        for r in gen["results"]:
            peak = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
            lines.append(f"{r['name']:<16} {r['requests']:>8} {r['requests_per_s']:>8.3f} {r['seconds']:>9.2f} "
                         f"{r['forwards']:>9} {r['row_forwards']:>9} {peak:>9}")
        agree = "n/a" if gen["agreement"] is None else f"{gen['agreement']:.2f}%"
        lines.append(f"speed-up {gen['speedup']:.2f}x in requests/s ({cfg['new_tokens']} new tokens, steps "
                     f"{cfg['steps']}, block {cfg['block_size']}, greedy, max_batch {cfg['max_batch']}); tokens equal "
                     f"to the oracle's {agree} of {gen['tokens_compared']}, answers equal "
                     f"{gen['texts_equal']}/{cfg['plain_requests']}")
    return "\n".join(lines)
