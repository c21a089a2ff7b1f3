"""Our ModernBERT forward (model/modernbert.py) against transformers' ModernBertForMaskedLM: the real
mmBERT configuration (fewer layers, smaller vocabulary for speed) and tiny configs, unequal lengths,
cache paths."""

import pytest
import torch

from diffutron_engine.model import ModernBert
from diffutron_engine.models.random_weights import random_mmbert


@pytest.fixture(scope="module")
def mmbert():
    # real hidden size, heads, window (+-64), RoPE theta and layer pattern; 4 layers: global, local, local, global
    return random_mmbert(layers=4, vocab_size=4096, seed=1)


def _batch(vocab, lengths, T, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (len(lengths), T), generator=g)
    am = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        am[i, :n] = 1
        ids[i, n:] = 1
    return ids, am


@pytest.mark.parametrize("model_name", ["mmbert", "golden"])
def test_logits_match_transformers(model_name, mmbert, golden):
    model = mmbert if model_name == "mmbert" else golden.model
    vocab = model.config.vocab_size
    ids, am = _batch(vocab, [200, 137, 64], 200)  # longer than the +-64 window of local layers
    with torch.no_grad():
        ref = model(ids, attention_mask=am).logits
    runner = ModernBert(model)
    hidden = runner.forward(ids, am)
    valid = am.bool()
    rows = hidden[valid]
    ours = runner.lm_head(rows)
    assert (ours - ref[valid]).abs().max().item() <= 1e-4
    # the head on a handful of rows gives the same logits as on all of them
    pick = torch.tensor([0, 5, 77, 199, 250, 330])
    assert (runner.lm_head(rows[pick]) - ref[valid][pick]).abs().max().item() <= 1e-4


def test_partial_forward_reuses_cached_keys_and_values(mmbert):
    runner = ModernBert(mmbert)
    ids, am = _batch(4096, [150, 96], 150, seed=3)
    pool = runner.new_pool(slots=4, positions=160)
    slots = torch.tensor([2, 0])
    full = runner.forward(ids, am, pool, slots)
    # recompute two spans from the cache: identical hidden states while the tokens are unchanged
    pos = torch.tensor([[100, 101, 102, 103, 104], [10, 11, 12, pool.positions, pool.positions]])
    ids_q = torch.gather(ids, 1, pos.clamp(max=149))
    part = runner.forward_partial(ids_q, pos, am.bool(), pool, slots)
    assert torch.allclose(part[0], full[0, 100:105], atol=1e-5)
    assert torch.allclose(part[1, :3], full[1, 10:13], atol=1e-5)
    # a changed token in the span: the cached keys of the other positions stay as they were (the
    # prefix/dual-cache approximation), so the span differs from a full recompute only through them
    ids2 = ids.clone()
    ids2[0, 102] = 7
    part2 = runner.forward_partial(torch.gather(ids2, 1, pos.clamp(max=149)), pos, am.bool(), pool, slots)
    fresh = runner.forward(ids2, am)
    assert not torch.allclose(part2[0], part[0])
    assert (part2[0] - fresh[0, 100:105]).abs().max() < (part[0] - fresh[0, 100:105]).abs().max()


def test_real_configuration_parameter_count():
    from diffutron_engine.models.random_weights import MMBERT_BASE, modernbert_config
    from transformers import ModernBertForMaskedLM

    with torch.device("meta"):
        model = ModernBertForMaskedLM(modernbert_config("tiny", **MMBERT_BASE))
    assert sum(p.numel() for p in model.parameters()) == 307_786_240
