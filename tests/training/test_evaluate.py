"""Masked-LM perplexity (training/evaluate.py) and `diffutron-engine eval perplexity`."""

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffutron_engine.cli import eval as eval_cmd
from diffutron_engine.errors import DiffutronError
from diffutron_engine.models.random_weights import _CORPUS
from diffutron_engine.training.evaluate import build_sequences, draw_masks, masked_lm_perplexity, special_ids

TEXTS = [line for line in _CORPUS.splitlines() if line.strip()] * 6


def _reference(model, tokenizer, texts, max_length, seed, p=0.15):
    """Plain path: full logits of model(...) at the same masked inputs, one sequence at a time."""
    seqs = build_sequences(tokenizer, texts, max_length)
    masks = draw_masks(seqs, special_ids(tokenizer), p, seed)
    nll, hits, n = 0.0, 0, 0
    with torch.no_grad():
        for s, m in zip(seqs, masks):
            ids = torch.tensor([s])
            targets = ids[0][m]
            ids[0][m] = tokenizer.mask_token_id
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0][m].double()
            nll += F.cross_entropy(logits, targets, reduction="sum").item()
            hits += (logits.argmax(-1) == targets).sum().item()
            n += len(targets)
    return math.exp(nll / n), hits / n, n


def test_fused_path_matches_plain_logits(tiny):
    got = masked_lm_perplexity(tiny.model, tiny.tokenizer, TEXTS, max_length=64, seed=3, batch_size=4)
    ppl, acc, n = _reference(tiny.model, tiny.tokenizer, TEXTS, 64, 3)
    assert got["tokens"] == n
    assert got["perplexity"] == pytest.approx(ppl, rel=1e-5)
    assert got["accuracy"] == pytest.approx(acc, abs=1e-9)
    assert math.log(got["perplexity"]) == pytest.approx(got["loss"], rel=1e-9)


def test_fallback_path_agrees(tiny, monkeypatch):
    fused = masked_lm_perplexity(tiny.model, tiny.tokenizer, TEXTS, max_length=64)
    monkeypatch.setattr(tiny.model.config, "model_type", "bert")  # forces the model(...).logits path
    plain = masked_lm_perplexity(tiny.model, tiny.tokenizer, TEXTS, max_length=64)
    assert plain["perplexity"] == pytest.approx(fused["perplexity"], rel=1e-5)
    assert plain["accuracy"] == fused["accuracy"] and plain["tokens"] == fused["tokens"]


def test_independent_of_batch_size_and_peft_wrapper(tiny):
    one = masked_lm_perplexity(tiny.model, tiny.tokenizer, TEXTS, max_length=48, batch_size=1)
    many = masked_lm_perplexity(tiny.model, tiny.tokenizer, TEXTS, max_length=48, batch_size=7)

    class Wrapped:  # what peft's PeftModel offers
        def get_base_model(self):
            return tiny.model

    wrapped = masked_lm_perplexity(Wrapped(), tiny.tokenizer, TEXTS, max_length=48, batch_size=7)
    assert one["tokens"] == many["tokens"] and one["sequences"] == many["sequences"] > 7
    assert many["perplexity"] == pytest.approx(one["perplexity"], rel=1e-5)
    assert many["accuracy"] == one["accuracy"] and wrapped == many


def test_seed_fixes_the_masks(tiny):
    seqs = build_sequences(tiny.tokenizer, TEXTS, 64)
    special = special_ids(tiny.tokenizer)
    a, b, c = (draw_masks(seqs, special, 0.15, s) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, z) for x, z in zip(a, c))
    r0 = masked_lm_perplexity(tiny.model, tiny.tokenizer, TEXTS, max_length=64, seed=0)
    assert masked_lm_perplexity(tiny.model, tiny.tokenizer, TEXTS, max_length=64, seed=0) == r0
    assert masked_lm_perplexity(tiny.model, tiny.tokenizer, TEXTS, max_length=64, seed=1) != r0


def test_sequences_and_mask_rate(tiny):
    tok = tiny.tokenizer
    seqs = build_sequences(tok, TEXTS, 32)
    assert all(s[0] == tok.bos_token_id and s[-1] == tok.eos_token_id and len(s) <= 32 for s in seqs)
    assert all(len(s) == 32 for s in seqs[:-1])  # only the last window may be partial
    masks = draw_masks(seqs, special_ids(tok), 0.15, 0)
    special = special_ids(tok)
    scorable = sum(sum(t not in special for t in s) for s in seqs)
    masked = sum(int(m.sum()) for m in masks)
    assert all(m.any() for m in masks)
    assert all(not m[i] for s, m in zip(seqs, masks) for i, t in enumerate(s) if t in special)
    assert 0.12 < masked / scorable < 0.18, masked / scorable
    assert len(build_sequences(tok, TEXTS, 32, max_sequences=3)) == 3


def _cli(argv):
    parser = argparse.ArgumentParser()
    eval_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_json_and_text(tiny_checkpoint, tmp_path, capsys):
    txt = tmp_path / "docs.txt"
    txt.write_text("\n".join(TEXTS[:20]) + "\n\n", encoding="utf-8")
    common = ["--model", tiny_checkpoint, "--max-length", "64", "--device", "cpu"]
    assert _cli(["eval", "perplexity", "--data", str(txt), "--json", *common]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"perplexity", "accuracy", "tokens"} <= out.keys() and out["tokens"] > 0
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS[:20]), encoding="utf-8")
    assert _cli(["eval", "perplexity", "--data", str(jsonl), "--text-field", "body", "--json", *common]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] == pytest.approx(out["perplexity"], rel=1e-6)
    assert _cli(["eval", "perplexity", "--data", str(txt), *common]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")


def test_errors(tiny, tiny_checkpoint, tmp_path):
    base = ["eval", "perplexity", "--model", tiny_checkpoint, "--data"]
    with pytest.raises(DiffutronError, match="does not exist"):
        _cli([*base, str(tmp_path / "missing.txt")])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DiffutronError, match="no text"):
        _cli([*base, str(empty)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n', encoding="utf-8")
    with pytest.raises(DiffutronError, match="--text-field"):
        _cli([*base, str(bad)])
    with pytest.raises(DiffutronError, match="mlm-probability"):
        _cli([*base, str(empty), "--mlm-probability", "1.5"])
    with pytest.raises(DiffutronError, match="max-length"):
        _cli([*base, str(empty), "--max-length", "2"])
    with pytest.raises(DiffutronError, match="no tokens"):
        masked_lm_perplexity(tiny.model, tiny.tokenizer, ["", "   "])
    with pytest.raises(DiffutronError, match=r"\(0, 1\)"):
        masked_lm_perplexity(tiny.model, tiny.tokenizer, TEXTS, mlm_probability=0.0)
    with pytest.raises(DiffutronError, match="max_length"):
        masked_lm_perplexity(tiny.model, tiny.tokenizer, TEXTS, max_length=2)
    with pytest.raises(DiffutronError, match="context"):
        masked_lm_perplexity(tiny.model, tiny.tokenizer, TEXTS, max_length=4096)

    class NoMask:
        mask_token_id = None

    with pytest.raises(DiffutronError, match="mask token"):
        masked_lm_perplexity(tiny.model, NoMask(), TEXTS)
