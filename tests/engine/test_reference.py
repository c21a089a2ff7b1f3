"""Unit tests of the oracle's rules, on a scriptable fake model (exact behaviour) and on a tiny random
ModernBERT (invariants)."""

import pytest
import torch

from diffutron_engine import DiffutronError, ReferenceParams
from diffutron_engine.reference import ReferenceSampler, _apply_repetition_penalty
from fakes import FakeMaskedLM, FakeTokenizer

V = 64
MASK, EOS, BOS, PAD = 4, 1, 2, 0


def const_logits(favourite, low=-5.0, high=5.0):
    """Every position prefers `favourite`."""

    def fn(ids, am):
        out = torch.full((*ids.shape, V), low)
        out[..., favourite] = high
        return out

    return fn


def fake_sampler(fn, **kw):
    return ReferenceSampler(model=FakeMaskedLM(V, fn, **kw), tokenizer=FakeTokenizer())


# ----------------------------------------------------------------------------- canvas and output layout
def test_canvas_layout_attention_mask_and_histories():
    s = fake_sampler(const_logits(9))
    out = s.sample([[10, 11, 12], [20]], ReferenceParams(max_new_tokens=4, block_size=4, steps=4, return_dict=True))
    x = out.sequences
    assert x.shape == (2, 3 + 4)
    assert x[0].tolist() == [10, 11, 12, 9, 9, 9, 9]
    assert x[1].tolist() == [20, 9, 9, 9, 9, EOS, EOS]  # generated region right after its own prompt
    ids0, am0 = s.model.calls[0]
    assert ids0[1].tolist() == [20, MASK, MASK, MASK, MASK, EOS, EOS]
    assert am0.tolist() == [[1] * 7, [1, 1, 1, 1, 1, 0, 0]]
    # histories: the initial canvas, then one per step, each step commits one token per row
    assert len(out.histories) == 1 + 4 and out.forward_passes == 4
    assert torch.equal(out.histories[0], ids0)
    for a, b in zip(out.histories, out.histories[1:]):
        assert ((a != b).sum(dim=1) == 1).all()
    plain = fake_sampler(const_logits(9)).sample([[10, 11, 12], [20]], max_new_tokens=4, block_size=4, steps=4)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, x)


def test_max_length_when_max_new_tokens_is_zero():
    s = fake_sampler(const_logits(9))
    x = s.sample([[10, 11, 12]], max_new_tokens=0, max_length=8, block_size=8, steps=5)
    assert x.tolist() == [[10, 11, 12, 9, 9, 9, 9, 9]]


def test_published_long_setting_takes_128_forwards():
    s = fake_sampler(const_logits(9))
    out = s.sample([[10]], ReferenceParams(max_new_tokens=128, block_size=32, steps=128, return_dict=True))
    assert out.forward_passes == 128


# ----------------------------------------------------------------------------- block restriction
def test_blocks_restrict_commits_with_unequal_prompts(tiny):
    s = ReferenceSampler(model=tiny.model, tokenizer=tiny.tokenizer)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    bs, new = 4, 10
    out = s.sample(prompts, ReferenceParams(max_new_tokens=new, block_size=bs, steps=9, return_dict=True))
    # 3 blocks (4, 4, 2 tokens), ceil(9/3) = 3 steps each: schedules [1,2,1], [1,2,1], [1,1].
    assert len(out.histories) == 1 + 3 + 3 + 2
    step_block = [0, 0, 0, 1, 1, 1, 2, 2]
    for k, (a, b) in enumerate(zip(out.histories, out.histories[1:])):
        for i, p in enumerate(prompts):
            changed = (a[i] != b[i]).nonzero().flatten().tolist()
            lo = len(p) + step_block[k] * bs
            assert all(lo <= c < min(lo + bs, len(p) + new) for c in changed), (k, i, changed)
    assert not (out.sequences == tiny.tokenizer.mask_token_id).any()


