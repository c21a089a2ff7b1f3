"""The running batch on the device: per slot, preallocated, every tensor a step reads or updates.

A request occupies one slot from admission to retirement. Admission writes the slot once (canvas,
length, CFG's given positions, its blocks and commit schedules, sampling parameters, the penalty's
seen-id bitmap, the suppression bitmaps); a step reads the slots of its rows through `rows` (batch row
-> slot) and updates them in place (commits, seen bits, step and block counters) with a fixed number of
device ops, so it needs nothing from the host and can be replayed from a CUDA graph. Slot `dummy` is
never given to a request: padding rows of a batch bucket point at it (no block, no candidates).

Per-slot integers live in one [S, len(INT)] tensor and floats in one [S, len(FLOAT)] tensor, so a
step gathers all of a row's state with one op. Capacities (canvas positions, blocks, schedule entries)
grow when a longer request is admitted; `version` then changes, which invalidates captured graphs.
"""

from __future__ import annotations

import numpy as np
import torch

from ..kernels.sampling import id_bitmap
from ..kernels.unmask import RULES
from .request import Request

# columns of DeviceBatch.ints
INT = ("length", "block", "step", "lo", "hi", "offset", "nsteps", "shift", "rule", "cfg", "random", "seed")
INT_COL = {name: i for i, name in enumerate(INT)}
# columns of DeviceBatch.floats
FLOAT = ("temperature", "penalty", "value", "cfg_mult")
FLOAT_COL = {name: i for i, name in enumerate(FLOAT)}
# columns of DeviceBatch.blocks
BLOCK = ("lo", "hi", "offset", "nsteps")


def _grow(n: int, have: int) -> int:
    return max(n, 2 * have)


