"""Loading Diffutron-family checkpoints (any masked LM, ModernBERT first) with their tokenizer, the
tokenizer rules the sampler relies on, and Diffutron-Instruct's chat template."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from .config import DEVICES, DTYPES
from .errors import ContextTooLong, DiffutronError, DiffutronWarning, check_utf8

DEFAULT_MODEL = "diffutron/DiffutronLM-0.3B-Instruct"

# End of an assistant turn in the chat template; generated text is cut there.
END_OF_TURN = "[/Answer]"

# Models shipped inside the package, by short name. They are resolved before the local/hub logic, so
# a bare "tiny-tr" never goes to the hub (a local folder of that name stays reachable as "./tiny-tr").
BUNDLED_MODELS = {"tiny-tr": os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", "tiny-tr")}


@dataclass
class LoadedModel:
    model: object  # a transformers *ForMaskedLM in eval mode
    tokenizer: object
    device: str
    dtype: object  # torch.dtype

    @property
    def max_context(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 0)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise DiffutronError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)} (or cuda:N)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DiffutronError(f"device {device!r} was asked for but no CUDA GPU is available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DiffutronError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def resolve_dtype(dtype: str, device: str):
    """auto: float32 on CPU (bfloat16 matmuls are slow there and the oracle is defined in float32),
    bfloat16 on a GPU that supports it, else float16."""
    import torch

    if dtype not in DTYPES:
        raise DiffutronError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def prepare_tokenizer(tokenizer):
    """The tokenizer rules the sampler relies on: a mask token is required; ModernBERT-family tokenizers without
    EOS/BOS get eos = bos = pad (as dllm does)."""
    if tokenizer.mask_token_id is None:
        raise DiffutronError(
            "the tokenizer has no mask token; a masked diffusion LM needs one "
            "(set `mask_token` in the tokenizer's config)"
        )
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise DiffutronError("the tokenizer has neither a pad nor an EOS token; set one of them")
    if tokenizer.eos_token_id is None:
        tokenizer.eos_token = tokenizer.pad_token
    if tokenizer.bos_token_id is None:
        tokenizer.bos_token = tokenizer.pad_token if tokenizer.pad_token_id is not None else tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def resolve_model_path(name_or_path: str) -> str:
    """The one model resolver of every command (generate, eval, serve, train): what to hand to
    transformers' from_pretrained for a --model value.

    - a bundled model's short name (BUNDLED_MODELS, e.g. "tiny-tr"): its folder inside the package, so
      it never goes to the hub (a local folder of that name stays reachable as "./tiny-tr");
    - a local path (absolute, starting with "." or "~", or existing): the folder, checked to exist and
      to hold a config.json, with "~" expanded;
    - anything else: a hub id, returned unchanged.

    Raises DiffutronError for a bundled model that is not installed, a missing path or a folder that
    is not a checkpoint.
    """
    return _resolve(name_or_path, need_config=True)


def _resolve(name_or_path: str, need_config: bool) -> str:
    """resolve_model_path; without `need_config` a local folder need not hold a config.json (a tokenizer
    folder, e.g. a LoRA adapter's, has none)."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise DiffutronError(f"model must be a hub id or a local directory, got {name_or_path!r}")
    bundled = BUNDLED_MODELS.get(name_or_path)
    if bundled is not None:
        if not os.path.isfile(os.path.join(bundled, "config.json")):
            raise DiffutronError(
                f"the bundled model {name_or_path!r} is not installed (no checkpoint at {bundled}); "
                "give a hub id or a local model directory instead"
            )
        return bundled
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or os.path.exists(
        name_or_path
    )
    if not looks_local:
        return name_or_path
    path = os.path.expanduser(name_or_path)
    if not os.path.isdir(path):
        raise DiffutronError(f"model path {name_or_path!r} does not exist (or is not a directory)")
    if need_config and not os.path.isfile(os.path.join(path, "config.json")):
        raise DiffutronError(
            f"{name_or_path!r} is not a model directory: it has no config.json "
            "(give a directory written by save_pretrained, or a hub id)"
        )
    return path


def _is_adapter_folder(path: str) -> bool:
    """A local folder with an adapter_config.json (a peft adapter) and no config.json of its own."""
    if path in BUNDLED_MODELS:
        return False
    path = os.path.expanduser(path)
    return os.path.isfile(os.path.join(path, "adapter_config.json")) and not os.path.isfile(
        os.path.join(path, "config.json"))


def check_adapter_path(adapter: str, flag: str = "adapter") -> str:
    """The adapter folder (with "~" expanded), checked to exist and to hold an adapter_config.json:
    before any model loads, one DiffutronError otherwise."""
    if not isinstance(adapter, str) or not adapter.strip():
        raise DiffutronError(f"{flag} must be a LoRA adapter folder, got {adapter!r}")
    path = os.path.expanduser(adapter)
    if not os.path.exists(path):
        raise DiffutronError(f"{flag} {adapter!r} does not exist")
    if not os.path.isdir(path):
        raise DiffutronError(f"{flag} {adapter!r} is not a folder: give a LoRA adapter folder "
                             "(written by `train cpt|sft`, or any peft adapter)")
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        raise DiffutronError(f"{flag} {adapter!r} is not a LoRA adapter (no adapter_config.json)")
    return path


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    name_or_path = _resolve(name_or_path, need_config=False)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:  # missing or corrupt tokenizer files raise library-specific errors
        raise DiffutronError(f"could not load a tokenizer from {name_or_path!r}: {_one_line(exc)}") from exc
    return prepare_tokenizer(tok)


# Size fields of a transformers config: a checkpoint whose config.json gives one of them as anything but
# a positive integer is refused by name before a model is built from it.
_SIZE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings")


def _check_config(config, name_or_path: str) -> None:
    for name in _SIZE_FIELDS:
        if not hasattr(config, name):
            continue
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DiffutronError(
                f"{name_or_path!r} has a broken config.json: {name} must be a positive integer, got {value!r}"
            )


def load_model(
    name_or_path: str | None = None,
    *,
    dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str | None = None,
    adapter: str | None = None,
) -> LoadedModel:
    """Load a masked LM checkpoint and its tokenizer from a hub id, a local directory or a bundled
    model's name (resolve_model_path); DEFAULT_MODEL when none is given.

    `adapter`: a LoRA adapter folder (`train cpt|sft`'s final/ or checkpoint-N/, or any peft LoRA
    adapter) applied to the base `name_or_path`; without a base, the one the adapter's
    adapter_config.json names (base_model_name_or_path, as `train merge` reads it). A folder holding an
    adapter_config.json given as `name_or_path` itself is such an adapter on its recorded base. The
    tokenizer is the adapter's when its folder holds one (as `train merge` saves it), else the base's.

    The adapter is merged into the weights in memory (peft's merge_and_unload, in float32 like `train
    merge`, then cast to `dtype`), never kept as LoRA layers: the model is a plain *ForMaskedLM, with the
    merged checkpoint's logits (the same arithmetic: torch.equal in float32). Why merged: the engine's
    ModernBert (model/modernbert.py) calls the HF modules of Wqkv/Wo/Wi/head.dense, so unmerged LoRA
    layers there would run, but it reads the decoder's and the embeddings' `.weight` tensors raw (the LM
    head, the fused sampler, the runner's embedding lookup), so a LoRA on those would be silently
    ignored; and unmerged LoRA costs two extra matmuls per adapted linear each step. Measured per engine
    step (CPU, float32, 2 threads on a shared machine, batch 1, 64 new tokens in 64 steps, r=8 on
    Wqkv/Wo/Wi, the same tokens either way): tiny-tr, merged 5.2 / 5.9 ms vs LoRA 7.1 / 8.3 ms (two
    runs); a random 4-layer mmBERT is dominated by its 256k-row LM head, which LoRA does not touch, and
    its runs were too noisy under load to rank (110 to 1,390 ms a step either way). Merging costs one
    pass over the adapted weights at load, once.

    Raises DiffutronError for a missing path, a config.json with a field of the wrong type, a checkpoint
    that is not a masked LM, weights that do not load or hold NaN/inf, a tokenizer without a mask token,
    or an adapter that is no adapter folder, names no base when none is given, or does not fit the base
    (another vocabulary, other target modules or shapes), naming both.
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    recorded = None
    if adapter is None and isinstance(name_or_path, str) and _is_adapter_folder(name_or_path):
        adapter, name_or_path = name_or_path, None
    if adapter is not None:
        from .training.merge import adapter_base, check_vocabulary

        adapter = check_adapter_path(adapter)
        recorded = adapter_base(adapter)
        if name_or_path is None and recorded is None:
            raise DiffutronError(f"the adapter {adapter} names no base model (base_model_name_or_path in its "
                                 "adapter_config.json); give the base model with it")
        name_or_path = recorded if name_or_path is None else name_or_path
    given = name_or_path = DEFAULT_MODEL if name_or_path is None else name_or_path
    name_or_path = resolve_model_path(name_or_path)
    if adapter is not None:
        check_vocabulary(adapter, recorded, given, name_or_path, flag="the base")

    import transformers
    from transformers import AutoConfig, AutoModelForMaskedLM

    # Library chatter (download retries, weight-loading bars) would bury our one-line errors.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        import huggingface_hub

        huggingface_hub.utils.logging.set_verbosity_error()
    except (ImportError, AttributeError):
        pass
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except Exception as exc:  # unreadable JSON, an unknown model type, a field of the wrong type (transformers
        # validates types with huggingface_hub's strict dataclasses, whose errors are no ValueError)
        raise DiffutronError(f"could not load a model config from {name_or_path!r}: {_one_line(exc)}") from exc
    _check_config(config, name_or_path)
    if type(config) not in AutoModelForMaskedLM._model_mapping:
        raise DiffutronError(
            f"{name_or_path!r} is a {config.model_type!r} model with no masked-LM head; "
            "Diffutron needs a masked LM such as ModernBertForMaskedLM"
        )
    archs = getattr(config, "architectures", None) or []
    if archs and not any(isinstance(a, str) and a.endswith("ForMaskedLM") for a in archs):
        raise DiffutronError(
            f"{name_or_path!r} holds a {archs[0]}, not a masked LM; "
            "Diffutron needs a *ForMaskedLM checkpoint such as ModernBertForMaskedLM"
        )
    if adapter is not None:
        from .training.merge import adapter_tokenizer

        tokenizer = load_tokenizer(adapter_tokenizer(adapter, name_or_path))
        check_tokenizer_fits(tokenizer, config.vocab_size, f"{adapter} on {given}")
    else:
        tokenizer = load_tokenizer(name_or_path)
        check_tokenizer_fits(tokenizer, config.vocab_size, name_or_path)
    import torch

    # an adapter is merged in float32 (as `train merge` does), the result cast to the dtype asked for
    kwargs = {"dtype": torch.float32 if adapter is not None else torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    except Exception as exc:  # corrupt or truncated weights raise library-specific errors
        raise DiffutronError(f"could not load model weights from {name_or_path!r}: {_one_line(exc)}") from exc
    check_loading_info(info, name_or_path)
    check_weights(model, name_or_path)
    if adapter is not None:
        from .training.merge import apply_adapter

        model = apply_adapter(model, adapter, given).to(torch_dtype)
        check_weights(model, f"{adapter} on {given}")
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, dtype=torch_dtype)


def check_loading_info(info: dict, name_or_path: str) -> None:
    """Refuse a checkpoint that lacks tensors of its architecture (transformers would initialize them at
    random, and the model would answer garbage without a word) or holds tensors the architecture does not
    have (another architecture's, or a broken export), naming them."""
    def names(key: str) -> list[str]:
        return sorted(str(k) for k in (info.get(key) or ()))

    for key, what in (("missing_keys", "lacks"), ("unexpected_keys", "holds tensors its architecture does not have:"),
                      ("mismatched_keys", "has tensors of the wrong shape:")):
        bad = names(key)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise DiffutronError(f"{name_or_path!r} {what} {shown}; the checkpoint does not match its config.json "
                                 "(export or download it again)")
    errors = info.get("error_msgs") or []
    if errors:
        raise DiffutronError(f"could not load model weights from {name_or_path!r}: {_one_line(errors[0])}")


def check_tokenizer_fits(tokenizer, vocab_size: int, name_or_path: str) -> None:
    """Every id the tokenizer can produce, its special tokens first, must be a row of the model's
    embeddings: a mask id past the vocabulary loads fine and fails in the first step."""
    named = {"mask": tokenizer.mask_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
             "bos": tokenizer.bos_token_id, "unk": getattr(tokenizer, "unk_token_id", None)}
    for name, tid in named.items():
        if tid is not None and not 0 <= int(tid) < vocab_size:
            raise DiffutronError(f"{name_or_path!r}: the tokenizer's {name} token id {tid} is outside the model's "
                                 f"vocabulary of {vocab_size:,}; the tokenizer and the model do not belong together")
    special = [i for i in getattr(tokenizer, "all_special_ids", []) or [] if not 0 <= int(i) < vocab_size]
    if special:
        raise DiffutronError(f"{name_or_path!r}: the tokenizer's special token id(s) {special[:5]} are outside the "
                             f"model's vocabulary of {vocab_size:,}")
    if len(tokenizer) > vocab_size:
        raise DiffutronError(f"{name_or_path!r}: the tokenizer has {len(tokenizer):,} tokens but the model's "
                             f"vocabulary has {vocab_size:,}; the tokenizer and the model do not belong together")


def check_weights(model, name_or_path: str) -> None:
    """Refuse weights that hold NaN or inf (they give empty or garbage answers without a word), naming
    the first bad tensor; warn when every weight is zero (finite, so not an error, but the model can
    only give a constant answer). One min/max reduction per tensor (NaN propagates into both, an inf
    shows as one of them), no temporary tensor: 0.05 s for 235M float32 parameters on 2 CPU cores."""
    import warnings

    import torch

    all_zero = True
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point() or p.numel() == 0:
                continue
            lo, hi = (float(v) for v in torch.aminmax(p.detach()))
            if not (math.isfinite(lo) and math.isfinite(hi)):
                bad = int((~torch.isfinite(p)).sum())
                raise DiffutronError(
                    f"{name_or_path!r} has broken weights: {name} holds {bad:,} NaN or infinite value(s) "
                    f"of {p.numel():,}; the checkpoint is corrupt (export or download it again)"
                )
            all_zero = all_zero and lo == hi == 0.0
    if all_zero:
        warnings.warn(f"every weight of {name_or_path!r} is zero: its answers will be empty or constant",
                      DiffutronWarning, stacklevel=3)


def check_context(model_config, total: int) -> None:
    """Raise if a canvas of `total` tokens exceeds the model's context (max_position_embeddings)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit and total > limit:
        raise ContextTooLong(
            f"prompt plus new tokens is {total} tokens, beyond the model's context of {limit}; "
            "shorten the prompt or lower max_new_tokens"
        )


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (library errors often span several)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


# ---------------------------------------------------------------------------------------------------
# Chat template of Diffutron-Instruct (dllm's BERT chat format: plain-text markers, no special tokens)
# ---------------------------------------------------------------------------------------------------

_ROLES = ("system", "user", "assistant")


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render chat messages with Diffutron's template.

    A system message (first only) becomes [SYS]...[/SYS]; each user turn [Question]...[/Question];
    each earlier assistant turn [Answer]...[/Answer]; the generation prompt is "[Answer]\\n".
    """
    if not isinstance(messages, list) or not messages:
        raise DiffutronError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    parts = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise DiffutronError(f"message {i} must be an object with 'role' and 'content'")
        role, content = msg["role"], msg["content"]
        if role not in _ROLES:
            raise DiffutronError(f"message {i} has unknown role {role!r}; use one of: {', '.join(_ROLES)}")
        if not isinstance(content, str):
            raise DiffutronError(f"message {i} content must be a string")
        check_utf8(content, f"message {i} content")
        content = content.strip()
        if role == "system":
            if i != 0:
                raise DiffutronError("a system message may only come first")
            parts.append(f"[SYS]\n{content}\n[/SYS]\n\n")
        elif role == "user":
            parts.append(f"[Question]\n{content}\n[/Question]\n\n")
        else:
            parts.append(f"[Answer]\n{content}\n[/Answer]\n\n")
    if add_generation_prompt:
        parts.append("[Answer]\n")
    return "".join(parts)


def decode_answer(tokenizer, row, prompt_len: int) -> tuple[str, int]:
    """Answer text of one canvas row, recovered as dllm's chat tools do, and its token count.

    Take the row from the prompt's end, cut at the first EOS id, decode without special tokens, cut at
    the end-of-turn string.
    """
    ids = [int(t) for t in row[prompt_len:]]
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: ids.index(eos)]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = text.find(END_OF_TURN)
    text = (text[:cut] if cut != -1 else text).strip()
    # Token count: the shortest prefix of the ids that decodes to the kept text. Prefixes decode to
    # growing texts, so a binary search on the length finds it in O(log n) decodes; a tokenizer whose
    # decoding is not prefix-monotone falls back to the linear scan.
    def prefix(k: int) -> str:
        return tokenizer.decode(ids[:k], skip_special_tokens=True).strip()

    lo, hi = 0, len(ids)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(prefix(mid)) >= len(text):
            hi = mid
        else:
            lo = mid + 1
    n = lo
    if prefix(n) != text:
        n = 0
        while n < len(ids) and prefix(n) != text:
            n += 1
    special = set(tokenizer.all_special_ids)
    return text, sum(1 for t in ids[:n] if t not in special)
