"""One request's state, in plain Python: what the scheduler reads and the runner advances."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..config import SamplingConfig


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """A prompt to answer. `tokens` is the request's own canvas (prompt, then masks), kept in step with
    the runner's tensor; `windows` are the blocks [lo, hi) it fills, left to right."""

    id: int
    prompt_ids: list[int]
    config: SamplingConfig
    seed: int
    tokens: list[int]
    windows: list[tuple[int, int]]
    answer_start: int  # where the generated text begins (the prompt's length)
    status: Status = Status.WAITING
    block: int = 0
    step: int = 0  # steps taken in the current block
    schedule: list[int] | None = None  # commit counts of the current block (fixed-count rule)
    forward_passes: int = 0
    finish_reason: str | None = None
    started_at: float | None = None  # perf_counter when admitted to the running batch
    finished_at: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        """Wall time from admission to retirement."""
        if self.started_at is None or self.finished_at is None:
            return 0.0
        return self.finished_at - self.started_at

    @property
    def window(self) -> tuple[int, int]:
        return self.windows[self.block]

    @property
    def at_block_start(self) -> bool:
        return self.step == 0

    def masked_in_window(self, mask_id: int) -> int:
        lo, hi = self.window
        return sum(1 for t in self.tokens[lo:hi] if t == mask_id)

    def block_finished(self, mask_id: int) -> bool:
        """No mask left in the block, or its steps are spent: the schedule's (a model may predict the
        mask id itself, which commits nothing, as in the oracle), or, under the threshold/factor rules
        that commit at least one position per step, as many steps as the block is wide."""
        if self.masked_in_window(mask_id) == 0:
            return True
        if self.schedule is not None:
            return self.step >= len(self.schedule)
        lo, hi = self.window
        return self.step >= hi - lo

    def skip_complete_blocks(self, mask_id: int) -> None:
        """Move past finished blocks (the one just completed, and any later one with no mask)."""
        while self.block < len(self.windows) and self.block_finished(mask_id):
            self.block, self.step, self.schedule = self.block + 1, 0, None

    @property
    def done(self) -> bool:
        return self.block >= len(self.windows)

    @property
    def length(self) -> int:
        return len(self.tokens)
