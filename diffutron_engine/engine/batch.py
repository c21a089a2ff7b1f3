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

import torch

from ..kernels.sampling import id_bitmap
from ..kernels.unmask import RULES
from .request import Request

# columns of DeviceBatch.ints
INT = ("length", "block", "step", "lo", "hi", "offset", "nsteps", "shift", "rule", "cfg", "random", "seed")
I = {name: i for i, name in enumerate(INT)}
# columns of DeviceBatch.floats
FLOAT = ("temperature", "penalty", "value", "cfg_mult")
F = {name: i for i, name in enumerate(FLOAT)}
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
        self.ints[d, I["length"]] = 1  # one valid key: attention over padding rows stays finite
        self.ints[d, I["nsteps"]] = 1
        self.floats[d] = 0
        self.floats[d, F["penalty"]] = 1.0

    def write(self, slot: int, req: Request) -> None:
        """Write a newly admitted request into `slot` (host-built rows, a few copies per admission)."""
        p = req.params
        n_blocks = len(req.blocks)
        sched_flat = [n for s in req.schedules for n in s] if req.schedules is not None else []
        self.ensure(req.length, n_blocks, max(len(sched_flat), 1))
        dev, L = self.device, req.length
        self.canvas[slot, :L] = torch.tensor(req.tokens, dtype=torch.long).to(dev)
        self.canvas[slot, L:] = self.eos_id
        given = torch.zeros(self.positions, dtype=torch.bool)
        given[req.given] = True
        self.given[slot] = given.to(dev)
        table = block_table(req)
        self.blocks[slot, :n_blocks] = torch.tensor(table, dtype=torch.long).to(dev)
        self.blocks[slot, n_blocks:] = 0
        if sched_flat:
            self.sched[slot, : len(sched_flat)] = torch.tensor(sched_flat, dtype=torch.long).to(dev)
        lo, hi, off, nsteps = table[0]
        rule = {"schedule": RULES["topk"], "threshold": RULES["threshold"], "factor": RULES["factor"]}[p.rule]
        ints = [0] * len(INT)
        for name, v in (("length", L), ("lo", lo), ("hi", hi), ("offset", off), ("nsteps", nsteps),
                        ("shift", int(p.right_shift_logits)), ("rule", rule), ("cfg", int(p.cfg_scale > 0)),
                        ("random", int(p.remasking == "random")), ("seed", req.seed)):
            ints[I[name]] = v
        self.ints[slot] = torch.tensor(ints, dtype=torch.long).to(dev)
        floats = [0.0] * len(FLOAT)
        floats[F["temperature"]] = p.temperature
        floats[F["penalty"]] = p.repetition_penalty
        floats[F["value"]] = p.threshold if p.threshold is not None else (p.factor or 0.0)
        # float32 of the double (cfg_scale + 1), as the oracle's Python-float multiplier becomes
        floats[F["cfg_mult"]] = p.cfg_scale + 1.0
        self.floats[slot] = torch.tensor(floats, dtype=torch.float32).to(dev)
        self.seen[slot] = self._seen_bitmap(req.tokens)
        self.suppress[slot] = id_bitmap(p.suppress_tokens or [], self.vocab).to(dev)
        self.begin[slot] = id_bitmap(p.begin_suppress_tokens or [], self.vocab).to(dev)

    def _seen_bitmap(self, tokens: list[int]) -> torch.Tensor:
        ids = set(tokens) - {self.mask_id, self.eos_id}
        return id_bitmap(sorted(ids), self.vocab).to(self.device)

    def sync(self, slot: int, req: Request) -> None:
        """After the host rewrote a request's canvas (Diffutron's stop rule): its canvas, seen ids and
        block progress again, from the host's state (which is then the authority)."""
        L = req.length
        self.canvas[slot, :L] = torch.tensor(req.tokens, dtype=torch.long).to(self.device)
        self.seen[slot] = self._seen_bitmap(req.tokens)
        row = block_table(req)[min(req.block, len(req.blocks) - 1)]
        state = torch.tensor([req.block, req.step, *row], dtype=torch.long)
        cols = [I[n] for n in ("block", "step", "lo", "hi", "offset", "nsteps")]
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
