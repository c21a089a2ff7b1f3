"""The model runner: owns every tensor (the device batch, the K/V pool, the CUDA graphs) and runs one
denoising step of the running batch: forward the rows that need it, the LM head on the block's
candidate positions only, sample, commit, advance each row's step and block counters.

The step itself (`_device_step`) is a fixed sequence of device ops whose shapes depend only on a
`StepShape`: the batch bucket, the block bucket, the length bucket, and for the K/V caches how many
rows refresh and how many reuse the cache. It reads nothing from the host and syncs nothing, so on
CUDA it is captured once per shape and replayed as one graph. Its only output is the commit record,
[rows, block] tokens committed this step (-1 elsewhere): one device-to-host copy of O(batch) bytes
after the step's work, from which the host (engine/request.py) mirrors what the device did.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from .. import backends
from ..kernels.sampling import SampleFlags, SamplingTensors
from ..model import KVPool, ModernBert
from .batch import BLOCK, FLOAT_COL, INT_COL, DeviceBatch
from .graphs import StepGraphs
from .request import Request


def bucket(n: int, per_octave: int, granularity: int = 1) -> int:
    """Smallest bucket >= n: `per_octave` evenly spaced values per power of two (at least
    `granularity` apart), so padding wastes at most 1/per_octave and the number of distinct values up
    to N grows with log N."""
    if n <= granularity:
        return granularity
    step = max(granularity, 1 << max(0, (n - 1).bit_length() - 1 - (per_octave.bit_length() - 1)))
    return -(-n // step) * step


def batch_bucket(n: int) -> int:
    return bucket(n, 4)


def length_bucket(n: int) -> int:
    return bucket(n, 8, 8)


def block_bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class StepShape:
    """Everything the shapes of a step's device work depend on (a CUDA graph's key)."""

    rows: int  # batch rows (a bucket of the running requests)
    cfg_rows: int  # unconditional copies of CFG rows (a bucket, 0 without CFG)
    block: int  # candidate positions per row (a power of two >= the widest block)
    candidates: int  # masked block positions of all rows, compacted for the LM head (a bucket; with
    # CUDA graphs rows * block, so that the count of shapes, and of captures, stays small)
    length: int  # canvas columns run through the model (a bucket of the longest request)
    refresh: int  # cache modes: rows whose block starts (full forward, K/V stored)
    partial: int  # cache modes: rows that reuse the cache (partial forward)
    queries: int  # cache modes: positions a partial forward recomputes
    flags: SampleFlags
    shift: bool  # some row uses right-shifted logits
    rule: str | None  # the commit rule when every row uses the same one ("topk", "threshold", "factor")
    trace: bool = False  # some row traces: the commit record carries the committed positions' confidences


def _select(flag: torch.Tensor, size: int, arange: torch.Tensor):
    """The first `size` rows where `flag` holds, in order, as indices [size] and validity [size] (the
    host knows `size` >= their count; no data-dependent shapes)."""
    rank = flag.long().cumsum(0) - 1
    dest = torch.where(flag & (rank < size), rank, size)  # entry `size` collects the others
    idx = torch.zeros(size + 1, dtype=torch.long, device=flag.device)
    idx.scatter_(0, dest, arange[: flag.shape[0]])
    return idx[:size], arange[:size] < flag.sum()


class ModelRunner:
    def __init__(self, model, tokenizer, max_batch: int, cache: str = "none", cuda_graphs: bool = False,
                 fused_head: bool = False):
        weight = model.get_input_embeddings().weight
        # every op's backend, chosen once (a forced backend applies to runners made while it is forced)
        self.ops = backends.Ops.select(weight.device, weight.dtype)
        self.model = ModernBert(model, ops=self.ops)
        # LM head and sampler as one kernel (ops.sample_head): the [N, V] logits are never stored. Only
        # where the ops have it (with the Triton sampler), and not for CFG rows (guidance mixes two rows'
        # logits).
        self.fused_head = fused_head and self.ops.fused_head
        self.mask_id, self.eos_id = tokenizer.mask_token_id, tokenizer.eos_token_id
        self.device = self.model.device
        self.cache = cache
        self.max_batch = max_batch
        self.max_rows = batch_bucket(max_batch)
        self.batch = DeviceBatch(max_batch, self.max_rows, self.model.vocab_size, self.mask_id, self.eos_id,
                                 self.device)
        self._free = list(range(max_batch))
        self.pool: KVPool | None = None
        self._pools_made = 0  # a new pool invalidates captured graphs
        self._uncond_pool = False  # the pool holds a second half of slots for CFG's unconditional rows
        self._arange = torch.arange(0)
        self._rec = torch.zeros(0, dtype=torch.int32)
        self._rec_host = None
        self._ensure_buffers(self.batch.positions, 32)
        names = ("block", "step") + BLOCK
        self._progress_cols = torch.tensor([INT_COL[n] for n in names], device=self.device)
        self._rows_key: tuple | None = None
        self._shape_cache: tuple | None = None
        self.graphs = StepGraphs() if cuda_graphs and self.device.type == "cuda" else None
        self._graph_version = None
        self.signatures: Counter = Counter()  # StepShapes run (tests and benchmarks read it)

    # ------------------------------------------------------------------ slots
    def admit(self, reqs: list[Request]) -> None:
        """Give newly running requests slots and write them there (one copy per tensor for all)."""
        for req in reqs:
            req.slot = heapq.heappop(self._free)
        db = self.batch
        n_blocks = max(len(r.blocks) for r in reqs)
        db.ensure(max(length_bucket(r.length) for r in reqs), n_blocks, 1)
        db.write([r.slot for r in reqs], reqs)
        if self.cache != "none" and not self._uncond_pool and any(r.params.cfg_scale > 0 for r in reqs):
            self._uncond_pool = True
            self.pool = self._new_pool(self.pool)

    def release(self, req: Request) -> None:
        if req.slot is not None:
            heapq.heappush(self._free, req.slot)
            req.slot = None

    def forget_batch(self) -> None:
        """After a failed step: drop what is cached about the running batch (its rows, its shape, the
        captured graphs, which a step that failed half-way through capture or replay may have left
        unusable); the next step rebuilds them from the requests that remain."""
        self._rows_key = None
        self._shape_cache = None
        if self.graphs is not None:
            self.graphs.clear()

    def sync(self, req: Request) -> None:
        """The host rewrote the request's canvas (stop rule): write its slot again."""
        self.batch.sync(req.slot, req)

    def _ensure_buffers(self, positions: int, block: int) -> None:
        """Constant tensors the step reads (made here, never inside the step) and the commit record."""
        n = max(positions + 1, self.max_rows * block, 2 * self.max_rows + 2)
        if self._arange.numel() < n:
            self._arange = torch.arange(n, device=self.device)
            self._zeros = torch.zeros(n, dtype=torch.long, device=self.device)
        if self._rec.numel() < self.max_rows * 2 * block:
            # flat, viewed by each step as [rows, planes, block] (_record): its first n rows are then one
            # contiguous run, copied to the host as it is. Plane 0: the token committed (or -1); plane 1,
            # when a row traces: the bits of the float32 confidence that ranked it
            self._rec = torch.full((self.max_rows * 2 * block,), -1, dtype=torch.int32, device=self.device)
            if self.device.type == "cuda":
                self._rec_host = torch.empty(self._rec.shape, dtype=torch.int32, pin_memory=True)

    def _new_pool(self, old: KVPool | None) -> KVPool:
        self._pools_made += 1
        slots = self.batch.slots * (2 if self._uncond_pool else 1)
        pool = self.model.new_pool(slots, self.batch.positions)
        if old is not None:  # keep what the rows already cached
            s, p = old.k[0].shape[0], old.positions
            for a, b in zip(pool.k + pool.v, old.k + old.v):
                a[:s, :, :p] = b[:, :, :p]
        return pool

    # ------------------------------------------------------------------ one step
    def shape(self, running: list[Request]) -> StepShape:
        """The step's shape, from the host's view of the running requests (no device reads)."""
        key = tuple(r.serial for r in running)  # the same requests in the same rows
        if self._shape_cache is None or self._shape_cache[0] != key:
            params = [r.params for r in running]
            flags = SampleFlags(sample=any(p.temperature > 0 for p in params),
                                penalty=any(p.repetition_penalty != 1.0 for p in params),
                                suppress=any(bool(p.suppress_tokens) for p in params),
                                begin=any(bool(p.begin_suppress_tokens) for p in params),
                                random=any(p.remasking == "random" for p in params))
            n_cfg = sum(p.cfg_scale > 0 for p in params)
            rules = {"schedule": "topk"}
            kinds = {rules.get(p.rule, p.rule) for p in params}
            base = dict(rows=batch_bucket(len(running)), cfg_rows=batch_bucket(n_cfg) if n_cfg else 0,
                        rule=kinds.pop() if len(kinds) == 1 else None,
                        block=block_bucket(max(max(hi - lo for lo, hi in r.blocks) for r in running)),
                        length=length_bucket(max(r.length for r in running)), flags=flags,
                        shift=any(p.right_shift_logits for p in params), trace=any(p.trace for p in params))
            self._shape_cache = (key, base)
        base = self._shape_cache[1]
        if self.graphs is None:
            candidates = batch_bucket(max(1, sum(r.masks_in_block for r in running)))
        else:  # replayed graphs: padding to the whole block keeps the number of shapes (captures) small
            candidates = base["rows"] * base["block"]
        refresh = partial = queries = 0
        if self.cache != "none":
            n_ref = n_par = 0
            longest = 0
            for r in running:
                copies = 2 if r.params.cfg_scale > 0 else 1
                if r.step == 0:
                    n_ref += copies
                else:
                    n_par += copies
                    if self.cache == "prefix":
                        lo = r.window[0] - int(r.params.right_shift_logits)
                        longest = max(longest, r.length - max(lo, 0))
            refresh = batch_bucket(n_ref) if n_ref else 0
            partial = batch_bucket(n_par) if n_par else 0
            if n_par:
                queries = base["block"] + int(base["shift"]) if self.cache == "dual" else length_bucket(longest)
        return StepShape(candidates=candidates, refresh=refresh, partial=partial, queries=queries, **base)

    def execute(self, running: list[Request]) -> np.ndarray:
        """Run one step of the running requests (in batch-row order); returns the commit record
        [len(running), planes, block]: plane 0 the token committed at block position j of row i (or -1);
        when a row traces, plane 1 the float32 bits of the confidence that ranked each commit."""
        sh = self.shape(running)
        key = tuple(r.slot for r in running)
        if key != self._rows_key:
            self.batch.set_rows(list(key))
            self._rows_key = key
        self._ensure_buffers(self.batch.positions, sh.block)
        if self.cache != "none" and (self.pool is None or self.pool.positions < self.batch.positions):
            self.pool = self._new_pool(self.pool)
        self.model.ensure_rope(self.batch.positions + 2)  # every position a step can ask for, incl. trash
        self.signatures[sh] += 1
        if self.graphs is not None:
            version = (self.batch.version, self._pools_made, self._rec.data_ptr(), self._arange.data_ptr(),
                       self.model.rope_version)
            if version != self._graph_version:  # tensors a captured graph points at were replaced
                self.graphs.clear()
                self._graph_version = version
            self.graphs.run(sh, lambda: self._device_step(sh))
        else:
            self._device_step(sh)
        n = len(running)
        rec = self._record(sh)[:n]
        if self.device.type == "cuda":
            host = self._rec_host[: rec.numel()].view(rec.shape)
            host.copy_(rec, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
            return host.numpy()
        return rec.numpy()

    def _record(self, sh: StepShape) -> torch.Tensor:
        """The step's commit record, [rows, planes, block]: a view of the front of the flat buffer."""
        planes = 2 if sh.trace else 1
        return self._rec[: sh.rows * planes * sh.block].view(sh.rows, planes, sh.block)

    @torch.no_grad()
    def _device_step(self, sh: StepShape) -> None:
        """Forward + LM head on the candidates + sample + commit + counters, for every row of the
        bucket (padding rows point at the dummy slot: no candidates, nothing changes)."""
        db, ar = self.batch, self._arange
        B, L = sh.rows, sh.block
        slots = db.rows[:B]
        active = slots != db.dummy
        # the rows' state, gathered once, one contiguous [B] row per field (a copy whatever B is, so the
        # op sequence does not depend on the shape)
        st = db.ints[slots].T.clone(memory_format=torch.contiguous_format)  # [len(INT), B]
        lo, hi, step = st[INT_COL["lo"]], st[INT_COL["hi"]], st[INT_COL["step"]]
        pos = lo[:, None] + ar[:L]  # [B, L] canvas positions of the block
        in_block = pos < hi[:, None]
        cols = torch.where(in_block, pos, db.positions)  # outside the block: the trash column
        valid = (db.canvas[slots[:, None], cols] == self.mask_id) & in_block

        # the candidates, compacted: the host knows their count (a bucket of it is the shape), so the
        # LM head and the sampler see only masked positions, never the block's committed ones
        N = sh.candidates
        cidx, cok = _select(valid.reshape(-1), N, ar)
        row, col = cidx // L, cidx % L
        cfg = None
        if sh.cfg_rows:  # the CFG rows, whose unconditional copies follow the B rows in the forward
            C = sh.cfg_rows
            cfg = _select(st[INT_COL["cfg"]] == 1, C, ar)
            # rank of each row among the CFG rows (C for the others): where its unconditional copy is
            rank = torch.full((B + 1,), C, dtype=torch.long, device=self.device).index_copy_(
                0, torch.where(cfg[1], cfg[0], B), ar[:C])[:B]
        hidden = self._candidate_hidden(sh, slots, active, pos, cfg)  # [B + C, L, H]
        h = hidden[row, col]  # [N, H]
        if sh.cfg_rows:
            h = torch.cat([h, hidden[B + rank[row].clamp(max=C - 1), col]])
        fused = self.fused_head and not sh.cfg_rows
        if not fused:
            logits = self.model.lm_head(h)  # [N (+ N), V]
            if sh.cfg_rows:
                logits = self._guide(logits, N, slots[row], rank[row] < C)

        rs = slots[row]  # the slot of each candidate
        f = sh.flags
        params = SamplingTensors(
            temperature=db.floats[rs, FLOAT_COL["temperature"]] if f.sample else 0.0,
            penalty=db.floats[rs, FLOAT_COL["penalty"]] if f.penalty else 1.0,
            seeds=db.ints[rs, INT_COL["seed"]], positions=pos.reshape(-1)[cidx], steps=db.ints[rs, INT_COL["step"]],
            streams=self._zeros[:N], seen=db.seen if f.penalty else None, row_request=rs,
            suppress=db.suppress if f.suppress else (), begin_suppress=db.begin if f.begin else (),
            random_confidence=db.ints[rs, INT_COL["random"]].bool() if f.random else False,
            valid=cok, flags=f)
        if fused:
            dec = self.model.decoder
            ids_c, conf_c = self.ops.sample_head(self.model.head_transform(h), dec.weight, dec.bias, params)
        else:
            ids_c, conf_c = self.ops.sample(logits, params)
        # back to [B, L]; padding candidates land on a trash entry
        dest = torch.where(cok, cidx, B * L)
        conf = torch.full((B * L + 1,), -torch.inf, device=self.device).index_copy_(0, dest, conf_c.float())
        ids = torch.zeros(B * L + 1, dtype=torch.long, device=self.device).index_copy_(0, dest, ids_c)
        conf, ids = conf[: B * L].view(B, L), ids[: B * L].view(B, L)

        k = db.sched[slots, (st[INT_COL["offset"]] + step).clamp(max=db.sched.shape[1] - 1)]
        rule = sh.rule if sh.rule is not None else st[INT_COL["rule"]]  # one rule for all rows: its name
        value = db.floats[slots, FLOAT_COL["value"]] if sh.rule != "topk" else None
        # the seen bits are read only by rows with a penalty, so they are kept while one runs
        chosen = self.ops.unmask(conf, ids, k, lo, db.canvas, rule, value, rows=slots,
                                 seen=db.seen if f.penalty else None, unseen=(self.mask_id, self.eos_id))
        rec = self._record(sh)
        rec[:, 0].copy_(torch.where(chosen, ids, -1))
        if sh.trace:
            rec[:, 1].copy_(torch.where(chosen, conf, torch.nan).view(torch.int32))

        # counters, as the host does them (engine/request.py): a block ends when it has no mask left
        # or its steps are spent; the next block's row of the table becomes current
        new_step = step + active.long()
        left = ((db.canvas[slots[:, None], cols] == self.mask_id) & in_block).sum(1)
        done = active & ((left == 0) | (new_step >= st[INT_COL["nsteps"]]))
        block = st[INT_COL["block"]] + done.long()
        nxt = db.blocks[slots, block.clamp(max=db.blocks.shape[1] - 1)]  # [B, 4]: lo, hi, offset, steps
        cur = torch.stack([lo, hi, st[INT_COL["offset"]], st[INT_COL["nsteps"]]], dim=1)
        progress = torch.cat([block[:, None], torch.where(done, 0, new_step)[:, None],
                              torch.where(done[:, None], nxt, cur)], dim=1)
        db.ints[slots[:, None], self._progress_cols] = progress

    # ------------------------------------------------------------------ forwards
    def _ids(self, rows, cols, uncond):
        """Canvas tokens [n, len] at `cols` of slots `rows`; for unconditional rows (uncond [n] bool, or
        None) the given positions are masked, as CFG's second pass sees them."""
        db = self.batch
        ids = db.canvas[rows[:, None], cols]
        if uncond is None:
            return ids
        given = db.given[rows[:, None], cols.clamp(max=db.positions - 1)] & uncond[:, None]
        return torch.where(given, self.mask_id, ids)

    def _candidate_hidden(self, sh: StepShape, slots, active, pos, cfg) -> torch.Tensor:
        """Final hidden states of each row's block positions (of the position before, with right
        shift), [B + C, L, H]: CFG rows' unconditional copies (given positions masked) follow the B
        rows. Computed as the cache mode says; rows at a block's first step refresh the cache."""
        db, ar, m = self.batch, self._arange, self.model
        B, C, L, T = sh.rows, sh.cfg_rows, sh.block, sh.length
        if C:
            cidx, cok = cfg
            ext = torch.cat([slots, slots[cidx]])  # [E]: the slot of each forward row
            uncond = ar[: B + C] >= B
            ok = torch.cat([active, cok])
            pos = torch.cat([pos, pos[cidx]])
        else:
            ext, uncond, ok = slots, None, active
        E, H = ext.shape[0], m.hidden
        shift = db.ints[ext, INT_COL["shift"]]
        src = pos - shift[:, None]  # where each candidate's logits come from
        cols = ar[:T]

        if self.cache == "none":
            h = m.forward(self._ids(ext, cols.expand(E, T), uncond), cols < db.ints[ext, INT_COL["length"]][:, None])
            return h.gather(1, src.clamp(0, T - 1)[:, :, None].expand(E, L, H))

        # K/V caches: rows at their block's first step run the whole canvas and store every layer's
        # keys/values in their pool slot; the others recompute only their queries and read the rest
        pool = self.pool
        pool_slot = torch.where(uncond, ext + db.slots, ext) if uncond is not None else ext
        out = torch.zeros(E + 1, L, H, dtype=m.dtype, device=self.device)  # row E: where padding goes
        step = db.ints[ext, INT_COL["step"]]
        if sh.refresh:
            idx, good = _select((step == 0) & ok, sh.refresh, ar)
            rows, n = ext[idx], idx.shape[0]
            unc = uncond[idx] if uncond is not None else None
            h = m.forward(self._ids(rows, cols.expand(n, T), unc), cols < db.ints[rows, INT_COL["length"]][:, None],
                          pool, torch.where(good, pool_slot[idx], db.dummy))
            cand = src[idx].clamp(0, T - 1)
            out.index_copy_(0, torch.where(good, idx, E), h.gather(1, cand[:, :, None].expand(n, L, H)))
        if sh.partial:
            Q = sh.queries
            idx, good = _select((step != 0) & ok, sh.partial, ar)
            rows, n = ext[idx], idx.shape[0]
            unc = uncond[idx] if uncond is not None else None
            start = (db.ints[rows, INT_COL["lo"]] - shift[idx]).clamp(min=0)
            qpos = start[:, None] + ar[:Q]
            end = db.ints[rows, INT_COL["hi"] if self.cache == "dual" else INT_COL["length"]]
            qok = qpos < end[:, None]
            ids = self._ids(rows, torch.where(qok, qpos, db.positions), unc)
            pos_q = torch.where(qok, qpos, pool.positions)  # padded queries write the trash position
            h = m.forward_partial(ids, pos_q, cols < db.ints[rows, INT_COL["length"]][:, None], pool,
                                  torch.where(good, pool_slot[idx], db.dummy))
            cand = (src[idx] - start[:, None]).clamp(0, Q - 1)
            out.index_copy_(0, torch.where(good, idx, E), h.gather(1, cand[:, :, None].expand(n, L, H)))
        return out[:E]

    def _guide(self, logits: torch.Tensor, n: int, slots, has_cfg) -> torch.Tensor:
        """Classifier-free guidance on candidates [n] (their unconditional logits follow them):
        uncond + (scale + 1) * (cond - uncond), rounded as the oracle's tensor arithmetic is; candidates
        of rows without CFG keep their logits."""
        cond, un = logits[:n], logits[n:]
        mult = self.batch.floats[slots, FLOAT_COL["cfg_mult"]][:, None]
        mixed = un + (mult * (cond - un)).to(logits.dtype)
        return torch.where(has_cfg[:, None], mixed, cond)