# ----------------------------------------------------------------------------- CFG
def test_cfg_batches_unconditional_copy_and_combines_logits():
    # cond favours 10, uncond favours 11; uncond + 2 * (cond - uncond) favours 12.
    a = torch.full((V,), -4.0)
    a[10], a[12] = 3.0, 2.9
    b = torch.full((V,), -4.0)
    b[11], b[10], b[12] = 3.0, 2.0, -1.0

    def fn(ids, am):
        cond = (ids == 7).any(dim=1)  # the prompt token 7 is visible only in the conditional copy
        return torch.where(cond[:, None, None], a, b).expand(*ids.shape, V).clone()

    s = fake_sampler(fn)
    x = s.sample([[7, 8, 30]], max_new_tokens=2, block_size=2, steps=2, cfg_scale=1.0, cfg_keep_tokens=[8])
    assert x[0, 3:].tolist() == [12, 12]
    ids, am = s.model.calls[0]
    assert ids.shape[0] == 2 and am.shape == (2, 5) and torch.equal(am[0], am[1])
    # given positions are masked in the second copy, except the keep token 8
    assert ids[1].tolist() == [MASK, 8, MASK, MASK, MASK]
    off = fake_sampler(fn).sample([[7, 8, 30]], max_new_tokens=2, block_size=2, steps=2)
    assert off[0, 3:].tolist() == [10, 10]


# ----------------------------------------------------------------------------- repetition penalty
def test_repetition_penalty_on_positive_and_negative_logits():
    logits = torch.tensor([[[2.0, -1.0, 0.0, 3.0, 1.5]] * 2, [[2.0, -1.0, 0.0, 3.0, 1.5]] * 2])
    x = torch.tensor([[0, 1, 4, 4], [3, 3, 4, 2]])  # row 0 has ids {0, 1}; row 1 has {3, 2}
    _apply_repetition_penalty(logits, x, 2.0, mask_id=4, eos_id=1)
    # row 0: id 0 (positive) is divided; id 1 is EOS (excluded); the mask id 4 is excluded
    assert logits[0, 0].tolist() == [1.0, -1.0, 0.0, 3.0, 1.5]
    # row 1: id 3 positive -> divided; id 2 zero -> multiplied (stays 0); every position alike
    assert logits[1, 1].tolist() == [2.0, -1.0, 0.0, 1.5, 1.5]


def test_repetition_penalty_changes_choice_and_confidence():
    def fn(ids, am):
        out = torch.full((*ids.shape, V), -6.0)
        out[0, :, 20], out[0, :, 22] = 2.0, 1.8  # row 0: 20 is on the canvas, 22 is not
        out[1, :, 21], out[1, :, 23] = -1.0, -1.1  # row 1: negatives; 21 on the canvas
        return out

    prompts = [[20, 30], [21, 31]]
    plain = fake_sampler(fn).sample(prompts, max_new_tokens=1, block_size=1, steps=1)
    assert plain[:, 2].tolist() == [20, 21]
    pen = fake_sampler(fn).sample(prompts, max_new_tokens=1, block_size=1, steps=1, repetition_penalty=1.2)
    assert pen[:, 2].tolist() == [22, 23]  # 2.0/1.2 < 1.8 and -1.0*1.2 < -1.1


def test_repetition_penalty_sees_committed_tokens():
    # Position-independent logits favour 20 then 21 then 22; once 20 is committed it is penalised.
    def fn(ids, am):
        out = torch.full((*ids.shape, V), -6.0)
        out[..., 20], out[..., 21], out[..., 22] = 3.0, 2.8, 2.6
        return out

    x = fake_sampler(fn).sample([[30]], max_new_tokens=3, block_size=3, steps=3, repetition_penalty=1.2)
    assert x[0, 1:].tolist().count(20) == 1


# ----------------------------------------------------------------------------- suppression and right shift
def position_logits(ids, am):
    """Position j prefers token 30 + j, with confidence falling along the row."""
    B, T = ids.shape
    out = torch.full((B, T, V), -8.0)
    for j in range(T):
        out[:, j, 30 + j] = 8.0 - 0.5 * j
    return out


