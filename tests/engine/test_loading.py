import os

import pytest
import torch

from diffutron_engine import DiffutronError
from diffutron_engine.errors import DiffutronWarning
from diffutron_engine.inputs import encode_chat, encode_text
from diffutron_engine.loading import (BUNDLED_MODELS, decode_answer, load_model, prepare_tokenizer,
                                      render_chat, resolve_model_path)
from diffutron_engine.models.random_weights import build_tokenizer, modernbert_config


def test_loads_golden_checkpoint_with_its_tokenizer(golden):
    tok = golden.tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)
    assert type(golden.model).__name__ == "ModernBertForMaskedLM"
    assert golden.device == "cpu" and golden.model.dtype == torch.float32 and not golden.model.training
    assert golden.max_context == 512


@pytest.mark.parametrize("dtype,expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                            ("auto", torch.float32)])
def test_dtypes(tiny_checkpoint, dtype, expected):
    lm = load_model(tiny_checkpoint, dtype=dtype, device="cpu")
    assert lm.model.dtype == expected


def test_tiny_checkpoint_has_mmbert_special_ids(tiny):
    tok = tiny.tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id, tok.mask_token_id) == (0, 1, 2, 3, 4)
    cfg = tiny.model.config
    thetas = ({v["rope_theta"] for v in cfg.rope_parameters.values()} if hasattr(cfg, "rope_parameters")
              else {cfg.global_rope_theta, cfg.local_rope_theta})
    assert thetas == {160000.0} and cfg.tie_word_embeddings


def _save(tmp_path, tokenizer, name="m"):
    from transformers import ModernBertForMaskedLM

    path = str(tmp_path / name)
    ModernBertForMaskedLM(modernbert_config("tiny", vocab_size=len(tokenizer))).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_eos_and_bos_default_to_pad(tmp_path):
    from transformers import PreTrainedTokenizerFast

    base = build_tokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, pad_token="<pad>",
                                  unk_token="<unk>", mask_token="<mask>")
    assert tok.eos_token_id is None and tok.bos_token_id is None
    lm = load_model(_save(tmp_path, tok), device="cpu")
    assert lm.tokenizer.eos_token_id == lm.tokenizer.bos_token_id == lm.tokenizer.pad_token_id == 0


def test_tokenizer_without_mask_token_is_rejected(tmp_path):
    from transformers import PreTrainedTokenizerFast

    base = build_tokenizer()
    tok = PreTrainedTokenizerFast(tokenizer_object=base.backend_tokenizer, pad_token="<pad>", eos_token="<eos>")
    with pytest.raises(DiffutronError, match="no mask token"):
        prepare_tokenizer(tok)
    with pytest.raises(DiffutronError, match="no mask token"):
        load_model(_save(tmp_path, tok), device="cpu")


