"""Training data: read documents or instruction rows, tokenize, and lay them out as fixed examples.

An example is (ids, maskable): the token ids of one row and which of them the objective may mask and
score. CPT rows are documents (packed into full-length rows, or one padded row each); their special
tokens are never masked. SFT rows are a chat prompt (never masked nor scored) followed by the answer,
its end-of-turn marker and EOS padding up to the row length (all trained: the model learns to end).

The order of examples is a permutation per epoch drawn from the run's seed, so any process can tell
which examples make up optimizer step s: that is what lets a resumed run and a multi-process run see
exactly the batches of an uninterrupted single-process run.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..bounded import read_lines, size_text
from ..errors import DiffutronError, check_utf8
from ..jsonio import parse_json
from ..loading import END_OF_TURN, render_chat
from .config import first_line


# A line of a text or JSONL file is read whole into memory: a file without line breaks (a disk image
# passed by mistake) must fail with a line, not exhaust memory. 64 MiB is far beyond any document.
MAX_LINE_BYTES = 64 * 2**20
# A .json data file is one document, read and parsed whole (its parsed rows take several times its
# size): beyond 1 GiB it fails with a line; JSONL or parquet read such data row by row.
MAX_JSON_BYTES = 2**30


def read_records(files: list[str], dataset: str | None = None, split: str = "train") -> list:
    """Documents (str) or rows (dict) from .txt (one per non-empty line), .jsonl, .json, .parquet
    files, or a hub dataset."""
    records: list = []
    for path in files:
        if not os.path.isfile(path):
            what = ("is a folder, not a file" if os.path.isdir(path) else
                    "is not a regular file (a device, a pipe or a socket)" if os.path.exists(path) else "does not exist")
            raise DiffutronError(f"data file {path!r} {what}; give .txt, .jsonl, .json or .parquet files")
        try:
            records += _read_file(path)
        except UnicodeDecodeError:  # .json and .parquet's strings; lines name their own
            raise DiffutronError(f"data file {path!r} is not UTF-8 text") from None
        except OSError as exc:
            raise DiffutronError(f"cannot read data file {path!r}: {exc.strerror or first_line(exc)}") from None
    if dataset:
        records += _hub_records(dataset, split)
    if not records:
        raise DiffutronError("the data holds no text: give at least one non-empty document or row")
    return records


def _hub_records(dataset: str, split: str) -> list:
    try:
        import datasets
    except ImportError:
        raise DiffutronError("a hub dataset needs the `datasets` package: pip install datasets") from None
    try:
        return list(datasets.load_dataset(dataset, split=split))
    except Exception as exc:  # offline, unknown name or split: the library raises many types
        raise DiffutronError(f"could not load the hub dataset {dataset!r} (split {split!r}): "
                             f"{first_line(exc)}") from None


def _lines(path: str):
    """(number, line) of a UTF-8 text file, each line at most MAX_LINE_BYTES (its break not counted). Read
    as bytes and decoded line by line, so an error names its line (a text stream decodes 8 KiB blocks
    ahead); lines end at \\n, \\r\\n or \\r, as when Python reads text, and are numbered by \\n."""
    with open(path, "rb") as f:
        for n, line in read_lines(f, f"data file {path!r}", max_line_bytes=MAX_LINE_BYTES,
                                  long_line_hint="split it into shorter documents (or is this a text file?)"):
            for part in line.split("\r"):
                yield n, part


def _read_file(path: str) -> list:
    """The records of one data file (see read_records)."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (".txt", ".text", ""):
        return [line for _, line in _lines(path) if line.strip()]
    if ext == ".jsonl":
        return [parse_json(line, f"{path}:{n}") for n, line in _lines(path) if line.strip()]
    if ext == ".json":
        with open(path, "rb") as f:
            # the size first (no gigabytes read only to be refused), the read bounded too (a growing file)
            too_big = os.fstat(f.fileno()).st_size > MAX_JSON_BYTES
            raw = b"" if too_big else f.read(MAX_JSON_BYTES + 1)
        if too_big or len(raw) > MAX_JSON_BYTES:
            raise DiffutronError(f"data file {path!r} is larger than {size_text(MAX_JSON_BYTES)}, the bound for a "
                                 ".json file (read whole); give the rows as .jsonl or .parquet")
        text = raw.decode("utf-8")
        del raw  # the parse below needs the text only
        data = parse_json(text, path)
        if not isinstance(data, list):
            raise DiffutronError(f"{path}: a .json data file must hold a list of rows")
        return data
    if ext == ".parquet":
        return _read_parquet(path)
    raise DiffutronError(f"{path}: unknown data format {ext!r}; use .txt, .jsonl, .json or .parquet")