def test_suppress_tokens_are_never_chosen():
    x = fake_sampler(position_logits).sample([[10, 11]], max_new_tokens=4, block_size=4, steps=4,
                                             suppress_tokens=[32, 33])
    assert 32 not in x[0].tolist() and 33 not in x[0].tolist()
    assert x[0, 4:].tolist() == [34, 35]


def test_begin_suppress_only_lowers_confidence():
    s = fake_sampler(position_logits)
    out = s.sample([[10, 11]], ReferenceParams(max_new_tokens=4, block_size=4, steps=4, return_dict=True,
                                             begin_suppress_tokens=[32]))
    # The quirk: token 32 is still chosen at position 2 (suppressed after the choice) ...
    assert out.sequences[0, 2:].tolist() == [32, 33, 34, 35]
    # ... but its confidence became 0, so position 2 is committed last, not first.
    first = (out.histories[1][0] != out.histories[0][0]).nonzero().flatten().tolist()
    last = (out.histories[4][0] != out.histories[3][0]).nonzero().flatten().tolist()
    assert first == [3] and last == [2]


def test_right_shift_uses_the_previous_positions_logits():
    x = fake_sampler(position_logits).sample([[10, 11]], max_new_tokens=3, block_size=3, steps=3,
                                             right_shift_logits=True)
    assert x[0, 2:].tolist() == [31, 32, 33]  # position j gets the prediction made at j - 1
    x = fake_sampler(position_logits).sample([[]], max_new_tokens=2, block_size=2, steps=2,
                                             right_shift_logits=True)
    assert x[0].tolist() == [BOS, 30, 31]  # an empty prompt becomes [bos]


# ----------------------------------------------------------------------------- infill
def test_infill_changes_only_mask_tokens(tiny):
    s = ReferenceSampler(model=tiny.model, tokenizer=tiny.tokenizer)
    seqs = [[5, MASK, MASK, 9, MASK, 11], [20, MASK, 23]]
    out = s.infill(seqs, ReferenceParams(block_size=2, steps=6))
    for row, seq in zip(out.tolist(), seqs):
        for a, b in zip(row, seq):
            assert a == b or (b == MASK and a != MASK)
    assert out[1, 3:].tolist() == [EOS] * 3


# ----------------------------------------------------------------------------- batch invariance
@pytest.mark.parametrize("config", [dict(max_new_tokens=12, block_size=4, steps=12),
                                    dict(max_new_tokens=10, block_size=5, steps=4, cfg_scale=0.5),
                                    dict(max_new_tokens=8, block_size=8, steps=8, repetition_penalty=1.3)])
def test_greedy_rows_do_not_depend_on_the_batch(tiny, config):
    s = ReferenceSampler(model=tiny.model, tokenizer=tiny.tokenizer)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18, 19]]
    n = config["max_new_tokens"]
    batch = s.sample(prompts, **config)
    for i, p in enumerate(prompts):
        alone = s.sample([p], **config)
        assert batch[i, : len(p) + n].tolist() == alone[0].tolist()


# ----------------------------------------------------------------------------- kwargs and bad input
def test_kwargs_override_config():
    s = fake_sampler(const_logits(9))
    out = s.sample([[10]], ReferenceParams(max_new_tokens=2, steps=2), max_new_tokens=5, return_dict=True)
    assert out.sequences.shape == (1, 6)


def test_bad_inputs_raise_clear_errors():
    s = fake_sampler(const_logits(9), max_position_embeddings=16)
    with pytest.raises(DiffutronError, match="beyond the model's context of 16"):
        s.sample([[10] * 10], max_new_tokens=8)
    with pytest.raises(DiffutronError, match="outside the vocabulary"):
        s.sample([[10, V + 3]], max_new_tokens=2)
    with pytest.raises(DiffutronError, match="no inputs"):
        s.sample([], max_new_tokens=2)
    with pytest.raises(DiffutronError, match="unknown sampler option"):
        s.sample([[10]], block_length=4)
    with pytest.raises(DiffutronError, match="suppress_tokens has ids outside"):
        s.sample([[10]], max_new_tokens=2, suppress_tokens=[V])


