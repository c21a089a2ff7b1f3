"""The dllm drop-in: dllm's sampler contract, exact by default (same canvas and histories as the oracle)."""

import pytest
import torch

from diffutron_engine.integrations.dllm import DiffutronSampler, DiffutronSamplerConfig
from diffutron_engine.reference import ReferenceSampler

PROMPTS = [[5, 17, 23, 40, 41, 42], torch.tensor([7, 8]), [9, 10, 11, 12, 13, 14, 15, 16, 17]]


def test_greedy_canvas_and_histories_equal_the_oracle(golden):
    sampler = DiffutronSampler(model=golden.model, tokenizer=golden.tokenizer)
    cfg = DiffutronSamplerConfig(max_new_tokens=16, block_size=8, steps=16)
    out = sampler.sample(PROMPTS, cfg, return_dict=True)
    ref = ReferenceSampler(model=golden.model, tokenizer=golden.tokenizer).sample(
        PROMPTS, max_new_tokens=16, block_size=8, steps=16, return_dict=True)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.histories) == len(ref.histories)
    assert all(torch.equal(a, b) for a, b in zip(out.histories, ref.histories))
    plain = sampler.sample(PROMPTS, cfg)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, ref.sequences)


def test_kwargs_override_and_infill(golden):
    sampler = DiffutronSampler(model=golden.model, tokenizer=golden.tokenizer)
    x = sampler.sample([[5, 6]], DiffutronSamplerConfig(max_new_tokens=4, steps=4), max_new_tokens=6, steps=6)
    assert x.shape == (1, 8)
    seqs = [[5, 6, 4, 4, 9, 4, 11], [20, 4, 23]]
    got = sampler.infill(seqs, DiffutronSamplerConfig(block_size=4, steps=8))
    ref = ReferenceSampler(model=golden.model, tokenizer=golden.tokenizer).infill(seqs, block_size=4, steps=8)
    assert torch.equal(got, ref)


def test_model_is_reassignable(golden, tiny):
    sampler = DiffutronSampler(model=golden.model, tokenizer=golden.tokenizer)
    a = sampler.sample([[5, 6, 7]], max_new_tokens=4, steps=4, block_size=4)
    sampler.model, sampler.tokenizer = tiny.model, tiny.tokenizer
    b = sampler.sample([[5, 6, 7]], max_new_tokens=4, steps=4, block_size=4)
    ref = ReferenceSampler(model=tiny.model, tokenizer=tiny.tokenizer).sample([[5, 6, 7]], max_new_tokens=4,
                                                                              steps=4, block_size=4)
    assert torch.equal(b, ref) and a.shape == b.shape


def test_fast_knobs_and_seeded_sampling(golden):
    sampler = DiffutronSampler(model=golden.model, tokenizer=golden.tokenizer)
    fast = sampler.sample(PROMPTS, max_new_tokens=16, block_size=8, steps=16, cache="dual", threshold=0.5)
    assert fast.shape == (3, 9 + 16)
    torch.manual_seed(7)
    a = sampler.sample(PROMPTS, max_new_tokens=8, block_size=8, steps=8, temperature=0.8)
    torch.manual_seed(7)
    b = sampler.sample(PROMPTS, max_new_tokens=8, block_size=8, steps=8, temperature=0.8)
    assert torch.equal(a, b)  # torch.manual_seed drives the engine's per-request seeds
    with pytest.raises(Exception, match="unknown sampler option"):
        sampler.sample(PROMPTS, block_length=8)
