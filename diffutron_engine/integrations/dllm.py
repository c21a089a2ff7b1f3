"""A drop-in replacement for dllm's MDLM sampler, running on the engine.

    from diffutron_engine.integrations.dllm import DiffutronSampler, DiffutronSamplerConfig
    sampler = DiffutronSampler(model=model, tokenizer=tokenizer)
    out = sampler.sample([ids_a, ids_b], DiffutronSamplerConfig(max_new_tokens=64, steps=64), block_size=32)

It follows dllm's sampler contract: keyword construction, `model` reassignable afterwards,
`sample(inputs, config=None, **kwargs)` with token-id lists or 1-D tensors of unequal length and kwargs
that override config fields, `infill(...)`, and the output layout of the oracle (a B x T canvas, or with
`return_dict` an object with `.sequences` and `.histories`). The config's defaults are exact mode, so
swapping it in changes no greedy output. When dllm is importable the classes subclass its base sampler
and config; nothing here requires dllm. It only calls the engine's public API.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import EngineConfig, ReferenceParams, SamplingParams, seed_for
from ..errors import DiffutronError


def _dllm_bases():
    try:
        from dllm.core.samplers import base as dllm_base  # type: ignore
    except Exception:  # dllm absent (or broken): stand alone
        return object, object
    sampler = getattr(dllm_base, "BaseSampler", object)
    config = getattr(dllm_base, "BaseSamplerConfig", None) or getattr(dllm_base, "SamplerConfig", object)
    return sampler, config


_SamplerBase, _ConfigBase = _dllm_bases()


_CONFIG_BASES = (ReferenceParams,) if _ConfigBase is object else (ReferenceParams, _ConfigBase)


@dataclass(kw_only=True)
class DiffutronSamplerConfig(*_CONFIG_BASES):
    """dllm's MDLM fields (same names and defaults: the oracle's ReferenceParams) plus the engine's own:
    the cache mode the engine runs with (EngineConfig's) and the request's threshold, factor, early_stop
    and seed (SamplingParams', validated by it). The defaults are exact mode."""

    cache: str = "none"
    threshold: float | None = None
    factor: float | None = None
    # Off by default: early stop leaves the masks after an ended answer in the canvas, and a drop-in
    # must return the same canvas as the sampler it replaces.
    early_stop: bool = False
    seed: int | None = None  # None: drawn from torch's global generator (torch.manual_seed applies)

    def __post_init__(self) -> None:
        super().__post_init__()
        EngineConfig(cache=self.cache)
        self.params()

    def params(self, **given) -> SamplingParams:
        """The request's SamplingParams: the shared knobs and the engine's own, `given` replacing them."""
        fields = {**self.knobs(), "max_new_tokens": self.max_new_tokens or 1, "threshold": self.threshold,
                  "factor": self.factor, "early_stop": self.early_stop, "seed": self.seed}
        return SamplingParams(**{**fields, **given})


@dataclass
class DiffutronSampler(_SamplerBase):
    """dllm-style sampler backed by diffutron_engine.Engine. Assigning a new `model` (or tokenizer)
    rebuilds the engine on the next call."""

    model: Any = None
    tokenizer: Any = None
    _engine: Any = field(default=None, repr=False, compare=False)
    _engine_key: tuple = field(default=(), repr=False, compare=False)

    def _get_engine(self, batch: int, cache: str):
        from ..engine import Engine

        if self.model is None or self.tokenizer is None:
            raise DiffutronError("DiffutronSampler needs model=... and tokenizer=...")
        key = (id(self.model), id(self.tokenizer), batch, cache)
        if self._engine is None or self._engine_key != key:
            self._engine = Engine(self.model, self.tokenizer, EngineConfig(max_batch=max(batch, 1), cache=cache))
            self._engine_key = key
        return self._engine

    @torch.no_grad()
    def sample(self, inputs, config: DiffutronSamplerConfig | None = None, **kwargs):
        return self._run(inputs, config, kwargs, infill=False)

    @torch.no_grad()
    def infill(self, inputs, config: DiffutronSamplerConfig | None = None, **kwargs):
        return self._run(inputs, config, kwargs, infill=True)

    def _run(self, inputs, config, kwargs, infill: bool):
        config = config or DiffutronSamplerConfig()
        if not isinstance(config, DiffutronSamplerConfig):  # the oracle's ReferenceParams: keep its knobs
            config = DiffutronSamplerConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(config)})
        cfg = config.override(**kwargs) if kwargs else config
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 1:
            inputs = [inputs]
        if inputs is None or len(inputs) == 0:
            raise DiffutronError("no inputs: give at least one token-id sequence")
        seqs = [p.tolist() if isinstance(p, torch.Tensor) else list(p) for p in inputs]
        # every row gets the same number of masks, as in the oracle's canvas
        n = cfg.max_new_tokens or (cfg.max_length - max(len(p) for p in seqs))
        if not infill and n < 1:
            raise DiffutronError(f"max_length {cfg.max_length} leaves no room after the longest prompt")
        if not infill and cfg.block_size is None:
            raise DiffutronError("block_size must be >= 1 for sample (None is allowed only for infill)")
        seed = cfg.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        params = cfg.params(max_new_tokens=max(n, 1), seed=seed)

        per_request = params
        if infill and cfg.block_size is not None:
            # the oracle gives every row ceil(steps / blocks of the longest row) steps per block; the
            # engine divides a request's steps by its own blocks: scale each request's steps to match
            per_block = math.ceil(cfg.steps / math.ceil(max(len(p) for p in seqs) / cfg.block_size))
            per_request = [params.override(steps=per_block * max(1, math.ceil(len(p) / cfg.block_size)),
                                            seed=seed_for(seed, i)) for i, p in enumerate(seqs)]
        engine = self._get_engine(len(seqs), cfg.cache)
        eos, mask, bos = engine.tokenizer.eos_token_id, engine.tokenizer.mask_token_id, engine.tokenizer.bos_token_id
        device = next(self.model.parameters()).device
        # each row's canvas as the engine holds it: before the first step the prompt (BOS for an empty one
        # under right shift, as the engine does) and its masks, then what every step reports
        rows = [list(p) if infill else (list(p) or ([bos] if cfg.right_shift_logits else [])) + [mask] * n
                for p in seqs]
        width = max(len(row) for row in rows)

        def canvas() -> torch.Tensor:
            x = torch.full((len(rows), width), eos, dtype=torch.long)
            for i, row in enumerate(rows):
                x[i, : len(row)] = torch.tensor(row)
            return x.to(device)

        histories = [canvas()] if cfg.return_dict else None

        def on_step(outputs) -> None:
            for out in outputs:
                rows[out.index] = out.tokens if out.finished else engine.canvas(out.request_id)
            if histories is not None:
                histories.append(canvas())

        (engine.infill if infill else engine.generate)(seqs, per_request, on_step=on_step)
        x = canvas()
        if not cfg.return_dict:
            return x
        return SamplerOutput(sequences=x, histories=histories)


@dataclass
class SamplerOutput:
    sequences: torch.Tensor
    histories: list[torch.Tensor] | None = None