def test_missing_path_and_non_model_directory(tmp_path):
    with pytest.raises(DiffutronError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(DiffutronError, match="has no config.json"):
        load_model(str(tmp_path))


def test_resolve_model_path(tmp_path, monkeypatch):
    assert resolve_model_path("tiny-tr") == BUNDLED_MODELS["tiny-tr"]
    assert resolve_model_path("diffutron/DiffutronLM-0.3B-Instruct") == "diffutron/DiffutronLM-0.3B-Instruct"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path / "m")) == str(tmp_path / "m")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_model_path("~/m") == str(tmp_path / "m")
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("./m") == "./m"
    with pytest.raises(DiffutronError, match="'./nope' does not exist"):
        resolve_model_path("./nope")
    with pytest.raises(DiffutronError, match="has no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(DiffutronError, match="got ''"):
        resolve_model_path("")


def _with_weights(tmp_path, checkpoint, edit):
    import shutil

    from safetensors.torch import load_file, save_file

    path = tmp_path / "edited"
    shutil.copytree(checkpoint, path)
    weights = load_file(path / "model.safetensors")
    edit(weights)
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return str(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_weights_that_are_not_finite_are_refused_by_name(tmp_path, tiny_checkpoint, bad):
    def poison(weights):
        weights["model.layers.1.attn.Wqkv.weight"][3, 5] = bad

    with pytest.raises(DiffutronError, match=r"has broken weights: model\.layers\.1\.attn\.Wqkv\.weight holds 1 "
                                             r"NaN or infinite value\(s\) of [\d,]+"):
        load_model(_with_weights(tmp_path, tiny_checkpoint, poison), device="cpu")


@pytest.mark.parametrize("edit,message", [
    (lambda w: w.pop("model.final_norm.weight"), r"lacks model\.final_norm\.weight; the checkpoint does not match"),
    (lambda w: w.update({"model.extra.weight": torch.ones(3)}), r"holds tensors its architecture does not have: "
                                                               r"model\.extra\.weight"),
    (lambda w: [w.pop(k) for k in sorted(w) if ".layers." in k],
     r"lacks model\.layers\.0\.attn\.Wo\.weight, .* and \d+ more"),
])
def test_a_checkpoint_missing_or_adding_tensors_is_refused_by_name(tmp_path, tiny_checkpoint, edit, message):
    """transformers initializes a missing tensor at random and ignores an unexpected one, and the model
    then answers garbage without a word: both are refused at load, naming the tensors."""
    with pytest.raises(DiffutronError, match=message):
        load_model(_with_weights(tmp_path, tiny_checkpoint, edit), device="cpu")


def test_a_tokenizer_whose_ids_lie_past_the_vocabulary_is_refused_at_load(tmp_path):
    """A mask token added to the tokenizer (id 8192 of a model with 8,192 rows) loads, then fails in the
    first step; it is refused at load, naming the token."""
    import json
    import shutil

    from diffutron_engine.loading import check_tokenizer_fits, load_tokenizer

    folder = tmp_path / "m"
    shutil.copytree(BUNDLED_MODELS["tiny-tr"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["mask_token"] = "<a-new-mask>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(DiffutronError, match=r"the tokenizer's mask token id 8192 is outside the model's vocabulary "
                                             r"of 8,192"):
        load_model(str(folder), device="cpu")
    tok = load_tokenizer("tiny-tr")
    check_tokenizer_fits(tok, 8192, "tiny-tr")
    with pytest.raises(DiffutronError, match="the tokenizer has 8,192 tokens but the model's vocabulary has 8,000"):
        check_tokenizer_fits(tok, 8000, "tiny-tr")


def test_all_zero_weights_load_with_a_warning(tmp_path, tiny_checkpoint):
    import warnings

    def zero(weights):
        for w in weights.values():
            w.zero_()

    with pytest.warns(DiffutronWarning, match="every weight of .* is zero"):
        lm = load_model(_with_weights(tmp_path, tiny_checkpoint, zero), device="cpu")
    assert not any(p.any() for p in lm.model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiffutronWarning)  # a trained model loads without a word
        load_model(tiny_checkpoint, device="cpu")


def test_checkpoint_that_is_not_a_masked_lm(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    path = str(tmp_path / "gpt2")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).save_pretrained(path)
    with pytest.raises(DiffutronError, match="no masked-LM head"):
        load_model(path, device="cpu")


def test_checkpoint_of_an_encoder_without_mlm_head(tmp_path):
    from transformers import ModernBertModel

    path = str(tmp_path / "enc")
    ModernBertModel(modernbert_config("tiny", vocab_size=100)).save_pretrained(path)
    with pytest.raises(DiffutronError, match="not a masked LM"):
        load_model(path, device="cpu")


def test_unknown_dtype_and_device():
    with pytest.raises(DiffutronError, match="unknown dtype"):
        load_model(os.path.dirname(__file__), dtype="float8")
    with pytest.raises(DiffutronError, match="unknown device"):
        load_model(os.path.dirname(__file__), device="tpu")


# ----------------------------------------------------------------------------- chat template
def test_chat_template():
    assert render_chat([{"role": "user", "content": "  Merhaba? \n"}]) == "[Question]\nMerhaba?\n[/Question]\n\n[Answer]\n"
    text = render_chat([
        {"role": "system", "content": "Kısa cevap ver."},
        {"role": "user", "content": "Başkent?"},
        {"role": "assistant", "content": "Ankara."},
        {"role": "user", "content": "Nüfusu?"},
    ])
    assert text == ("[SYS]\nKısa cevap ver.\n[/SYS]\n\n[Question]\nBaşkent?\n[/Question]\n\n"
                    "[Answer]\nAnkara.\n[/Answer]\n\n[Question]\nNüfusu?\n[/Question]\n\n[Answer]\n")
    with pytest.raises(DiffutronError, match="unknown role"):
        render_chat([{"role": "bot", "content": "x"}])
    with pytest.raises(DiffutronError, match="system message may only come first"):
        render_chat([{"role": "user", "content": "x"}, {"role": "system", "content": "y"}])


def test_encode_prompt_adds_no_special_tokens_and_rejects_empty():
    tok = build_tokenizer()
    ids = encode_text(tok, "Merhaba")
    assert tok.decode(ids) == "[Question]\nMerhaba\n[/Question]\n\n[Answer]\n"
    assert not set(ids) & set(tok.all_special_ids)
    assert tok.decode(encode_text(tok, "Merhaba", chat=False)) == "Merhaba"
    with pytest.raises(DiffutronError, match="empty prompt"):
        encode_text(tok, "   ")
    with pytest.raises(DiffutronError, match="empty prompt"):
        encode_chat(tok, [{"role": "user", "content": ""}])


def test_decode_answer_cuts_at_eos_and_end_of_turn():
    tok = build_tokenizer()
    prompt = encode_text(tok, "Soru")
    answer = tok.encode("Ankara'dır.", add_special_tokens=False)
    row = prompt + answer + [tok.eos_token_id] + tok.encode("çöp", add_special_tokens=False)
    assert decode_answer(tok, row, len(prompt)) == ("Ankara'dır.", len(answer))
    row = prompt + answer + tok.encode("\n[/Answer]\n", add_special_tokens=False) + [0, 0]
    assert decode_answer(tok, row, len(prompt)) == ("Ankara'dır.", len(answer))
