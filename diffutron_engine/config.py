"""Sampling configuration: the knobs of the reference sampler (same names as dllm's MDLM sampler) and
Diffutron's published presets."""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field

from .errors import DiffutronError

REMASKING = ("low_confidence", "random")

# Stop strings of Diffutron's own generation code (see the spec's stop rule).
DIFFUTRON_STOP_STRINGS = ("|USER|>", "<|USER|>", "<s>", "</s>")


def _check_int(name: str, value, *, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)  # ints, numpy and torch integer scalars
    except TypeError:
        raise DiffutronError(f"{name} must be an integer, got {value!r}") from None
    if value < minimum:
        raise DiffutronError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_ids(name: str, value) -> list[int] | None:
    if value is None:
        return None
    ids = list(value)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise DiffutronError(f"{name} must be a list of non-negative token ids, got {value!r}")
    return ids


@dataclass
class SamplerConfig:
    """The reference sampler's knobs; defaults are those of dllm's MDLM sampler.

    `max_new_tokens` falsy (0 or None) means "use max_length - longest prompt", as in dllm.
    `block_size=None` is allowed only for `infill` (one block over the whole canvas).
    """

    max_new_tokens: int | None = 128
    max_length: int | None = None
    block_size: int | None = 128
    steps: int = 128
    temperature: float = 0.0
    remasking: str = "low_confidence"
    stochastic_transfer: bool = False
    cfg_scale: float = 0.0
    cfg_keep_tokens: list[int] | None = None
    suppress_tokens: list[int] | None = None
    begin_suppress_tokens: list[int] | None = None
    right_shift_logits: bool = False
    return_dict: bool = False
    repetition_penalty: float = 1.0
    stop_strings: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        self.max_new_tokens = _check_int("max_new_tokens", self.max_new_tokens, minimum=0, allow_none=True)
        self.max_length = _check_int("max_length", self.max_length, minimum=1, allow_none=True)
        if not self.max_new_tokens and self.max_length is None:
            raise DiffutronError("max_new_tokens must be >= 1 (or give max_length instead)")
        self.block_size = _check_int("block_size", self.block_size, minimum=1, allow_none=True)
        self.steps = _check_int("steps", self.steps, minimum=1)
        for name in ("temperature", "cfg_scale", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise DiffutronError(f"{name} must be a finite number, got {v!r}")
            setattr(self, name, float(v))
        if self.temperature < 0:
            raise DiffutronError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.cfg_scale < 0:
            raise DiffutronError(f"cfg_scale must be >= 0 (0 = off), got {self.cfg_scale}")
        if self.repetition_penalty <= 0:
            raise DiffutronError(
                f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}"
            )
        if self.remasking not in REMASKING:
            raise DiffutronError(
                f"unknown remasking {self.remasking!r}; choose one of: {', '.join(REMASKING)}"
            )
        self.cfg_keep_tokens = _check_ids("cfg_keep_tokens", self.cfg_keep_tokens)
        self.suppress_tokens = _check_ids("suppress_tokens", self.suppress_tokens)
        self.begin_suppress_tokens = _check_ids("begin_suppress_tokens", self.begin_suppress_tokens)
        if self.stop_strings is not None:
            if isinstance(self.stop_strings, str):
                self.stop_strings = [self.stop_strings]
            self.stop_strings = list(self.stop_strings)
            if not all(isinstance(s, str) and s for s in self.stop_strings):
                raise DiffutronError("stop_strings must be non-empty strings")
        self.stochastic_transfer = bool(self.stochastic_transfer)
        self.right_shift_logits = bool(self.right_shift_logits)
        self.return_dict = bool(self.return_dict)

    def override(self, **kwargs) -> "SamplerConfig":
        """A validated copy with some fields replaced (the `sample(..., **kwargs)` contract)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise DiffutronError(
                f"unknown sampler option(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        return dataclasses.replace(self, **kwargs)


# The two settings published with Diffutron-Instruct (spec: "Generation settings").
PRESETS: dict[str, dict] = {
    "diffutron-long": dict(steps=128, temperature=0.1, block_size=32, repetition_penalty=1.2),
    "diffutron-short": dict(
        steps=64, remasking="low_confidence", stochastic_transfer=False, cfg_scale=0.0
    ),
}


CACHE_MODES = ("none", "prefix", "dual")


@dataclass
class SamplingConfig(SamplerConfig):
    """The engine's config: the oracle's knobs plus the engine's own.

    Exact mode is `cache="none"` with no threshold/factor: the oracle's tokens (greedy) or its
    distribution (sampling). The other settings are faster approximations (see the spec's last section).

    - cache: "none" (whole canvas every step), "prefix" (K/V left of the current block computed at the
      block's first step and reused for its other steps), "dual" (the masked suffix right of the block
      is cached too: only the block's positions pass through the layers).
    - threshold: commit every masked position of the block with confidence >= threshold (at least the
      most confident one) instead of the schedule's count.
    - factor: commit the n most confident positions for the largest n with (n + 1) * (1 - c_n) < factor,
      c_n the n-th highest confidence (at least one).
    - early_stop: a row whose answer has ended takes no more forward passes (its text is unchanged).
    - seed: request i draws from its own generator seeded with seed + i, so a request's text does not
      depend on the other requests in its batch; None draws the seed from torch's global generator.
    """

    cache: str = "none"
    threshold: float | None = None
    factor: float | None = None
    early_stop: bool = True
    seed: int | None = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cache not in CACHE_MODES:
            raise DiffutronError(f"unknown cache {self.cache!r}; choose one of: {', '.join(CACHE_MODES)}")
        if self.threshold is not None and self.factor is not None:
            raise DiffutronError("give either threshold or factor, not both")
        if self.threshold is not None and not (0.0 < float(self.threshold) <= 1.0):
            raise DiffutronError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.factor is not None and not float(self.factor) > 0.0:
            raise DiffutronError(f"factor must be > 0, got {self.factor}")
        self.seed = _check_int("seed", self.seed, minimum=0, allow_none=True)
        self.early_stop = bool(self.early_stop)

    @property
    def exact(self) -> bool:
        return self.cache == "none" and self.threshold is None and self.factor is None


# The engine's fast preset: the best measured combination of the fast knobs (see bench/results).
FAST_PRESET: dict = dict(cache="dual", threshold=0.9)
