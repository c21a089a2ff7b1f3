"""The parameters, declared and validated once, without torch (the command line checks them before it
imports torch): dllm's sampler knobs (SamplingKnobs), the oracle's ReferenceParams and a request's
SamplingParams that extend them, the engine's EngineConfig, presets spanning both sides (FAST), the
seed rule, and the names of the kernel backends."""

from __future__ import annotations

import dataclasses
import math
import operator
import os
from dataclasses import dataclass, field

from .errors import DiffutronError, check_utf8

REMASKING = ("low_confidence", "random")

# Stop strings of Diffutron's own generation code (docs/sampling.md, the stop rule).
DIFFUTRON_STOP_STRINGS = ("|USER|>", "<|USER|>", "<s>", "</s>")

# Upper bounds of two knobs, refused beyond (README, "Using it"):
# - steps: a block's commit schedule emulates dllm's float32 arithmetic one step at a time in Python, so
#   building it costs time in proportion to the steps (100 million: minutes). Steps that commit
#   nothing are dropped, so a request never takes more forward passes than it has tokens to fill, and no
#   Diffutron or mmBERT model holds more than 8,192 positions: 2**14 leaves room and builds in ~0.1 s.
# - temperature: the oracle draws Gumbel-max as exp(logit) / (-log u)^temperature in float64, and
#   (-log u) reaches ~37 for the smallest u, so the power overflows to inf above a temperature of ~190
#   and every id ties; at 100 the draw is already close to uniform over the vocabulary.
MAX_STEPS = 2**14
MAX_TEMPERATURE = 100.0

# The engine computes the float knobs in float32 on the device: a value float64 holds but float32 does
# not (1e308 becomes inf, 1e-320 becomes 0 and a penalty of 0 divides by zero) is refused by name
# instead of turning into inf or NaN inside a step.
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32; devices flush smaller ones to 0

# Kernel backends (diffutron_engine.backends); the names live here, without torch, so that the command
# line refuses a bad DIFFUTRON_BACKEND before it imports torch or loads a model.
BACKENDS = ("triton", "cpp", "torch")


def seed_for(seed: int, index: int) -> int:
    """The seed of prompt (or choice) `index` of a call given one seed: (seed + index) mod 2**63, so the
    largest seed wraps to 0 and a request's draws depend only on its own seed, never on the batch."""
    return (seed + index) % 2**63


def check_backend_env() -> str | None:
    """DIFFUTRON_BACKEND when it names a backend, None when unset or empty, else a DiffutronError."""
    name = os.environ.get("DIFFUTRON_BACKEND") or None
    if name is not None and name not in BACKENDS:
        hint = f" (names are lower case: {name.lower()!r})" if name.lower() in BACKENDS else ""
        raise DiffutronError(f"DIFFUTRON_BACKEND={name!r} is not one of {', '.join(BACKENDS)}{hint}; "
                             "set one of them or unset it for the automatic choice")
    return name


def _check_int(name: str, value, *, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    try:
        if isinstance(value, bool):
            raise TypeError
        value = operator.index(value)  # ints, numpy and torch integer scalars
    except TypeError:
        raise DiffutronError(f"{name} must be an integer, got {value!r:.80}") from None
    if value < minimum:
        raise DiffutronError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_float(name: str, value, *, allow_none: bool = False) -> float | None:
    """A finite real number that float32 represents (zero, or magnitude in [FLOAT32_TINY, FLOAT32_MAX])."""
    if value is None and allow_none:
        return None
    try:
        number = None if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)
    except OverflowError:  # an int beyond float64
        number = math.inf
    if number is None or not math.isfinite(number):
        raise DiffutronError(f"{name} must be a finite number{' or None' if allow_none else ''}, got {value!r:.80}")
    value = number
    if value != 0.0 and not FLOAT32_TINY <= abs(value) <= FLOAT32_MAX:
        raise DiffutronError(f"{name}={value:g} is outside float32's range, in which the engine computes it "
                             f"(nonzero magnitudes from {FLOAT32_TINY:.3g} to {FLOAT32_MAX:.3g})")
    return value


