"""tiny-tr: the starting point of a small Turkish demo model trained from scratch.

`init` trains a byte-level BPE tokenizer on the Turkish demo text (`training/data/tr/train.txt`,
LibreOffice help) and writes a freshly initialized ModernBertForMaskedLM of a few million parameters
next to it. The trainer then trains that checkpoint; the result ships as the bundled model "tiny-tr"
(`diffutron_engine/models/tiny-tr/`, see `diffutron_engine.loading.BUNDLED_MODELS`).

    python -m diffutron_engine.training.tiny_tr init --out runs/tiny-tr-init

Everything is deterministic: the same text files, vocabulary size and seed give the same
tokenizer.json and the same weights.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import DiffutronError
from ..models.random_weights import SPECIAL_TOKENS, modernbert_config

# training/tiny_tr.py -> training/data/tr/train.txt (the repository layout; the text is not package data)
DEFAULT_TRAIN_FILE = Path(__file__).resolve().parent / "data" / "tr" / "train.txt"
DEFAULT_VOCAB_SIZE = 8192
MAX_LENGTH = 512

# The markers of Diffutron's chat template, exactly as `loading.render_chat` writes them (a test checks
# that the two stay in sync). They become added tokens of one id each, *not* special tokens:
#  - byte-level pre-tokenization splits "[/Answer]" into "[/", "Answer", "]" before BPE sees it, so
#    even if the template text were in the training data each marker would cost at least three tokens,
#    and which ones would depend on the neighbouring characters; as added tokens they are matched on the
#    raw text first, so every marker is one fixed id a tiny model can learn easily;
#  - special tokens are dropped by decode(skip_special_tokens=True), and `loading.decode_answer` cuts
#    the answer at the *decoded* "[/Answer]": the markers must survive decoding, so special=False.
CHAT_MARKERS = ("[SYS]", "[/SYS]", "[Question]", "[/Question]", "[Answer]", "[/Answer]")

# A few million parameters: 3.8M with the 8192-token vocabulary (1.6M of them the tied embedding),
# 15.3 MB in float32. Heads of dim 64 (192 / 3), which the Triton attention kernel supports. GLU MLP of
# 2x the width. Sliding windows of 64 tokens with a global layer every third (layers 0 and 3), as
# mmBERT does at a larger scale; the rest (RoPE theta, special ids, tied embeddings, no biases or
# dropout) comes from models.random_weights.modernbert_config, i.e. mmBERT's conventions.
TINY_TR_SHAPE = dict(
    hidden_size=192,
    num_hidden_layers=6,
    num_attention_heads=3,
    intermediate_size=384,
    local_attention=64,
    max_position_embeddings=MAX_LENGTH,
)


def _min_vocab_size() -> int:
    # the special tokens, the 256 byte symbols byte-level BPE always starts from, and the markers
    return len(SPECIAL_TOKENS) + 256 + len(CHAT_MARKERS)


def _read_lines(files: list[str]):
    for f in files:
        with open(f, encoding="utf-8") as fh:
            yield from fh


def _check_files(files: list[str]) -> list[str]:
    files = [str(f) for f in files]
    if not files:
        raise DiffutronError("no training text given: pass at least one UTF-8 text file")
    for f in files:
        if not os.path.isfile(f):
            raise DiffutronError(f"training text {f!r} does not exist (or is not a file)")
    return files


def train_tokenizer(files: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """A byte-level BPE tokenizer trained on `files`, wrapped for transformers.

    Special tokens have mmBERT's ids (<pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4); the chat markers
    take the last ids. `vocab_size` counts everything; a corpus too small to fill it gives fewer.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = _check_files(files)
    if vocab_size < _min_vocab_size():
        raise DiffutronError(f"vocab_size must be at least {_min_vocab_size()} (special tokens, 256 bytes, "
                             f"chat markers), got {vocab_size}")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Turkish letters typed on some systems (macOS) arrive decomposed (s + combining cedilla): NFC makes
    # them the composed characters the training text has, instead of rare byte sequences.
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(CHAT_MARKERS),  # room for the markers, added after training
        special_tokens=SPECIAL_TOKENS,  # ids 0..4 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any byte is encodable: <unk> never occurs
        show_progress=False,
    )
    # The BPE trainer breaks ties between equally frequent pairs by the pair's token ids, not by hash
    # or thread order, so the same lines give the same merges, run after run (a test checks it).
    tok.train_from_iterator(_read_lines(files), trainer=trainer)
    tok.add_tokens([AddedToken(m, normalized=False, special=False) for m in CHAT_MARKERS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>", mask_token="<mask>",
        model_max_length=MAX_LENGTH,
        # decode exactly what was encoded (no removal of spaces before punctuation)
        clean_up_tokenization_spaces=False,
    )


def tiny_tr_config(vocab_size: int):
    """The ModernBertConfig of tiny-tr for a tokenizer of `vocab_size` tokens."""
    # "tiny" only names the base shape; TINY_TR_SHAPE overrides every field of it.
    return modernbert_config("tiny", vocab_size=vocab_size, **TINY_TR_SHAPE)


def count_tokens(tokenizer, files: list[str]) -> tuple[int, int]:
    """(tokens, non-empty lines) of text files, each line encoded alone without special tokens."""
    lines = [line.rstrip("\n") for line in _read_lines(_check_files(files))]
    lines = [line for line in lines if line.strip()]
    encodings = tokenizer.backend_tokenizer.encode_batch(lines, add_special_tokens=False)
    return sum(len(e.ids) for e in encodings), len(lines)


def init_checkpoint(out_dir: str, train_files: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE, seed: int = 0,
                    overwrite: bool = False) -> str:
    """Train the tokenizer, build a freshly initialized tiny-tr model, and write both to `out_dir`.

    The checkpoint is written to a temporary directory beside `out_dir` and renamed into place, so
    `out_dir` is either absent or complete, never half-written. An existing `out_dir` is replaced
    only with `overwrite` (it may hold a trained model). Returns `out_dir`.
    """
    import torch
    from transformers import ModernBertForMaskedLM

    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise DiffutronError(f"{out_dir!r} exists and is not a directory; choose another output directory")
    if out.exists() and not overwrite:
        raise DiffutronError(f"{out_dir!r} already exists; choose another output directory or replace it (--force)")
    tokenizer = train_tokenizer(train_files, vocab_size)
    config = tiny_tr_config(len(tokenizer))
    # A private RNG state: the caller's torch random stream is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ModernBertForMaskedLM(config)  # transformers' initializer: normal, std from the config
    model.eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)  # config.json + model.safetensors (float32, tied weights stored once)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the result is an ordinary directory
        if out.exists():
            # Directories cannot be renamed over non-empty ones: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)


