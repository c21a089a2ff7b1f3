"""`diffutron-engine bench overhead`: what the engine costs beyond the model, measured where the model
is nearly free.

On a 1-layer ModernBERT (hidden 64, a 1,000-id vocabulary) a forward pass costs little, so the engine's
own work shows: per batch size, the engine's step (Engine.step(): admission, the device step, the one
copy back, the host's bookkeeping and outputs) beside transformers' bare forward of the same canvas
(ModernBertForMaskedLM(canvas).logits) and beside the engine's device step alone (forward + LM head on
the candidates + sample + commit + counters, no bookkeeping), and beside the same engine step with every
request tracing (SamplingParams(trace=True)), in one run. Also the ATen ops each step
issues, in total and outside the model, at several batch and block sizes: a step is a fixed sequence of
device ops, so these counts must not change with the batch or the block. Ops that only make views
(reshape, transpose, unsqueeze: no kernel) are counted apart, since the dispatcher picks among them by
strides.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..engine.probe import count_step_ops, device_step_seconds
from .measure import machine_info


@dataclass
class OverheadConfig:
    batches: tuple = (1, 8, 32, 64)
    blocks: tuple = (8, 32, 128)  # block sizes for the op-count table (at batch 8)
    prompt_len: int = 64
    new_tokens: int = 256
    block_size: int = 32
    min_seconds: float = 1.0  # per timed figure
    threads: int | None = None
    seed: int = 0

    def __post_init__(self):
        if not self.batches or any(b < 1 for b in self.batches):
            raise ValueError("batch sizes must be >= 1")
        if not self.blocks or any(b < 1 or b > self.new_tokens for b in self.blocks):
            raise ValueError(f"block sizes must be in [1, new_tokens={self.new_tokens}]")
        for name in ("prompt_len", "new_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


def _timed(fn, min_seconds: float, max_calls: int | None = None) -> float:
    """Seconds per call: repeated until min_seconds have passed (at least 5 calls), and never more than
    max_calls times (an engine's requests have only so many steps before they finish)."""
    n, total = 0, 0.0
    while (n < 5 or total < min_seconds) and (max_calls is None or n < max_calls):
        t = time.perf_counter()
        fn()
        total += time.perf_counter() - t
        n += 1
    return total / n


def _setup(model, tok, batch: int, cfg: OverheadConfig, block_size: int, trace: bool = False):
    from ..config import SamplingParams
    from ..engine import Engine

    engine = Engine(model, tok, max_batch=batch)
    g = torch.Generator().manual_seed(cfg.seed)
    prompts = [torch.randint(5, len(tok), (cfg.prompt_len,), generator=g).tolist() for _ in range(batch)]
    params = SamplingParams(max_new_tokens=cfg.new_tokens, block_size=block_size, steps=cfg.new_tokens,
                            early_stop=False, seed=cfg.seed, trace=trace)
    ids = engine.add_requests(prompts, params)
    for _ in range(3):  # admission and warm-up
        engine.step()
    return engine, ids


def run(cfg: OverheadConfig, log=print) -> dict:
    from transformers import ModernBertForMaskedLM

    from ..loading import prepare_tokenizer
    from ..models.random_weights import build_tokenizer, modernbert_config

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    tok = prepare_tokenizer(build_tokenizer())
    mcfg = modernbert_config("tiny", vocab_size=len(tok), num_hidden_layers=1,
                             max_position_embeddings=max(512, 2 * (cfg.prompt_len + cfg.new_tokens)))
    model = ModernBertForMaskedLM(mcfg).eval()
    rows = []
    steps_budget = cfg.new_tokens // cfg.block_size * cfg.block_size  # every step commits one token
    for batch in cfg.batches:
        engine, ids = _setup(model, tok, batch, cfg, cfg.block_size)
        # the steps left after the set-up's three, less two: the op count that follows steps once more, and the
        # requests must still be running after it (a fast machine would otherwise step them to their end)
        step_s = _timed(engine.step, cfg.min_seconds, max_calls=max(1, steps_budget - 3 - 2))
        ops = count_step_ops(engine)
        # the same step with every request tracing (SamplingParams(trace=True)): what the trace costs
        traced, _ = _setup(model, tok, batch, cfg, cfg.block_size, trace=True)
        traced_s = _timed(traced.step, cfg.min_seconds, max_calls=max(1, steps_budget - 3 - 2))
        canvas = torch.tensor([engine.canvas(rid) for rid in ids])
        mask = torch.ones_like(canvas)
        with torch.no_grad():
            hf_s = _timed(lambda: model(canvas, attention_mask=mask).logits, cfg.min_seconds)
        # the device step alone, on a second engine (it runs ahead of that engine's host mirror)
        engine2, _ = _setup(model, tok, batch, cfg, cfg.block_size)
        device_s = device_step_seconds(engine2, max(5, min(steps_budget - 8, 200)))
        row = dict(batch=batch, length=canvas.shape[1], hf_ms=1e3 * hf_s, device_step_ms=1e3 * device_s,
                   engine_step_ms=1e3 * step_s, engine_over_hf=step_s / hf_s, traced_step_ms=1e3 * traced_s,
                   trace_cost=traced_s / step_s, ops_per_step=ops.total,
                   ops_outside_model=ops.total - ops.inside_model, view_ops=ops.views)
        rows.append(row)
        log(f"  batch {batch:3d}: engine {row['engine_step_ms']:.2f} ms/step, transformers "
            f"{row['hf_ms']:.2f} ms, ratio {row['engine_over_hf']:.2f}, traced {row['traced_step_ms']:.2f} ms")
    blocks = []
    for block in cfg.blocks:
        engine, _ = _setup(model, tok, 8, cfg, block)
        ops = count_step_ops(engine)
        blocks.append(dict(batch=8, block=block, ops_per_step=ops.total,
                           ops_outside_model=ops.total - ops.inside_model, view_ops=ops.views))
    return {"config": asdict(cfg), "machine": machine_info("cpu"), "rows": rows, "blocks": blocks,
            "targets": targets(rows, blocks)}


def targets(rows: list[dict], blocks: list[dict]) -> list[dict]:
    out = []
    by_batch = {r["batch"]: r for r in rows}
    for b in (1, 32):
        if b in by_batch:
            ratio = by_batch[b]["engine_over_hf"]
            out.append({"target": f"engine step / transformers forward, batch {b}", "measured": round(ratio, 3),
                        "goal": "<= 1.10", "met": ratio <= 1.10})
    if 1 in by_batch and "trace_cost" in by_batch[1]:
        cost = by_batch[1]["trace_cost"]
        out.append({"target": "traced step / untraced step, batch 1", "measured": round(cost, 3), "goal": "<= 1.10",
                    "met": cost <= 1.10})
    counts = {r["ops_per_step"] for r in rows} | {b["ops_per_step"] for b in blocks}
    out.append({"target": "ops per step independent of batch and block size", "measured": sorted(counts),
                "goal": "one value", "met": len(counts) == 1})
    return out


def format_table(report: dict) -> str:
    lines = [f"{'batch':>5} {'len':>5} {'transformers ms':>16} {'device step ms':>15} {'engine step ms':>15} "
             f"{'engine/tf':>9} {'traced ms':>10} {'traced/step':>11} {'ops/step':>9} {'outside model':>14} "
             f"{'view ops':>9}"]
    for r in report["rows"]:
        lines.append(f"{r['batch']:5d} {r['length']:5d} {r['hf_ms']:16.3f} {r['device_step_ms']:15.3f} "
                     f"{r['engine_step_ms']:15.3f} {r['engine_over_hf']:9.3f} {r.get('traced_step_ms', 0):10.3f} "
                     f"{r.get('trace_cost', 0):11.3f} {r['ops_per_step']:9d} "
                     f"{r['ops_outside_model']:14d} {r['view_ops']:9d}")
    lines.append("")
    lines.append(f"{'batch':>5} {'block':>5} {'ops/step':>9} {'outside model':>14} {'view ops':>9}")
    for b in report["blocks"]:
        lines.append(f"{b['batch']:5d} {b['block']:5d} {b['ops_per_step']:9d} {b['ops_outside_model']:14d} "
                     f"{b['view_ops']:9d}")
    lines.append("")
    for t in report["targets"]:
        lines.append(f"{'met' if t['met'] else 'NOT MET':>7}  {t['target']}: {t['measured']} (goal {t['goal']})")
    return "\n".join(lines)
