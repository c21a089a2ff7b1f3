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

import json
import os
from dataclasses import dataclass

import torch

from ..errors import DiffutronError
from ..loading import END_OF_TURN, render_chat


def read_records(files: list[str], dataset: str | None = None, split: str = "train") -> list:
    """Documents (str) or rows (dict) from .txt (one per non-empty line), .jsonl, .json, .parquet
    files, or a hub dataset."""
    records: list = []
    for path in files:
        if not os.path.isfile(path):
            what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
            raise DiffutronError(f"data file {path!r} {what}; give .txt, .jsonl, .json or .parquet files")
        try:
            records += _read_file(path)
        except UnicodeDecodeError:
            raise DiffutronError(f"data file {path!r} is not UTF-8 text") from None
    if dataset:
        try:
            import datasets
        except ImportError:
            raise DiffutronError("a hub dataset needs the `datasets` package: pip install datasets") from None
        try:
            records += list(datasets.load_dataset(dataset, split=split))
        except Exception as exc:  # offline, unknown name or split: the library raises many types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DiffutronError(f"could not load the hub dataset {dataset!r} (split {split!r}): {first}") from None
    if not records:
        raise DiffutronError("the data holds no text: give at least one non-empty document or row")
    return records


def _read_file(path: str) -> list:
    """The records of one data file (see read_records)."""
    records: list = []
    ext = os.path.splitext(path)[1].lower()
    if ext in (".txt", ".text", ""):
        with open(path, encoding="utf-8") as f:
            records += [line.rstrip("\n") for line in f if line.strip()]
    elif ext == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DiffutronError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
    elif ext == ".json":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, list):
            raise DiffutronError(f"{path}: a .json data file must hold a list of rows")
        records += data
    elif ext == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DiffutronError("reading parquet needs pyarrow: pip install pyarrow") from None
        records += pq.read_table(path).to_pylist()
    else:
        raise DiffutronError(f"{path}: unknown data format {ext!r}; use .txt, .jsonl, .json or .parquet")
    return records


def read_texts(files: list[str], text_field: str = "text") -> list[str]:
    """The non-empty documents of data files: .txt lines, or the `text_field` of JSONL/JSON/parquet rows."""
    texts = [t for t in (_text_of(r, text_field) for r in read_records(files)) if t.strip()]
    if not texts:
        raise DiffutronError("the data holds no text: give at least one non-empty document")
    return texts


@dataclass
class Example:
    ids: torch.Tensor  # [L] int64
    maskable: torch.Tensor  # [L] bool


def _text_of(record, field: str) -> str:
    if isinstance(record, str):
        return record
    if isinstance(record, dict) and isinstance(record.get(field), str):
        return record[field]
    raise DiffutronError(f"a data row has no string field {field!r} (choose the field with --text-field): "
                         f"{str(record)[:80]}")


def cpt_examples(records, tokenizer, max_length: int, pack: bool, text_field: str = "text") -> list[Example]:
    """[bos] + tokens + [eos] rows of at most max_length; with `pack`, documents are joined by EOS and
    cut into full rows (no padding, no wasted compute)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise DiffutronError("the tokenizer needs bos and eos tokens for CPT rows")
    special = set(tokenizer.all_special_ids)
    docs = [tokenizer.encode(_text_of(r, text_field), add_special_tokens=False) for r in records]
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


def _chat_of(record) -> tuple[list[dict], str]:
    """(prompt messages, answer) of an instruction row: {instruction, input, output} columns
    (LlamaTurk-Instruction-Set / InstrucTurca) or {messages: [...]} ending with the assistant."""
    if isinstance(record, dict) and "messages" in record:
        msgs = record["messages"]
        if not msgs or msgs[-1].get("role") != "assistant":
            raise DiffutronError("an SFT chat row must end with an assistant message")
        return msgs[:-1], msgs[-1]["content"]
    if isinstance(record, dict) and "instruction" in record and "output" in record:
        question = record["instruction"].strip()
        if str(record.get("input") or "").strip():
            question += "\n" + str(record["input"]).strip()
        return [{"role": "user", "content": question}], record["output"]
    raise DiffutronError("an SFT row needs instruction/input/output columns or a messages list, got "
                         f"{str(record)[:80]}")


def sft_examples(records, tokenizer, max_length: int) -> tuple[list[Example], int]:
    """Chat prompt + answer + end-of-turn + EOS up to max_length; returns (examples, rows skipped
    because the prompt alone does not fit)."""
    eos = tokenizer.eos_token_id
    out, skipped = [], 0
    for r in records:
        msgs, answer = _chat_of(r)
        prompt = tokenizer.encode(render_chat(msgs), add_special_tokens=False)
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
