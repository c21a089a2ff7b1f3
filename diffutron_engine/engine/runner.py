"""The model runner: owns every tensor (batch canvas, K/V pools, per-request random generators) and runs
one denoising step of a batch: forward the rows that need it, LM head on the candidate positions only,
sample, select, commit. It reports back by updating each Request's plain-Python state.
"""

from __future__ import annotations

import math

import torch

from ..model import KVPool, ModernBertRunner
from ..schedule import row_schedule
from ..stopping import StopRule
from .. import backends
from ..kernels.sampling import SampleParams
from .graphs import GraphCache
from .request import Request


class ModelRunner:
    def __init__(self, model, tokenizer, max_batch: int, cuda_graphs: bool = False):
        self.model = ModernBertRunner(model)
        self.tok = tokenizer
        self.mask_id, self.eos_id = tokenizer.mask_token_id, tokenizer.eos_token_id
        self.device = self.model.device
        self.max_batch = max_batch
        self.generators: dict[int, torch.Generator] = {}
        self.pools: dict[str, KVPool] = {}
        self.slots: dict[int, int] = {}
        self._stop_rules: dict[tuple, StopRule] = {}
        # forwards replayed from CUDA graphs, one per input shape (CUDA only)
        self.graphs = GraphCache() if cuda_graphs and self.device.type == "cuda" else None

    # ------------------------------------------------------------------ request lifecycle
    def add(self, req: Request) -> None:
        g = torch.Generator(device=self.device)
        g.manual_seed(req.seed)
        self.generators[req.id] = g
        if req.config.cache != "none":
            free = sorted(set(range(self.max_batch)) - set(self.slots.values()))
            self.slots[req.id] = free[0]

    def release(self, req: Request) -> None:
        self.generators.pop(req.id, None)
        self.slots.pop(req.id, None)

    def _ensure_pools(self, cfg, positions: int) -> None:
        names = ("cond", "uncond") if cfg.cfg_scale > 0 else ("cond",)
        for name in names:
            pool = self.pools.get(name)
            if pool is None or pool.positions < positions:
                new = self.model.new_pool(self.max_batch, max(positions, 2 * pool.positions if pool else positions))
                if pool is not None:  # keep what the rows already cached
                    for a, b in zip(new.k + new.v, pool.k + pool.v):
                        a[:, :, : pool.positions] = b[:, :, : pool.positions]
                self.pools[name] = new
                if self.graphs is not None:  # captured graphs write into the old pool
                    self.graphs.clear()

    # ------------------------------------------------------------------ one step
    @torch.no_grad()
    def step(self, batch: list[Request]) -> None:
        cfg = batch[0].config
        if any(r.config is not cfg for r in batch):
            raise ValueError("one step runs requests that share a SamplingConfig")
        for req in batch:
            if req.id not in self.generators:  # newly admitted
                self.add(req)
            if req.schedule is None and cfg.threshold is None and cfg.factor is None:
                per_block = math.ceil(cfg.steps / len(req.windows))
                req.schedule = row_schedule(req.masked_in_window(self.mask_id), per_block,
                                            cfg.stochastic_transfer, self.device, self.generators[req.id])

        # candidates: the still-masked positions of each row's current block
        cands = []
        for req in batch:
            lo, hi = req.window
            cands.append([p for p in range(lo, hi) if req.tokens[p] == self.mask_id])
        B, T = len(batch), max(r.length for r in batch)
        x = torch.full((B, T), self.eos_id, dtype=torch.long)
        am = torch.zeros((B, T), dtype=torch.long)
        for i, req in enumerate(batch):
            x[i, : req.length] = torch.tensor(req.tokens)
            am[i, : req.length] = 1
        x, am = x.to(self.device), am.to(self.device)

        logits = self._candidate_logits(batch, cands, x, am, "cond")
        if cfg.cfg_scale > 0:
            un_x = x.clone()
            for i, req in enumerate(batch):
                given = req.extra["given"]
                if given:
                    un_x[i, given] = self.mask_id
            un = self._candidate_logits(batch, cands, un_x, am, "uncond")
            logits = un + (cfg.cfg_scale + 1) * (logits - un)

        x0, conf = backends.sample(logits, self._sample_params(batch, cands, cfg))
        chosen = self._commit(batch, cands, x0, conf, x, cfg)

        stop = self._stop_rule(cfg)
        rows = x.cpu()
        for i, req in enumerate(batch):
            if chosen[i]:
                req.tokens = rows[i, : req.length].tolist()
            if stop is not None:
                t = torch.tensor([req.tokens])
                if stop.apply_row(t, 0, req.answer_start):
                    req.tokens = t[0].tolist()
            req.step += 1
            req.forward_passes += 1

    def _sample_params(self, batch, cands, cfg) -> SampleParams:
        """Per candidate row: the request's seed, the position, the request's step (the counters of the
        sampler's random numbers: a draw does not depend on the batch), and the penalty's seen ids."""
        row_req = [i for i, c in enumerate(cands) for _ in c]
        seen = None
        if cfg.repetition_penalty != 1.0:
            seen = [torch.tensor(sorted(set(r.tokens) - {self.mask_id, self.eos_id}), dtype=torch.long) for r in batch]
        return SampleParams(
            temperature=cfg.temperature, penalty=cfg.repetition_penalty,
            seeds=torch.tensor([batch[i].seed for i in row_req], dtype=torch.long),
            positions=torch.tensor([p for c in cands for p in c], dtype=torch.long),
            steps=torch.tensor([batch[i].step for i in row_req], dtype=torch.long),
            seen=seen, row_request=torch.tensor(row_req, dtype=torch.long),
            suppress=tuple(cfg.suppress_tokens or ()), begin_suppress=tuple(cfg.begin_suppress_tokens or ()),
            random_confidence=cfg.remasking == "random",
        )

    def _commit(self, batch, cands, x0, conf, x, cfg) -> list[int]:
        """Choose each row's positions to commit (schedule top-k, threshold or factor rule) and write
        them into the canvas x in one batched op; returns how many each row committed."""
        B = len(batch)
        lo = [r.window[0] for r in batch]
        L = max(r.window[1] - r.window[0] for r in batch)
        rows = [i for i, c in enumerate(cands) for _ in c]
        cols = [p - lo[i] for i, c in enumerate(cands) for p in c]
        conf_blk = torch.full((B, L), -torch.inf, dtype=torch.float32, device=self.device)
        tok_blk = torch.zeros((B, L), dtype=torch.long, device=self.device)
        if rows:
            r, c = torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)
            conf_blk[r, c] = conf.to(self.device, torch.float32)
            tok_blk[r, c] = x0.to(self.device)
        if cfg.threshold is not None:
            rule, value, k = "threshold", cfg.threshold, None
        elif cfg.factor is not None:
            rule, value, k = "factor", cfg.factor, None
        else:
            counts = [min(r.schedule[r.step] if r.step < len(r.schedule) else 0, len(c)) for r, c in zip(batch, cands)]
            rule, value, k = "topk", None, torch.tensor(counts, dtype=torch.long, device=self.device)
        start = torch.tensor(lo, dtype=torch.long, device=self.device)
        chosen = backends.unmask(conf_blk, tok_blk, k, start, x, rule, value)
        return chosen.sum(dim=1).tolist()

    def _candidate_logits(self, batch, cands, x, am, pool_name: str) -> torch.Tensor:
        """Final hidden states of the candidate positions (or of the position before, with right shift),
        computed as the cache mode says, through the LM head: logits [N, V]."""
        cfg = batch[0].config
        shift = cfg.right_shift_logits
        src = [[max(p - 1, 0) if shift else p for p in c] for c in cands]
        if cfg.cache == "none":
            hidden = self._forward(("full", pool_name), lambda a, b: self.model.forward(a, b), (x, am))
            bi = [i for i, s in enumerate(src) for _ in s]
            pi = [p for s in src for p in s]
            return self.model.lm_head(hidden[bi, pi])

        self._ensure_pools(cfg, x.shape[1])
        pool = self.pools[pool_name]
        refresh = [i for i, r in enumerate(batch) if r.at_block_start]
        partial = [i for i, r in enumerate(batch) if not r.at_block_start]
        rows: dict[int, torch.Tensor] = {}
        if refresh:
            idx = torch.tensor(refresh, device=self.device)
            slots = torch.tensor([self.slots[batch[i].id] for i in refresh], device=self.device)
            hidden = self._forward(("refresh", pool_name), lambda a, b, c: self.model.forward(a, b, pool, c),
                                   (x[idx], am[idx], slots))
            for j, i in enumerate(refresh):
                rows[i] = hidden[j, src[i]]
        if partial:
            spans = []
            for i in partial:
                lo, hi = batch[i].window
                lo = max(lo - 1, 0) if shift else lo
                spans.append((lo, hi if cfg.cache == "dual" else batch[i].length))
            Q = max(hi - lo for lo, hi in spans)
            trash = pool.positions
            pos_q = torch.full((len(partial), Q), trash, dtype=torch.long)
            for j, (lo, hi) in enumerate(spans):
                pos_q[j, : hi - lo] = torch.arange(lo, hi)
            pos_q = pos_q.to(self.device)
            idx = torch.tensor(partial, device=self.device)
            ids_q = torch.gather(x[idx], 1, pos_q.clamp(max=x.shape[1] - 1))
            slots = torch.tensor([self.slots[batch[i].id] for i in partial], device=self.device)
            hidden = self._forward(("partial", pool_name),
                                   lambda a, b, c, d: self.model.forward_partial(a, b, c, pool, d),
                                   (ids_q, pos_q, am[idx].bool(), slots))
            for j, i in enumerate(partial):
                lo = spans[j][0]
                rows[i] = hidden[j, [p - lo for p in src[i]]]
        return self.model.lm_head(torch.cat([rows[i] for i in range(len(batch))], dim=0))

    def _forward(self, name: tuple, fn, inputs: tuple):
        """fn(*inputs), replayed from a CUDA graph per (name, input shapes) when graphs are on."""
        if self.graphs is None:
            return fn(*inputs)
        key = name + tuple((tuple(t.shape), t.dtype) for t in inputs)
        return self.graphs.run(key, fn, inputs)

    def _stop_rule(self, cfg) -> StopRule | None:
        if not cfg.stop_strings:
            return None
        key = tuple(cfg.stop_strings)
        if key not in self._stop_rules:
            self._stop_rules[key] = StopRule(self.tok, cfg.stop_strings)
        return self._stop_rules[key]
