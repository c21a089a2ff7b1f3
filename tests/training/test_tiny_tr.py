"""tiny-tr's starting point: tokenizer, config, checkpoint, and the bundled-model name in loading.

Everything runs on a small temporary Turkish corpus with a small vocabulary, so it is fast; the real
8192-token vocabulary is only used for the config's parameter count (no training text needed)."""

import re

import pytest

from diffutron_engine import DiffutronError
from diffutron_engine import loading
from diffutron_engine.inputs import encode_text
from diffutron_engine.loading import load_model, load_tokenizer, render_chat
from diffutron_engine.models.random_weights import SPECIAL_TOKENS
from diffutron_engine.training import tiny_tr
from diffutron_engine.training.tiny_tr import CHAT_MARKERS, init_checkpoint, tiny_tr_config, train_tokenizer

VOCAB = 400  # just above the minimum (5 special + 256 bytes + 6 markers): fast, and still has merges

LINES = [
    "Seçili hücrelerin biçimini ve yazı tipini belirler.",
    "Belgeyi PDF olarak dışa aktarmak için Dosya menüsünü açın.",
    "Türkiye'nin başkenti Ankara'dır ve en kalabalık şehri İstanbul'dur.",
    "Tablodaki verileri sıralamak için Veri - Sırala komutunu seçin.",
    "Bu iletişim penceresinde yazdırma seçeneklerini belirleyebilirsiniz.",
    "Güzel bir gün geçirmeniz dileğiyle, teşekkür ederim.",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("tr") / "train.txt"
    # repeated so that the BPE merges have counts to work with
    path.write_text("\n".join(LINES * 20) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tokenizer(corpus):
    return train_tokenizer([corpus], vocab_size=VOCAB)


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory):
    return init_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "tiny-tr"), [corpus], vocab_size=VOCAB, seed=0)


def test_special_tokens_have_mmbert_ids(tokenizer):
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == SPECIAL_TOKENS
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token,
            tokenizer.mask_token) == ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id,
            tokenizer.mask_token_id) == (0, 1, 2, 3, 4)
    assert len(tokenizer) == VOCAB


def test_tokenizer_is_deterministic(corpus, tokenizer):
    again = train_tokenizer([corpus], vocab_size=VOCAB)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_markers_match_the_chat_template():
    text = render_chat([{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}])
    assert set(re.findall(r"\[/?[A-Za-z]+\]", text)) == set(CHAT_MARKERS)


def test_chat_markers_are_single_non_special_tokens(tokenizer):
    special = set(tokenizer.all_special_ids)
    for marker in CHAT_MARKERS:
        ids = tokenizer.encode(marker, add_special_tokens=False)
        assert len(ids) == 1 and ids[0] >= 5 and ids[0] not in special
        # glued to other text it is still the same single id
        assert ids[0] in tokenizer.encode(f"x{marker}y", add_special_tokens=False)
    # The answer is cut at the *decoded* end-of-turn marker: decoding must keep it.
    prompt = encode_text(tokenizer, "Türkiye'nin başkenti neresidir?")
    row = prompt + tokenizer.encode("Ankara'dır.\n[/Answer]\n\nfazlası", add_special_tokens=False) + [1, 0]
    assert loading.decode_answer(tokenizer, row, len(prompt))[0] == "Ankara'dır."


def test_turkish_round_trips(tokenizer):
    for text in LINES + ["Hiç görülmemiş kelimeler: çğıöşü ÇĞİÖŞÜ ✓"]:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    # decomposed input (s + combining cedilla) is read as the composed letter
    assert tokenizer.encode("s\u0327ehir", add_special_tokens=False) == tokenizer.encode("şehir", add_special_tokens=False)


def test_config_size_and_heads():
    from transformers import ModernBertForMaskedLM

    config = tiny_tr_config(8192)
    assert config.hidden_size // config.num_attention_heads == 64
    assert config.max_position_embeddings == 512 and config.tie_word_embeddings
    assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (0, 1, 2)
    import torch

    with torch.device("meta"):  # shapes only: no memory, no initialization time
        model = ModernBertForMaskedLM(config)
    n = tiny_tr.num_parameters(model)
    assert 3_000_000 <= n <= 6_000_000
    assert n * 4 <= 15.5e6  # float32 weights well under the 30 MB budget


def test_bad_inputs(tmp_path, corpus):
    with pytest.raises(DiffutronError, match="does not exist"):
        train_tokenizer([str(tmp_path / "missing.txt")])
    with pytest.raises(DiffutronError, match="at least"):
        train_tokenizer([corpus], vocab_size=100)


def test_init_checkpoint_loads(checkpoint, tokenizer):
    import torch

    lm = load_model(checkpoint, dtype="float32", device="cpu")
    assert type(lm.model).__name__ == "ModernBertForMaskedLM"
    assert lm.model.config.vocab_size == len(lm.tokenizer) == VOCAB
    assert lm.tokenizer.mask_token_id == 4 and lm.max_context == 512
    assert lm.tokenizer.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    ids = torch.tensor([encode_text(lm.tokenizer, "Merhaba!") + [4, 4]])
    with torch.no_grad():
        logits = lm.model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], VOCAB) and torch.isfinite(logits).all()


def test_init_checkpoint_refuses_to_overwrite(checkpoint, corpus):
    with pytest.raises(DiffutronError, match="already exists"):
        init_checkpoint(checkpoint, [corpus], vocab_size=VOCAB)


def test_bundled_model_missing(monkeypatch, tmp_path):
    monkeypatch.setitem(loading.BUNDLED_MODELS, "tiny-tr", str(tmp_path / "not-there"))
    with pytest.raises(DiffutronError, match="bundled model 'tiny-tr' is not installed"):
        load_model("tiny-tr", dtype="float32", device="cpu")
    with pytest.raises(DiffutronError, match="not installed"):
        load_tokenizer("tiny-tr")


def test_bundled_model_resolves(monkeypatch, checkpoint):
    monkeypatch.setitem(loading.BUNDLED_MODELS, "tiny-tr", checkpoint)
    lm = load_model("tiny-tr", dtype="float32", device="cpu")
    assert lm.model.config.hidden_size == tiny_tr_config(VOCAB).hidden_size
    assert len(load_tokenizer("tiny-tr")) == VOCAB


def test_bundled_path_is_inside_the_package():
    import os

    import diffutron_engine

    pkg = os.path.dirname(os.path.abspath(diffutron_engine.__file__))
    assert loading.BUNDLED_MODELS["tiny-tr"] == os.path.join(pkg, "models", "tiny-tr")