class DeviceBatch:
    def __init__(self, max_batch: int, rows: int, vocab: int, mask_id: int, eos_id: int, device, positions: int = 256):
        self.device = torch.device(device)
        self.slots = max_batch + 1
        self.dummy = max_batch
        self.vocab = vocab
        self.words = (vocab + 31) // 32
        self.mask_id, self.eos_id = mask_id, eos_id
        self.version = 0
        S, dev = self.slots, self.device
        self.ints = torch.zeros(S, len(INT), dtype=torch.long, device=dev)
        self.floats = torch.zeros(S, len(FLOAT), dtype=torch.float32, device=dev)
        self.seen = torch.zeros(S, self.words, dtype=torch.int32, device=dev)
        self.suppress = torch.zeros(S, self.words, dtype=torch.int32, device=dev)
        self.begin = torch.zeros(S, self.words, dtype=torch.int32, device=dev)
        self.rows = torch.full((rows,), self.dummy, dtype=torch.long, device=dev)  # batch row -> slot
        self.positions = 0
        self.canvas = self.given = self.blocks = self.sched = None
        self._alloc(positions, 8, 64)
        self._write_dummy()

    # ------------------------------------------------------------------ capacity
    def _alloc(self, positions: int, n_blocks: int, n_sched: int) -> None:
        """(Re)allocate the growable tensors, keeping what they hold. The canvas has one extra column:
        the trash position that padded candidate columns point at."""
        S, dev = self.slots, self.device
        canvas = torch.full((S, positions + 1), self.eos_id, dtype=torch.long, device=dev)
        given = torch.zeros(S, positions, dtype=torch.bool, device=dev)
        blocks = torch.zeros(S, n_blocks, len(BLOCK), dtype=torch.long, device=dev)
        sched = torch.zeros(S, n_sched, dtype=torch.long, device=dev)
        if self.canvas is not None:
            p = self.positions
            canvas[:, :p] = self.canvas[:, :p]
            given[:, :p] = self.given
            blocks[:, : self.blocks.shape[1]] = self.blocks
            sched[:, : self.sched.shape[1]] = self.sched
        self.canvas, self.given, self.blocks, self.sched = canvas, given, blocks, sched
        self.positions = positions
        self.version += 1

    def ensure(self, positions: int, n_blocks: int, n_sched: int) -> None:
        """Room for a request of `positions` canvas positions, `n_blocks` blocks and `n_sched`
        schedule entries (capacities double when they grow)."""
        P, NB, G = self.positions, self.blocks.shape[1], self.sched.shape[1]
        if positions <= P and n_blocks <= NB and n_sched <= G:
            return
        self._alloc(_grow(positions, P) if positions > P else P, _grow(n_blocks, NB) if n_blocks > NB else NB,
                    _grow(n_sched, G) if n_sched > G else G)

    # ------------------------------------------------------------------ admission
    def _write_dummy(self) -> None:
        d = self.dummy
        self.ints[d] = 0
        self.ints[d, INT_COL["length"]] = 1  # one valid key: attention over padding rows stays finite
        self.ints[d, INT_COL["nsteps"]] = 1
        self.floats[d] = 0
        self.floats[d, FLOAT_COL["penalty"]] = 1.0

    def write(self, slots: list[int], reqs: list[Request]) -> None:
        """Write newly admitted requests into their slots: rows built on the host, then one copy per
        tensor for all of them."""
        n_sched = [sum(len(x) for x in r.schedules) if r.schedules is not None else 0 for r in reqs]
        self.ensure(max(r.length for r in reqs), max(len(r.blocks) for r in reqs), max(max(n_sched), 1))
        k, P, dev = len(reqs), self.positions, self.device
        canvas = np.full((k, P + 1), self.eos_id, dtype=np.int64)
        given = np.zeros((k, P), dtype=np.bool_)
        blocks = np.zeros((k,) + tuple(self.blocks.shape[1:]), dtype=np.int64)
        sched = np.zeros((k, self.sched.shape[1]), dtype=np.int64)
        ints = np.zeros((k, len(INT)), dtype=np.int64)
        floats = np.zeros((k, len(FLOAT)), dtype=np.float32)
        seen = np.zeros((k, self.words), dtype=np.int32)
        suppress = np.zeros((k, self.words), dtype=np.int32)
        begin = np.zeros((k, self.words), dtype=np.int32)
        for i, req in enumerate(reqs):
            p, L = req.params, req.length
            canvas[i, :L] = req.tokens
            given[i, req.given] = True
            table = block_table(req)
            blocks[i, : len(table)] = table
            if req.schedules is not None:
                sched[i, : n_sched[i]] = [n for x in req.schedules for n in x]
            lo, hi, off, nsteps = table[0]
            rule = {"schedule": RULES["topk"], "threshold": RULES["threshold"], "factor": RULES["factor"]}[p.rule]
            for name, v in (("length", L), ("lo", lo), ("hi", hi), ("offset", off), ("nsteps", nsteps),
                            ("shift", int(p.right_shift_logits)), ("rule", rule), ("cfg", int(p.cfg_scale > 0)),
                            ("random", int(p.remasking == "random")), ("seed", req.seed)):
                ints[i, INT_COL[name]] = v
            floats[i, FLOAT_COL["temperature"]] = p.temperature
            floats[i, FLOAT_COL["penalty"]] = p.repetition_penalty
            floats[i, FLOAT_COL["value"]] = p.threshold if p.threshold is not None else (p.factor or 0.0)
            # float32 of the double (cfg_scale + 1), as the oracle's Python-float multiplier becomes
            floats[i, FLOAT_COL["cfg_mult"]] = p.cfg_scale + 1.0
            seen[i] = self._seen_bitmap(req.tokens)
            if p.suppress_tokens:
                suppress[i] = id_bitmap(p.suppress_tokens, self.vocab).numpy()
            if p.begin_suppress_tokens:
                begin[i] = id_bitmap(p.begin_suppress_tokens, self.vocab).numpy()
        idx = torch.tensor(slots, dtype=torch.long, device=dev)
        for dst, src in ((self.canvas, canvas), (self.given, given), (self.blocks, blocks), (self.sched, sched),
                         (self.ints, ints), (self.floats, floats), (self.seen, seen), (self.suppress, suppress),
                         (self.begin, begin)):
            dst[idx] = torch.from_numpy(src).to(dev)

    def _seen_bitmap(self, tokens: list[int]) -> np.ndarray:
        """The repetition penalty's ids: those on the canvas, minus the mask and EOS ids."""
        ids = set(tokens) - {self.mask_id, self.eos_id}
        return id_bitmap(sorted(ids), self.vocab).numpy()

    def sync(self, slot: int, req: Request) -> None:
        """After the host rewrote a request's canvas (Diffutron's stop rule): its canvas, seen ids and
        block progress again, from the host's state (which is then the authority)."""
        L = req.length
        self.canvas[slot, :L] = torch.tensor(req.tokens, dtype=torch.long).to(self.device)
        self.seen[slot] = torch.from_numpy(self._seen_bitmap(req.tokens)).to(self.device)
        row = block_table(req)[min(req.block, len(req.blocks) - 1)]
        state = torch.tensor([req.block, req.step, *row], dtype=torch.long)
        cols = [INT_COL[n] for n in ("block", "step", "lo", "hi", "offset", "nsteps")]
        self.ints[slot, cols] = state.to(self.device)

    def set_rows(self, slots: list[int]) -> None:
        """Batch rows -> slots for the next steps (padding rows -> the dummy slot); one copy, made
        only when the running batch changed."""
        rows = torch.full((self.rows.shape[0],), self.dummy, dtype=torch.long)
        rows[: len(slots)] = torch.tensor(slots, dtype=torch.long)
        self.rows.copy_(rows.to(self.device))


def block_table(req: Request) -> list[tuple[int, int, int, int]]:
    """(lo, hi, offset of its schedule in the request's flat schedule, steps) per block."""
    table, offset = [], 0
    for b, (lo, hi) in enumerate(req.blocks):
        steps = req.block_steps(b)
        table.append((lo, hi, offset, steps))
        offset += steps if req.schedules is not None else 0
    return table
