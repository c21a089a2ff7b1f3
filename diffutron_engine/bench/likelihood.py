"""`diffutron-engine bench eval`: the masked-diffusion Monte-Carlo likelihood, plain vs batched.

    diffutron-engine bench eval                           # mmBERT width and vocabulary, 2 layers, CPU
    diffutron-engine bench eval --layers 22 --device cuda --save bench/results

The same multiple-choice requests (Turkish contexts, four continuations each) are scored twice from
the same seed: by the plain implementation of the estimator (full [B, T, V] logits, one request at a
time, as dllm's harness computes it: integrations/mc_likelihood.loglikelihood_plain) and by the batched
one that DiffutronLM uses (copies of all requests packed by length, the LM head only at scored positions
through the fused cross-entropy). Reports requests/s of each, the speed-up, forwards, peak working memory
and the largest difference between the two sets of numbers (absolute and relative); a table, then one
JSON line. The model is the real mmBERT architecture with random weights (`--layers` fewer to fit a CPU);
its numbers measure speed and agreement, not quality.
"""

from __future__ import annotations

import time

import torch

from .measure import PeakMemory, machine_info, sync


def _requests(tokenizer, n: int) -> list[tuple[str, str]]:
    """n (context, continuation) pairs in the style of a multiple-choice task: each context of a few
    sentences of the built-in Turkish text, four candidate endings each."""
    from ..models.random_weights import _CORPUS

    lines = [l.strip() for l in _CORPUS.splitlines() if len(l.split()) >= 6 and not l.startswith("[")]
    out = []
    for i in range(0, n, 4):
        base = lines[(i // 4) % len(lines)]
        words = base.split()
        context = " ".join(lines[(i // 4 + 1) % len(lines)].split()) + " Soru: " + " ".join(words[:-3]) + " Cevap:"
        for j in range(4):
            other = lines[(i // 4 + j) % len(lines)].split()
            out.append((context, " " + " ".join(other[-3 + (j % 2):])))
    return out[:n]


def run(layers: int = 2, requests: int = 16, mc_num: int = 32, batch_size: int = 32, vocab: int = 256_000,
        device: str = "cpu", dtype: str = "float32", seed: int = 0, token_budget: int | None = None,
        log=print) -> dict:
    from ..integrations.mc_likelihood import (check_mc, check_requests, default_token_budget, encode_pair,
                                              loglikelihood_batched, loglikelihood_plain, pack)
    from ..loading import resolve_device, resolve_dtype
    from ..model.modernbert import ModernBert
    from ..models.random_weights import MMBERT_BASE, build_tokenizer, random_mmbert

    check_mc(mc_num, batch_size)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    tok = build_tokenizer(1000)
    model = random_mmbert(layers=layers, vocab_size=vocab, seed=seed, dtype=torch_dtype, device=device)
    texts = _requests(tok, requests)
    pairs = [encode_pair(tok, c, x) for c, x in texts]
    check_requests(pairs, model.config.max_position_embeddings, texts)
    runner = ModernBert(model)
    budget = token_budget or default_token_budget(device)
    log(f"{len(pairs)} requests, context {min(len(p.context) for p in pairs)}-{max(len(p.context) for p in pairs)} "
        f"tokens, continuation {min(len(p.target) for p in pairs)}-{max(len(p.target) for p in pairs)}; "
        f"mc_num {mc_num}, batch {batch_size}; {layers} layers, vocab {vocab:,}, {device} {dtype}")

    def timed(fn):
        torch.manual_seed(seed)  # the same masks for both: the estimator consumes torch's generators
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            with torch.no_grad():
                vals = fn()
            sync(device)
            secs = time.perf_counter() - t0
        return vals, secs, mem.peak

    scored = sum(len(p.target) for p in pairs)
    forwards = {"plain": len(pairs) * (mc_num // batch_size)}
    forwards["batched"] = len(pack(sorted((p.length for p in pairs for _ in range(mc_num)), reverse=True), budget))
    # warm-up of each path on one request (first-call allocations, MKL initialization)
    loglikelihood_plain(model, pairs[:1], tok.mask_token_id, batch_size, batch_size)
    loglikelihood_batched(runner, pairs[:1], tok.mask_token_id, tok.pad_token_id, batch_size, batch_size, budget)
    plain, t_plain, m_plain = timed(lambda: loglikelihood_plain(model, pairs, tok.mask_token_id, mc_num, batch_size))
    fast, t_fast, m_fast = timed(lambda: loglikelihood_batched(runner, pairs, tok.mask_token_id, tok.pad_token_id,
                                                               mc_num, batch_size, budget))
    abs_diff = max(abs(a - b) for a, b in zip(plain, fast))
    rel_diff = max(abs(a - b) / max(abs(a), 1e-30) for a, b in zip(plain, fast))

    def row(name, secs, peak):
        return {"name": name, "seconds": round(secs, 3), "requests_per_s": round(len(pairs) / secs, 3),
                "forwards": forwards[name], "peak_mem_mb": None if peak is None else round(peak, 1)}

    return {
        "bench": "eval-likelihood",
        "config": {"layers": layers, "requests": len(pairs), "mc_num": mc_num, "batch_size": batch_size,
                   "vocab": vocab, "hidden": MMBERT_BASE["hidden_size"], "device": device, "dtype": dtype,
                   "seed": seed, "token_budget": budget, "continuation_tokens": scored},
        "machine": machine_info(device),
        "results": [row("plain", t_plain, m_plain), row("batched", t_fast, m_fast)],
        "speedup": round(t_plain / t_fast, 2),
        "max_abs_diff": abs_diff,
        "max_rel_diff": rel_diff,
        "loglikelihoods": {"plain": plain, "batched": fast},
    }


def format_table(report: dict) -> str:
    lines = [f"{'implementation':<16} {'req/s':>8} {'seconds':>9} {'forwards':>9} {'peak MB':>9}"]
    for r in report["results"]:
        peak = "n/a" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        lines.append(f"{r['name']:<16} {r['requests_per_s']:>8.3f} {r['seconds']:>9.2f} {r['forwards']:>9} {peak:>9}")
    lines.append(f"speed-up {report['speedup']:.2f}x; largest difference {report['max_abs_diff']:.3g} "
                 f"(relative {report['max_rel_diff']:.2g})")
    return "\n".join(lines)
