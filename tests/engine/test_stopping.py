"""Incremental text on the host: the stop rule searched around new tokens only gives what the full
search gives; the incremental detokenizer gives what a full decode gives; streamed deltas add up to the
final answer."""

import random

import pytest

from diffutron_engine.engine.text import AnswerState, IncrementalDetokenizer
from diffutron_engine.loading import END_OF_TURN, decode_answer, load_tokenizer
from diffutron_engine.stopping import StopRule


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-tr")  # byte-level BPE over Turkish text: multi-byte characters


def _text_ids(tok, rng, n):
    words = ["Seçili", "hücre", "tıklayın", "ğüşıöç", "[/Answer]", "belge", " ", "\n", "<s>", "USER", "|", ">"]
    return tok.encode(" ".join(rng.choice(words) for _ in range(n)), add_special_tokens=False)


@pytest.mark.parametrize("seed", range(12))
def test_stop_search_around_new_tokens_equals_the_full_search(tok, seed):
    rng = random.Random(seed)
    stop = StopRule(tok, rng.choice([["<s>"], ["|USER|>", "</s>"], ["tıklayın"], ["hücre b", "ğü"]]))
    mask = tok.mask_token_id
    prompt = tok.encode("[Question] soru [/Question]", add_special_tokens=False)
    target = _text_ids(tok, rng, 40)
    row = prompt + [mask] * len(target)
    start = len(prompt)
    order = list(range(len(target)))
    rng.shuffle(order)
    checked_full = False
    for i in range(0, len(order), rng.choice([1, 2, 3, 5])):
        new = sorted(start + p for p in order[i:i + 5])
        for p in new:
            row[p] = target[p - start]
        full = stop.find(row, start)
        inc = stop.find_new(row, start, new) if checked_full else full
        assert inc == full, (seed, i)
        checked_full = True
        if full is not None:
            break


@pytest.mark.parametrize("seed", range(6))
def test_incremental_detokenizer_equals_a_full_decode(tok, seed):
    rng = random.Random(seed)
    ids = _text_ids(tok, rng, 60)
    d = IncrementalDetokenizer(tok)
    deltas = []
    i = 0
    while i < len(ids):
        n = rng.choice([1, 1, 2, 3, 7])
        deltas.append(d.push(ids[i:i + n]))
        i += n
    full = tok.decode(ids, skip_special_tokens=True)
    assert "".join(deltas) == d.text
    assert full.startswith(d.text) and len(full) - len(d.text) <= 2  # at most a held-back partial char


def test_streamed_deltas_add_up_to_the_final_answer(tok):
    rng = random.Random(3)
    mask = tok.mask_token_id
    body = tok.encode("Belgeyi seçin ve tıklayın. Sonra hücreleri kopyalayın " + END_OF_TURN + " artık",
                      add_special_tokens=False)
    prompt = [5, 6, 7]
    row = prompt + [mask] * len(body)
    state = AnswerState(tok, row, len(prompt), mask)
    order = list(range(len(body)))
    rng.shuffle(order)
    sent, ended_at = [], None
    for k, p in enumerate(order):
        row[len(prompt) + p] = body[p]
        state.advance(row)
        sent.append(state.take_delta())
        masks_left = row.count(mask)
        if ended_at is None and state.is_final(row, masks_left):
            ended_at = k
    final, _ = decode_answer(tok, row, len(prompt))
    sent.append(state.take_delta(final))
    assert "".join(sent) == final == "Belgeyi seçin ve tıklayın. Sonra hücreleri kopyalayın"
    assert ended_at is not None and ended_at <= len(order) - 1
    assert END_OF_TURN not in "".join(sent)
