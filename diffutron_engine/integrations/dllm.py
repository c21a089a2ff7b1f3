"""A drop-in replacement for dllm's MDLM sampler, running on the engine.

    from diffutron_engine.integrations.dllm import DiffutronSampler, DiffutronSamplerConfig
    sampler = DiffutronSampler(model=model, tokenizer=tokenizer)
    out = sampler.sample([ids_a, ids_b], DiffutronSamplerConfig(max_new_tokens=64, steps=64), block_size=32)

It follows dllm's sampler contract: keyword construction, `model` reassignable afterwards,
`sample(inputs, config=None, **kwargs)` with token-id lists or 1-D tensors of unequal length and kwargs
that override config fields, `infill(...)`, and the output layout of the spec (a B x T canvas, or with
`return_dict` an object with `.sequences` and `.histories`). The config's defaults are exact mode, so
swapping it in changes no greedy output. When dllm is importable the classes subclass its base sampler
and config; nothing here requires dllm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import SamplingConfig
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


_CONFIG_BASES = (SamplingConfig,) if _ConfigBase is object else (SamplingConfig, _ConfigBase)


@dataclass
class DiffutronSamplerConfig(*_CONFIG_BASES):
    """dllm's MDLM fields (same names and defaults, from SamplingConfig) plus the engine's own
    (cache, threshold, factor, early_stop, seed); the defaults are exact mode."""

    # Off by default: early stop leaves the masks after an ended answer in the canvas, and a drop-in
    # must return the same canvas as the sampler it replaces.
    early_stop: bool = False
    seed: int | None = None  # None: drawn from torch's global generator (torch.manual_seed applies)


@dataclass
class DiffutronSampler(_SamplerBase):
    """dllm-style sampler backed by diffutron_engine.Engine. Assigning a new `model` (or tokenizer)
    rebuilds the engine on the next call."""

    model: Any = None
    tokenizer: Any = None
    _engine: Any = field(default=None, repr=False, compare=False)
    _engine_key: tuple = field(default=(), repr=False, compare=False)

    def _get_engine(self, batch: int):
        from ..engine import Engine

        if self.model is None or self.tokenizer is None:
            raise DiffutronError("DiffutronSampler needs model=... and tokenizer=...")
        key = (id(self.model), id(self.tokenizer), batch)
        if self._engine is None or self._engine_key != key:
            self._engine = Engine(self.model, self.tokenizer, max_batch=max(batch, 1))
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
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 1:
            inputs = [inputs]
        if inputs is None or len(inputs) == 0:
            raise DiffutronError("no inputs: give at least one token-id sequence")
        from ..engine.engine import resolve_config

        scfg = resolve_config(config, kwargs)
        return_dict = scfg.return_dict
        engine = self._get_engine(len(inputs))
        make = engine.make_infill_request if infill else engine.make_request
        reqs = [make(p if not isinstance(p, torch.Tensor) else p.tolist(), scfg, i) for i, p in enumerate(inputs)]
        width = max(len(r.tokens) for r in reqs)
        eos = engine.tokenizer.eos_token_id
        device = next(self.model.parameters()).device

        def canvas() -> torch.Tensor:
            x = torch.full((len(reqs), width), eos, dtype=torch.long)
            for i, r in enumerate(reqs):
                x[i, : len(r.tokens)] = torch.tensor(r.tokens)
            return x.to(device)

        histories = [canvas()] if return_dict else None
        for r in reqs:
            engine.scheduler.add(r)
        while engine.scheduler.has_work():
            engine.step()
            if histories is not None:
                histories.append(canvas())
        x = canvas()
        if not return_dict:
            return x
        return SamplerOutput(sequences=x, histories=histories)


@dataclass
class SamplerOutput:
    sequences: torch.Tensor
    histories: list[torch.Tensor] | None = None