def num_parameters(model) -> int:
    """Distinct parameters (the tied embedding/decoder weight counted once)."""
    return sum(p.numel() for p in model.parameters())


def _summary(path: str, train_files: list[str]) -> str:
    from ..loading import load_model

    lm = load_model(path, dtype="float32", device="cpu")
    n = num_parameters(lm.model)
    sizes = {f: os.path.getsize(os.path.join(path, f)) for f in sorted(os.listdir(path))}
    tokens, lines = count_tokens(lm.tokenizer, train_files)
    return "\n".join([
        f"wrote an untrained tiny-tr checkpoint to {path}",
        f"  vocabulary: {len(lm.tokenizer)} tokens; parameters: {n:,} ({n * 4 / 1e6:.1f} MB in float32)",
        "  files: " + ", ".join(f"{f} {s / 1e6:.2f} MB" if s >= 1e5 else f"{f} {s} B" for f, s in sizes.items()),
        f"  training text: {tokens:,} tokens in {lines:,} lines ({tokens / max(lines, 1):.1f} per line)",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m diffutron_engine.training.tiny_tr",
        description="tiny-tr, a small Turkish demo model trained from scratch: its starting checkpoint.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser(
        "init", help="train the tokenizer and write a freshly initialized model",
        description="Train a byte-level BPE tokenizer on the text files and write it with a freshly "
        "initialized ModernBertForMaskedLM of a few million parameters (the trainer's starting point).",
    )
    init.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist unless --force)")
    init.add_argument("--data", nargs="+", default=[str(DEFAULT_TRAIN_FILE)], metavar="FILE",
                      help="UTF-8 text files to train the tokenizer on (default: %(default)s)")
    init.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, metavar="N",
                      help="vocabulary size, special tokens and chat markers included (default: %(default)s)")
    init.add_argument("--seed", type=int, default=0, metavar="S", help="weight initialization seed (default: %(default)s)")
    init.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = parser.parse_args(argv)

    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        path = init_checkpoint(args.out, args.data, vocab_size=args.vocab_size, seed=args.seed,
                               overwrite=args.force)
        print(_summary(path, args.data))
    except DiffutronError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