# ----------------------------------------------------------------------------- stop strings
def test_stop_strings_end_the_answer_and_skip_remaining_steps():
    from diffutron_engine.inputs import encode_text
    from diffutron_engine.loading import decode_answer
    from diffutron_engine.models.random_weights import build_tokenizer

    tok = build_tokenizer()
    prompt = encode_text(tok, "merhaba")
    target = tok.encode("iyi günler</s>devam eder ve sonra", add_special_tokens=False)
    L, n = len(prompt), len(target) + 6

    def fn(ids, am):  # position L + j prefers target[j], confidence falling left to right
        out = torch.full((*ids.shape, len(tok)), -9.0)
        for j in range(n):
            out[:, L + j, target[j] if j < len(target) else 1] = 9.0 - 0.1 * j
        return out

    model = FakeMaskedLM(len(tok), fn)
    s = ReferenceSampler(model=model, tokenizer=tok)
    cfg = ReferenceParams(max_new_tokens=n, block_size=n, steps=n, return_dict=True)
    full = s.sample([prompt], cfg)
    assert full.forward_passes == n and "</s>" in tok.decode(full.sequences[0, L:].tolist())

    out = s.sample([prompt], cfg, stop_strings=["|USER|>", "</s>"])
    row = out.sequences[0].tolist()
    head = tok.encode("iyi günler", add_special_tokens=False)
    repl = tok.encode("\n[/Answer]\n", add_special_tokens=False)
    assert row[: L + len(head)] == prompt + head
    assert row[L + len(head): L + len(head) + len(repl)] == repl
    assert set(row[L + len(head) + len(repl):]) == {tok.pad_token_id}
    # once the stop rule cleared the row, no mask is left: the remaining steps are skipped
    assert out.forward_passes < n and len(out.histories) == 1 + out.forward_passes
    assert decode_answer(tok, row, L)[0] == "iyi günler"


def test_stop_rule_ignores_the_prompt_masks_and_maps_non_canonical_tokens():
    from diffutron_engine.inputs import encode_text
    from diffutron_engine.models.random_weights import build_tokenizer
    from diffutron_engine.stopping import StopRule

    tok = build_tokenizer()
    rule = StopRule(tok, ["</s>", "<s>"])
    prompt = encode_text(tok, "Bir etiket: </s> nedir?")  # the prompt itself holds a stop string
    chars = [tok.convert_tokens_to_ids(c) for c in "iyi"]  # "iyi" spelled one character per token
    stop = tok.encode("</s>", add_special_tokens=False)
    row = prompt + chars + stop + tok.encode(" sonra", add_special_tokens=False)
    x = torch.tensor([row])
    assert rule.find(row, 0) is not None and rule.find(row, len(prompt)) == len(prompt) + 3
    assert rule.apply(x, [len(prompt)]) == [0]
    repl = tok.encode("\n[/Answer]\n", add_special_tokens=False)
    assert x[0, : len(prompt) + 3].tolist() == prompt + chars  # nothing before the stop is touched
    assert x[0, len(prompt) + 3 : len(prompt) + 3 + len(repl)].tolist() == repl
    assert set(x[0, len(prompt) + 3 + len(repl):].tolist()) <= {tok.pad_token_id}
    # a stop string split by a still-masked position is not text yet
    half = tok.encode("</", add_special_tokens=False), tok.encode("s>", add_special_tokens=False)
    assert rule.find(prompt + half[0] + [tok.mask_token_id] + half[1], len(prompt)) is None
    assert rule.find(prompt + half[0] + half[1], len(prompt)) == len(prompt)
