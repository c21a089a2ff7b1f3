"""`train merge`: fold a LoRA adapter into a plain checkpoint the engine loads, checking the adapter, the
base and `--out` before any model is loaded, and writing the result whole (diffutron_engine.outputs)."""

from __future__ import annotations

import json
import os
import time
import warnings

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
        import peft  # noqa: F401
    except ImportError:
        raise DiffutronError("merging needs peft: pip install 'diffutron-engine[train]'") from None
    from ..loading import resolve_model_path

    recorded = adapter_base(adapter)
    base_name = base or recorded
    if not base_name:
        raise DiffutronError(f"the adapter {adapter} names no base model (base_model_name_or_path); give --base")
    base_path = resolve_model_path(base_name)
    inputs = (adapter, base_path if os.path.isdir(base_path) else None)
    target = check_folder_output(out, "--out", MERGE_MARKER, force=force, inputs=inputs)
    check_vocabulary(adapter, recorded, base_name, base_path)
    merged, tok = _merged(adapter, base_name, base_path)
    stamp = {"adapter": os.path.abspath(adapter), "base": base_name,
             "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    replace_folder(target, lambda tmp: (merged.save_pretrained(tmp), tok.save_pretrained(tmp)), MERGE_MARKER, stamp)
    return out


def is_adapter(path: str) -> bool:
    """Whether `path` is a folder holding an adapter_config.json (a peft adapter, e.g. `train`'s final/)."""
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def adapter_base(adapter: str) -> str | None:
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


def check_vocabulary(adapter: str, recorded: str | None, base_name: str, base_path: str, flag: str = "--base") -> None:
    """A base other than the adapter's own (given with `flag`) must have its vocabulary: else the merge
    would pair the adapter's tokenizer with embeddings of other tokens, and nothing downstream would say so."""
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
        raise DiffutronError(f"{flag} {base_name!r} has a vocabulary of {theirs:,} tokens, {what} one of {ours:,}: "
                             f"the adapter {adapter} was trained on another model; give its own base "
                             f"(or leave {flag} out)")


def adapter_tokenizer(adapter: str, base_path: str) -> str:
    """Where the tokenizer of base + adapter comes from: the adapter's folder when it holds one (`train`
    saves it there), else the base's."""
    return adapter if os.path.isfile(os.path.join(adapter, "tokenizer.json")) else base_path


def apply_adapter(model, adapter: str, base_name: str):
    """`model` (the base, loaded) with the LoRA adapter folded into its weights (peft's merge_and_unload):
    a plain model again. An adapter that does not fit the base (target modules it lacks, tensors of other
    shapes, adapter tensors that load nowhere or are missing) is one DiffutronError naming both."""
    try:
        from peft import PeftConfig, PeftModel
    except ImportError:
        raise DiffutronError("a LoRA adapter needs peft: pip install 'diffutron-engine[train]'") from None
    try:
        # PeftModel.from_pretrained's two steps, to see the load's result (it only warns of missing keys)
        with warnings.catch_warnings():  # transformers' deprecation chatter, raised by peft's calls
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = PeftModel(model, PeftConfig.from_pretrained(adapter))
            result = peft_model.load_adapter(adapter, "default")
        bad = [k for k in result.missing_keys if "lora_" in k] + list(result.unexpected_keys)
        if bad:
            raise ValueError(f"{len(bad)} adapter tensor(s) do not load: {', '.join(sorted(bad)[:3])}")
        return peft_model.merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:  # another model's shapes or names
        raise DiffutronError(f"the adapter {adapter} does not fit the base model {base_name!r}: "
                             f"{first_line(exc)}") from None


def _merged(adapter: str, base_name: str, base_path: str):
    """(the merged model, the tokenizer to save with it)."""
    from transformers import AutoModelForMaskedLM

    from ..loading import check_loading_info, check_weights, load_tokenizer

    try:
        model, info = AutoModelForMaskedLM.from_pretrained(base_path, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError) as exc:
        raise DiffutronError(f"cannot load base model {base_name!r}: {first_line(exc)}") from None
    check_loading_info(info, base_name)
    check_weights(model, base_name)
    merged = apply_adapter(model, adapter, base_name)
    return merged, load_tokenizer(adapter_tokenizer(adapter, base_path))