def _read_parquet(path: str) -> list:
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise DiffutronError("reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        return pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, ValueError) as exc:  # not parquet, truncated, a type it cannot convert
        raise DiffutronError(f"data file {path!r} is not a readable parquet file ({first_line(exc)})") from None


def read_texts(files: list[str], text_field: str = "text") -> list[str]:
    """The non-empty documents of data files: .txt lines, or the `text_field` of JSONL/JSON/parquet rows."""
    texts = [t for t in (_text_of(r, text_field, n) for n, r in enumerate(read_records(files), 1)) if t.strip()]
    if not texts:
        raise DiffutronError("the data holds no text: give at least one non-empty document")
    return texts


@dataclass
class Example:
    ids: torch.Tensor  # [L] int64
    maskable: torch.Tensor  # [L] bool


def _text_of(record, field: str, n: int) -> str:
    """The text of data row `n` (1-based, over all files in order): the row itself or its `field`."""
    if isinstance(record, str):
        return check_utf8(record, f"data row {n}")
    if isinstance(record, dict) and isinstance(record.get(field), str):
        return check_utf8(record[field], f"data row {n} field {field!r}")
    raise DiffutronError(f"data row {n} has no string field {field!r} (choose the field with --text-field): "
                         f"{str(record)[:80]}")


def cpt_examples(records, tokenizer, max_length: int, pack: bool, text_field: str = "text") -> list[Example]:
    """[bos] + tokens + [eos] rows of at most max_length; with `pack`, documents are joined by EOS and
    cut into full rows (no padding, no wasted compute)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise DiffutronError("the tokenizer needs bos and eos tokens for CPT rows")
    special = set(tokenizer.all_special_ids)
    docs = [tokenizer.encode(_text_of(r, text_field, n), add_special_tokens=False) for n, r in enumerate(records, 1)]
    width = max_length - 2
    rows: list[list[int]] = []
    if pack:
        stream: list[int] = []
        for d in docs:
            stream += d + [eos]
        rows = [stream[i: i + width] for i in range(0, len(stream), width)]
    else:
        rows = [d[:width] for d in docs if d]
    out = []
    for r in rows:
        ids = torch.tensor([bos] + r + [eos])
        maskable = torch.tensor([t not in special for t in ids.tolist()])
        if maskable.any():
            out.append(Example(ids, maskable))
    if not out:
        raise DiffutronError("no token survived tokenization: is the data empty?")
    return out


def _chat_of(record, n: int) -> tuple[str, str]:
    """(rendered chat prompt, answer) of SFT row `n`: {instruction, input, output} columns
    (LlamaTurk-Instruction-Set / InstrucTurca) or {messages: [...]} ending with the assistant."""
    if isinstance(record, dict) and "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict) or \
                msgs[-1].get("role") != "assistant":
            raise DiffutronError(f"SFT row {n}: messages must be a list of {{role, content}} objects ending with an "
                                 f"assistant message, got {str(msgs)[:80]}")
        answer = msgs[-1].get("content")
        prompt = msgs[:-1]
    elif isinstance(record, dict) and "instruction" in record and "output" in record:
        question, extra, answer = record["instruction"], record.get("input"), record["output"]
        for name, value in (("instruction", question), ("input", extra)):
            if not isinstance(value, str) and (name == "instruction" or value is not None):
                raise DiffutronError(f"SFT row {n}: {name} must be a string, got {str(value)[:80]}")
        if extra and extra.strip():
            question = question.strip() + "\n" + extra.strip()
        prompt = [{"role": "user", "content": question.strip()}]
    else:
        raise DiffutronError(f"an SFT row needs instruction/input/output columns or a messages list; row {n} is "
                             f"{str(record)[:80]}")
    if not isinstance(answer, str):
        raise DiffutronError(f"SFT row {n}: the answer (output, or the last message's content) must be a string, "
                             f"got {str(answer)[:80]}")
    try:
        return render_chat(prompt), check_utf8(answer, "the answer")
    except DiffutronError as exc:  # the template's checks (roles, contents, UTF-8), with the row named
        raise DiffutronError(f"SFT row {n}: {exc}") from None


def sft_examples(records, tokenizer, max_length: int) -> tuple[list[Example], int]:
    """Chat prompt + answer + end-of-turn + EOS up to max_length; returns (examples, rows skipped
    because the prompt alone does not fit)."""
    eos = tokenizer.eos_token_id
    out, skipped = [], 0
    for n, r in enumerate(records, 1):
        chat, answer = _chat_of(r, n)
        prompt = tokenizer.encode(chat, add_special_tokens=False)
        reply = tokenizer.encode(f"{answer.strip()}\n{END_OF_TURN}", add_special_tokens=False)
        if len(prompt) >= max_length - 1:
            skipped += 1
            continue
        reply = reply[: max_length - len(prompt)]
        ids = prompt + reply + [eos] * (max_length - len(prompt) - len(reply))
        maskable = [False] * len(prompt) + [True] * (max_length - len(prompt))
        out.append(Example(torch.tensor(ids), torch.tensor(maskable)))
    if not out:
        raise DiffutronError(f"no SFT row fits in max_length={max_length}")
    return out, skipped


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)  # any config seed (see objectives)
    return torch.randperm(n, generator=g).tolist()


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention_mask, maskable), padded to the longest row of the batch."""
    width = max(e.ids.numel() for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), width), dtype=torch.long)
    maskable = torch.zeros((len(examples), width), dtype=torch.bool)
    for i, e in enumerate(examples):
        n = e.ids.numel()
        ids[i, :n], att[i, :n], maskable[i, :n] = e.ids, 1, e.maskable
    return ids, att, maskable
