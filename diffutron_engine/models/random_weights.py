"""Random-weight ModernBERT masked LMs built locally, for tests, demos and benchmarks.

No hub access is needed: the tokenizer is a byte-level BPE trained in a fraction of a second on a
small built-in Turkish text, with the special ids of mmBERT's tokenizer (pad 0, eos 1, bos 2, unk 3,
mask 4). Weights are random: such a model produces fluent-looking token soup, not language.
"""

from __future__ import annotations

import os

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]

# A small Turkish text with the chat template's markers, so that both tokenize compactly.
_CORPUS = """\
[SYS]
Sen yardımsever bir asistansın.
[/SYS]

[Question]
Türkiye'nin başkenti neresidir?
[/Question]

[Answer]
Türkiye'nin başkenti Ankara'dır.
[/Answer]

[Question]
Bana kısa bir şiir yaz.
[/Question]

[Answer]
Deniz mavi, gökyüzü açık; rüzgâr eser, yapraklar düşer.
[/Answer]

İstanbul, Türkiye'nin en kalabalık şehridir ve iki kıtaya yayılır.
Bu model, maskeli difüzyon ile metin üretir: her adımda en emin tahminleri yerleştirir.
Bir dil modeli, kelimelerin olasılıklarını öğrenir ve yeni cümleler kurar.
Öğrenciler okulda matematik, fizik, kimya ve Türkçe dersleri alırlar.
Hava bugün güneşli, yarın ise yağmurlu olacak gibi görünüyor.
Kitap okumak insanın hayal gücünü geliştirir ve yeni dünyalar açar.
Çay, Türk kültüründe misafirperverliğin simgesidir.
Bilgisayarlar verileri işler, saklar ve ağlar üzerinden paylaşır.
Güzel bir gün geçirmeniz dileğiyle, teşekkür ederim.
Ne zaman geleceksin? Seni bekliyorum. Evet, hayır, belki.
"""

SIZES = {
    # the golden tiny model's shape
    "tiny": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                 local_attention=6, max_position_embeddings=512),
    # a little bigger, still instant on a CPU: the demo model
    "small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                  local_attention=16, max_position_embeddings=512),
}


def build_tokenizer(vocab_size: int = 1000):
    """A byte-level BPE tokenizer with mmBERT's special ids, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,  # ids 0..4 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>", mask_token="<mask>",
    )


def modernbert_config(size: str = "tiny", vocab_size: int = 1000, **overrides):
    """A ModernBertConfig of a named size with mmBERT's conventions (RoPE theta 160000, no biases)."""
    from transformers import ModernBertConfig

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of: {', '.join(SIZES)}")
    kwargs = dict(
        SIZES[size],
        vocab_size=vocab_size,
        global_attn_every_n_layers=3,
        # transformers 4.x reads the two thetas, 5.x reads rope_parameters: give both.
        global_rope_theta=160000.0,
        local_rope_theta=160000.0,
        rope_parameters={t: {"rope_type": "default", "rope_theta": 160000.0}
                         for t in ("full_attention", "sliding_attention")},
        pad_token_id=0, eos_token_id=1, bos_token_id=2, cls_token_id=2, sep_token_id=1,
        attention_dropout=0.0, embedding_dropout=0.0, mlp_dropout=0.0,
        tie_word_embeddings=True,
    )
    kwargs.update(overrides)
    return ModernBertConfig(**kwargs)


# mmBERT-base, the architecture of Diffutron (spec: model.md)
MMBERT_BASE = dict(vocab_size=256000, hidden_size=768, intermediate_size=1152, num_hidden_layers=22,
                   num_attention_heads=12, local_attention=128, max_position_embeddings=8192)


def random_mmbert(layers: int | None = None, vocab_size: int | None = None, seed: int = 0, dtype=None,
                  device: str = "cpu", init_std: float = 0.02):
    """The real mmBERT-base architecture (optionally with fewer layers or a smaller vocabulary) with
    random weights, in seconds: built on the meta device, then filled directly (transformers'
    initializer takes about a minute for the 256k x 768 embedding)."""
    import torch
    from transformers import ModernBertForMaskedLM
    from transformers.models.modernbert.modeling_modernbert import ModernBertRotaryEmbedding

    over = dict(MMBERT_BASE)
    if layers is not None:
        over["num_hidden_layers"] = layers
    if vocab_size is not None:
        over["vocab_size"] = vocab_size
    config = modernbert_config("tiny", **over)
    with torch.device("meta"):
        model = ModernBertForMaskedLM(config)
    model = model.to_empty(device=device)
    model.model.rotary_emb = ModernBertRotaryEmbedding(config, device=device)  # buffers are not parameters
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, init_std, generator=g)
    model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def build_random_checkpoint(out_dir: str, size: str = "tiny", seed: int = 0, vocab_size: int = 1000) -> str:
    """Write a random-weight ModernBertForMaskedLM and its tokenizer to `out_dir`; return the path."""
    import torch
    from transformers import ModernBertForMaskedLM

    tokenizer = build_tokenizer(vocab_size)
    config = modernbert_config(size, vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = ModernBertForMaskedLM(config).eval()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m diffutron_engine.models.random_weights",
        description="Write a RANDOM-WEIGHT ModernBERT masked LM with a locally trained tokenizer (no network).",
    )
    p.add_argument("out", help="output directory")
    p.add_argument("--size", default="small", choices=sorted(SIZES))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    path = build_random_checkpoint(args.out, size=args.size, seed=args.seed)
    print(f"wrote a random-weight {args.size} ModernBERT to {path} (untrained: its output is token soup)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