def _check_bool(name: str, value) -> bool:
    """True or False (numpy's booleans too); never bool(x) of a string, where "no" would read as True."""
    if value is True or value is False:
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool"):
        return bool(value)
    raise DiffutronError(f"{name} must be true or false, got {value!r}")


def _check_ids(name: str, value) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
        raise DiffutronError(f"{name} must be a list of non-negative token ids, got {value!r:.80}")
    ids = list(value)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, int) or i < 0:
            raise DiffutronError(f"{name} must be a list of non-negative token ids, got {value!r}")
    return ids


def _override(obj, kwargs: dict, what: str):
    """A validated copy of dataclass `obj` with the fields in kwargs replaced; unknown names refused."""
    names = {f.name for f in dataclasses.fields(obj)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise DiffutronError(f"unknown {what}(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
    return dataclasses.replace(obj, **kwargs)


@dataclass(kw_only=True)  # by name only: a positional value would land on another knob
class SamplingKnobs:
    """The knobs of dllm's MDLM sampler (same names, defaults and meaning), declared and validated once:
    the oracle's ReferenceParams and a request's SamplingParams both extend it (docs/sampling.md).

    `block_size=None` is allowed only for infill (one block over the whole canvas).
    """

    max_new_tokens: int | None = 128
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
    repetition_penalty: float = 1.0
    stop_strings: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        self.block_size = _check_int("block_size", self.block_size, minimum=1, allow_none=True)
        self.steps = _check_int("steps", self.steps, minimum=1)
        if self.steps > MAX_STEPS:
            raise DiffutronError(
                f"steps must be <= {MAX_STEPS:,}, got {self.steps:,}: a request takes at most one step per "
                f"token it fills, and the schedule is built step by step; give at most {MAX_STEPS:,}"
            )
        t = self.temperature  # its own bound first: it names the reason better than float32's range
        if isinstance(t, (int, float)) and not isinstance(t, bool) and t > MAX_TEMPERATURE:
            shown = f"{t:g}" if isinstance(t, float) or t < 10**300 else f"{str(t)[:12]}... ({len(str(t))} digits)"
            raise DiffutronError(
                f"temperature must be <= {MAX_TEMPERATURE:g}, got {shown}: beyond it the Gumbel-max "
                "draw overflows in float64 (and at 100 it is already nearly uniform over the vocabulary)"
            )
        for name in ("temperature", "cfg_scale", "repetition_penalty"):
            setattr(self, name, _check_float(name, getattr(self, name)))
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
            # a list or tuple only: list() of a dict would take its keys as the stop strings
            if not isinstance(self.stop_strings, (list, tuple)) or not all(isinstance(s, str) and s
                                                                         for s in self.stop_strings):
                raise DiffutronError(f"stop_strings must be a non-empty string or a list of them, "
                                     f"got {self.stop_strings!r:.80}")
            self.stop_strings = list(self.stop_strings)
            for i, s in enumerate(self.stop_strings):
                check_utf8(s, f"stop string {i + 1}")
        for name in ("stochastic_transfer", "right_shift_logits"):
            setattr(self, name, _check_bool(name, getattr(self, name)))

    _WHAT = "sampling parameter"  # for the message naming an unknown field

    def override(self, **kwargs):
        """A validated copy with some fields replaced; unknown names are refused."""
        return _override(self, kwargs, self._WHAT)

    def knobs(self) -> dict:
        """The shared knobs' values (to carry them from one side's type to the other's)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingKnobs)}


@dataclass(kw_only=True)
class ReferenceParams(SamplingKnobs):
    """The oracle's parameters (diffutron_engine.reference): dllm's MDLM sampler config, its defaults.

    `max_new_tokens` falsy (0 or None) means "use max_length - longest prompt", as in dllm.
    """

    max_length: int | None = None
    return_dict: bool = False
    _WHAT = "sampler option"

    def __post_init__(self) -> None:
        self.max_new_tokens = _check_int("max_new_tokens", self.max_new_tokens, minimum=0, allow_none=True)
        self.max_length = _check_int("max_length", self.max_length, minimum=1, allow_none=True)
        if not self.max_new_tokens and self.max_length is None:
            raise DiffutronError("max_new_tokens must be >= 1 (or give max_length instead)")
        super().__post_init__()
        self.return_dict = _check_bool("return_dict", self.return_dict)


# The two settings published with Diffutron-Instruct (docs/sampling.md, "Published settings").
PRESETS: dict[str, dict] = {
    "diffutron-long": dict(steps=128, temperature=0.1, block_size=32, repetition_penalty=1.2),
    "diffutron-short": dict(
        steps=64, remasking="low_confidence", stochastic_transfer=False, cfg_scale=0.0
    ),
}


@dataclass(kw_only=True)
class SamplingParams(SamplingKnobs):
    """One request's sampling parameters (the engine's): the shared knobs plus the engine's own.

    Every request carries its own SamplingParams and any mix of them runs in one batch. The decode
    choices that change how the model is run (the cache, graphs, dtype) are the engine's (EngineConfig).

    - the shared knobs (SamplingKnobs): dllm's names, defaults and meaning (see docs/sampling.md);
      max_new_tokens must be >= 1 here (no max_length: a request's length is its own).
    - seed: the key of the request's random stream (Philox counters, see docs/sampling.md), so its
      text does not depend on the other requests in the batch. None draws one from torch's global
      generator when the request is added (so torch.manual_seed applies). `Engine.generate(prompts,
      params)` with one SamplingParams gives prompt i the seed seed_for(seed, i).
    - threshold: commit every masked position of the block with confidence >= threshold (at least the
      most confident one) instead of the schedule's count.
    - factor: commit the n most confident positions for the largest n with (n + 1) * (1 - c_n) < factor,
      c_n the n-th highest confidence (at least one).
    - early_stop: a request whose answer has ended takes no more forward passes (its text is unchanged).
    - trace: every output of a step that ran the request carries that step's StepTrace (positions
      committed, their tokens and the confidence the commit rule ranked, the block worked; the canvas
      before the first step and after any rewrite), enough to redraw its canvas at every step; an abort
      or error reported without a step has none. Off: nothing is computed for it; on: one more plane in
      the step's single device-to-host copy. The tokens are the same either way.

    Exact mode (the oracle's tokens when greedy, its distribution when sampling) is no threshold, no
    factor, on an engine built with cache="none".
    """

    seed: int | None = None
    threshold: float | None = None
    factor: float | None = None
    early_stop: bool = True
    trace: bool = False

    def __post_init__(self) -> None:
        self.max_new_tokens = _check_int("max_new_tokens", self.max_new_tokens, minimum=1)
        super().__post_init__()
        for name in ("threshold", "factor"):
            setattr(self, name, _check_float(name, getattr(self, name), allow_none=True))
        if self.threshold is not None and self.factor is not None:
            raise DiffutronError("give either threshold or factor, not both")
        if self.threshold is not None and not (0.0 < float(self.threshold) <= 1.0):
            raise DiffutronError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.factor is not None and not float(self.factor) > 0.0:
            raise DiffutronError(f"factor must be > 0, got {self.factor}")
        self.seed = _check_int("seed", self.seed, minimum=0, allow_none=True)
        if self.seed is not None and self.seed >= 2**63:
            raise DiffutronError(f"seed must be < 2**63, got {self.seed}")
        self.early_stop = _check_bool("early_stop", self.early_stop)
        self.trace = _check_bool("trace", self.trace)

    @property
    def rule(self) -> str:
        """How many positions a step commits: "schedule" (the oracle's), "threshold" or "factor"."""
        return "threshold" if self.threshold is not None else "factor" if self.factor is not None else "schedule"


CACHE_MODES = ("none", "prefix", "dual")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(kw_only=True)
class EngineConfig:
    """The engine's settings, fixed when it is built (every request's own are its SamplingParams).

    - max_batch: requests decoded together (the device batch's rows).
    - cache: "none" (exact: the whole canvas every step), "prefix" (K/V left of the current block
      computed at its first step and reused for its other steps) or "dual" (the masked suffix right of
      the block is cached too); the two caches are faster approximations.
    - cuda_graphs: replay each step from a CUDA graph captured per step shape (CUDA only; ignored on CPU).
    - fused_head: compute the LM head inside the Triton sampler, never storing the logits (where the
      Triton sampler runs; ignored elsewhere).
    - dtype, device: what from_pretrained loads the model as ("auto": bfloat16 on a GPU that has it,
      float32 on CPU; a GPU when there is one). An Engine built on a loaded model runs it as it is, and
      refuses settings that contradict it.
    """

    max_batch: int = 8
    cache: str = "none"
    cuda_graphs: bool = False
    fused_head: bool = False
    dtype: str = "auto"
    device: str = "auto"

    def __post_init__(self) -> None:
        self.max_batch = _check_int("max_batch", self.max_batch, minimum=1)
        if self.cache not in CACHE_MODES:
            raise DiffutronError(f"unknown cache {self.cache!r}; choose one of: {', '.join(CACHE_MODES)}")
        self.cuda_graphs = _check_bool("cuda_graphs", self.cuda_graphs)
        self.fused_head = _check_bool("fused_head", self.fused_head)
        if self.dtype not in DTYPES:
            raise DiffutronError(f"unknown dtype {self.dtype!r}; choose one of: {', '.join(DTYPES)}")
        device = self.device
        if not isinstance(device, str) or not (device in DEVICES or _is_indexed(device)):
            raise DiffutronError(f"unknown device {device!r:.80}; choose one of: {', '.join(DEVICES)} (or cuda:N)")

    def override(self, **kwargs) -> "EngineConfig":
        """A validated copy with some settings replaced; unknown names are refused."""
        return _override(self, kwargs, "engine setting")


def _is_indexed(device: str) -> bool:
    """cuda:N or cpu:N (torch's spellings of one device)."""
    prefix, _, index = device.partition(":")
    return prefix in ("cuda", "cpu") and index.isascii() and index.isdigit() and len(index) <= 4


@dataclass(frozen=True)
class Preset:
    """A setting that spans both sides: the engine's (EngineConfig fields, fixed when it is built) and
    every request's defaults (SamplingParams fields a request may replace). Both are checked here, when
    the preset is declared."""

    engine: dict = field(default_factory=dict)
    request: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        EngineConfig().override(**self.engine)  # unknown names refused by name, values checked
        SamplingParams().override(**self.request)

    def engine_config(self, base: EngineConfig | None = None, **given) -> EngineConfig:
        """`base` (default: EngineConfig()) with the preset's settings, then the non-None `given` ones."""
        return (base or EngineConfig()).override(**{**self.engine, **{k: v for k, v in given.items()
                                                                       if v is not None}})

    def describe(self) -> str:
        """`cache=dual, threshold=0.9`: for help texts and reports."""
        return ", ".join(f"{k}={v}" for k, v in {**self.engine, **self.request}.items())


# The engine's fast setting: the best measured combination of the fast knobs (see bench/results).
# `generate --fast`, `serve --fast` and the benchmarks' "fast" mode all read this one pair.
FAST = Preset(engine=dict(cache="dual"), request=dict(threshold=0.9))


def with_defaults(defaults: dict, given: dict) -> dict:
    """SamplingParams fields: `defaults` under what is `given`; a commit rule given (threshold or factor)
    replaces the defaults' rule instead of clashing with it."""
    fields = dict(defaults)
    if given.get("threshold") is not None or given.get("factor") is not None:
        fields.pop("threshold", None)
        fields.pop("factor", None)
    fields.update(given)
    return fields
