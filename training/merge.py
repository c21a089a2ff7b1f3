"""`train merge`: fold a LoRA adapter into a plain checkpoint the engine loads, checking the adapter, the
base and `--out` before any model is loaded, and writing the result whole (diffutron_engine.outputs)."""

from __future__ import annotations

import json
import os
import time

import torch

from ..errors import DiffutronError
from ..outputs import check_folder_output, replace_folder
from . import checkpoints as ck
from .config import first_line

MERGE_MARKER = "merged.json"  # in every merge output: an earlier merge's folder may be replaced without --force


def merge_lora(adapter: str, out: str, base: str | None = None, force: bool = False) -> str:
    """A plain checkpoint (base weights + the LoRA update folded in) that the engine loads, written to
    `out` whole or not at all. Everything is checked before a model is loaded: the adapter, the base (a
    hub id, a local folder or a bundled name) and its vocabulary, and `out` (new, empty, an earlier
    merge's output, or anything else but the inputs with `force`)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise DiffutronError("merging needs peft: pip install 'diffutron-engine[train]'") from None
    from ..loading import resolve_model_path

    recorded = _adapter_base(adapter)
    base_name = base or recorded
    if not base_name:
        raise DiffutronError(f"the adapter {adapter} names no base model (base_model_name_or_path); give --base")
    base_path = resolve_model_path(base_name)
    inputs = (adapter, base_path if os.path.isdir(base_path) else None)
    target = check_folder_output(out, "--out", MERGE_MARKER, force=force, inputs=inputs)
    _check_vocabulary(adapter, recorded, base_name, base_path)
    merged, tok = _merged(PeftModel, adapter, base_name, base_path)
    stamp = {"adapter": os.path.abspath(adapter), "base": base_name,
             "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    replace_folder(target, lambda tmp: (merged.save_pretrained(tmp), tok.save_pretrained(tmp)), MERGE_MARKER, stamp)
    return out


def _adapter_base(adapter: str) -> str | None:
    """The base model an adapter folder names (None when it names none), after checking it is one."""
    path = os.path.join(adapter, "adapter_config.json")
    if not os.path.isfile(path):
        raise DiffutronError(f"{adapter} is not a LoRA adapter (no adapter_config.json)")
    try:
        with open(path, "rb") as f:
            config = json.loads(f.read(ck.MAX_MANIFEST_BYTES + 1))
    except (OSError, ValueError, RecursionError) as exc:
        raise DiffutronError(f"{path} is not readable JSON ({first_line(exc)})") from None
    name = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    return name if isinstance(name, str) and name.strip() else None


def _vocab_size(path: str) -> int | None:
    """A model's vocabulary size from its config (a local folder, or a hub id already cached), or None."""
    try:
        if os.path.isdir(path):
            with open(os.path.join(path, "config.json"), "rb") as f:
                size = json.loads(f.read(ck.MAX_MANIFEST_BYTES + 1)).get("vocab_size")
        else:
            from transformers import AutoConfig

            size = AutoConfig.from_pretrained(path).vocab_size
    except Exception:  # unreadable or out of reach: the load that follows says why, if it matters
        return None
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _check_vocabulary(adapter: str, recorded: str | None, base_name: str, base_path: str) -> None:
    """A --base other than the adapter's own must have its vocabulary: else the merge would pair the
    adapter's tokenizer with embeddings of other tokens, and nothing downstream would say so."""
    from ..loading import load_tokenizer, resolve_model_path

    theirs = _vocab_size(base_path)
    if theirs is None or base_name == recorded:
        return
    ours, what = None, f"the adapter's base {recorded!r}"
    if recorded:
        try:
            ours = _vocab_size(resolve_model_path(recorded))
        except DiffutronError:  # moved or deleted since training
            ours = None
    if ours is None and os.path.isfile(os.path.join(adapter, "tokenizer.json")):
        ours, what = len(load_tokenizer(adapter)), "the adapter's tokenizer"
        if ours <= theirs:  # a tokenizer may be shorter than its model's (padded) vocabulary
            return
    if ours is not None and ours != theirs:
        raise DiffutronError(f"--base {base_name!r} has a vocabulary of {theirs:,} tokens, {what} one of {ours:,}: "
                             "the adapter was trained on another model; give its own base (or leave --base out)")


def _merged(peft_model, adapter: str, base_name: str, base_path: str):
    """(the merged model, the tokenizer to save with it)."""
    from transformers import AutoModelForMaskedLM

    from ..loading import check_loading_info, check_weights, load_tokenizer

    try:
        model, info = AutoModelForMaskedLM.from_pretrained(base_path, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise DiffutronError(f"cannot load base model {base_name!r}: {first_line(exc)}") from None
    check_loading_info(info, base_name)
    check_weights(model, base_name)
    try:
        merged = peft_model.from_pretrained(model, adapter).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as exc:  # shapes of another model, a broken adapter
        raise DiffutronError(f"the adapter {adapter} does not fit the base model {base_name!r}: "
                             f"{first_line(exc)}") from None
    tok = load_tokenizer(adapter if os.path.isfile(os.path.join(adapter, "tokenizer.json")) else base_path)
    return merged, tok
