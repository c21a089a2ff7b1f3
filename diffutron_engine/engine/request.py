"""One request's state on the host, in plain Python: what the scheduler reads and each step's commits
update. The device holds the same request in a slot (engine/batch.py); the two advance by the same
rules (a block ends when it has no mask left or its steps are spent), the host from the commits that
each step reports, the device from its own canvas."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from ..config import SamplingParams
from ..stopping import StopRule
from .text import AnswerState


class Status(enum.Enum):
    NEW = "new"  # built, in the engine's inbox, not yet queued
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """A prompt to answer (or a sequence to infill). `tokens` is the request's canvas (prompt, then
    masks), kept in step with its device slot; `blocks` are the windows [lo, hi) it fills, left to
    right (only windows that hold masks); `schedules[b]` the commit count of each step of block b
    (None under the threshold/factor rules: as many steps as the block is wide, at most)."""

    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    tokens: list[int]
    blocks: list[tuple[int, int]]
    schedules: list[list[int]] | None
    answer_start: int  # where the generated text begins (the prompt's length; 0 for infill)
    given: list[int]  # positions CFG's unconditional pass masks
    answer: AnswerState
    stop: StopRule | None = None
    early_stop: bool = True  # the params' early_stop, never for infill (its "answer" is the whole sequence)
    serial: int = 0  # unique for the engine's lifetime (request ids may be reused once finished)
    arrival: int = 0  # admission order among equals
    status: Status = Status.NEW
    block: int = 0
    step: int = 0  # steps taken in the current block
    masks_in_block: int = 0
    masks_left: int = 0  # masks anywhere in the answer
    forward_passes: int = 0
    finish_reason: str | None = None
    slot: int | None = None
    stop_checked: bool = False  # after the first full stop-string search, searches are incremental
    added_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    finished_at: float | None = None

    def __post_init__(self):
        mask = self.answer.mask_id
        self.masks_left = sum(1 for t in self.tokens[self.answer_start:] if t == mask)
        self.masks_in_block = self._count_masks()

    # ------------------------------------------------------------------ blocks
    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def window(self) -> tuple[int, int]:
        return self.blocks[self.block]

    @property
    def done(self) -> bool:
        return self.block >= len(self.blocks)

    def block_steps(self, b: int) -> int:
        """Most steps block b takes: its schedule's length, or its width (threshold/factor rules commit
        at least one position per step)."""
        if self.schedules is not None:
            return len(self.schedules[b])
        lo, hi = self.blocks[b]
        return hi - lo

    def _count_masks(self) -> int:
        if self.done:
            return 0
        lo, hi = self.window
        mask = self.answer.mask_id
        return sum(1 for t in self.tokens[lo:hi] if t == mask)

    # ------------------------------------------------------------------ one step's commits
    def apply(self, commits: list[tuple[int, int]]) -> bool:
        """Take one step's commits (canvas position, token); returns True when the stop rule rewrote
        the canvas (the device slot must be written again)."""
        mask = self.answer.mask_id
        for pos, tok in commits:
            self.tokens[pos] = tok
            if tok != mask:
                self.masks_in_block -= 1
                self.masks_left -= 1
        self.step += 1
        self.forward_passes += 1
        rewritten = False
        if self.stop is not None:
            rewritten = self._apply_stop([p for p, _ in commits])
        self.answer.advance(self.tokens)
        if self.masks_in_block == 0 or self.step >= self.block_steps(self.block):
            self.block, self.step = self.block + 1, 0
            self.masks_in_block = self._count_masks()
            if not self.done and self.masks_in_block == 0:
                # only reachable after the stop rule padded the rest of the row: nothing left to fill
                self.block = len(self.blocks)
        return rewritten

    def _apply_stop(self, new_positions: list[int]) -> bool:
        """Diffutron's stop rule: after the first step a full search (an infill row's given text may
        hold a stop string), then only around the new tokens, until a cut (the replacement text could
        hold one again)."""
        if self.stop_checked:
            pos = self.stop.find_new(self.tokens, self.answer_start, sorted(new_positions))
        else:
            pos = self.stop.find(self.tokens, self.answer_start)
        self.stop_checked = pos is None
        if pos is None:
            return False
        rep = self.stop.replacement
        end = min(pos + len(rep), self.length)
        self.tokens[pos:end] = rep[: end - pos]
        self.tokens[end:] = [self.stop.pad_id] * (self.length - end)
        mask = self.answer.mask_id
        self.masks_left = sum(1 for t in self.tokens[self.answer_start:] if t == mask)
        self.masks_in_block = self._count_masks()
        if self.answer.frontier > pos:  # the settled text changed under the frontier: settle again
            sent = self.answer.sent
            self.answer = AnswerState(self.answer.tok, self.tokens, self.answer_start, mask, self.answer.holdback)
            self.answer.sent = sent
        return True

    def finish(self, reason: str) -> None:
        self.status, self.finish_reason, self.finished_at = Status.FINISHED, reason, time.perf_counter()

    @property
    def seconds(self) -> float:
        """Wall time from admission to the running batch to retirement."""
        if self.started_at is None or self.finished_at is None:
            return 0.0
        return self.finished_at - self.started_at
