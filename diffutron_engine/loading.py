"""Loading Diffutron-family checkpoints (any masked LM, ModernBERT first) with their tokenizer, the
tokenizer rules of the spec, and Diffutron-Instruct's chat template."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import DiffutronError

DEFAULT_MODEL = "diffutron/DiffutronLM-0.3B-Instruct"
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")

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
    """The spec's tokenizer rules: a mask token is required; ModernBERT-family tokenizers without
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


def _resolve_bundled(name_or_path: str) -> str:
    """The directory of a bundled model's short name; any other name is returned unchanged."""
    path = BUNDLED_MODELS.get(name_or_path)
    if path is None:
        return name_or_path
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise DiffutronError(
            f"the bundled model {name_or_path!r} is not installed (no checkpoint at {path}); "
            "give a hub id or a local model directory instead"
        )
    return path


def resolve_model_path(name_or_path: str) -> str:
    """What every command loads for --model: a bundled model's folder for its short name (tiny-tr), else
    the local folder or hub id as given."""
    return _resolve_bundled(name_or_path)


def check_finite(model, name: str) -> None:
    """Refuse weights that hold NaN or inf (they would only give empty or garbage answers): one
    DiffutronError naming the first bad tensor."""
    import torch

    for pname, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise DiffutronError(f"the weights of {name!r} hold NaN or inf values (first in {pname}): the "
                                 "checkpoint is corrupt or was saved from a diverged run; use another one")


def _check_local_path(name_or_path: str) -> None:
    looks_local = os.path.isabs(name_or_path) or name_or_path.startswith((".", "~")) or os.path.exists(
        name_or_path
    )
    if looks_local:
        path = os.path.expanduser(name_or_path)
        if not os.path.isdir(path):
            raise DiffutronError(f"model path {name_or_path!r} does not exist (or is not a directory)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise DiffutronError(
                f"{name_or_path!r} is not a model directory: it has no config.json "
                "(give a directory written by save_pretrained, or a hub id)"
            )


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    name_or_path = _resolve_bundled(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as exc:  # missing or corrupt tokenizer files raise library-specific errors
        raise DiffutronError(f"could not load a tokenizer from {name_or_path!r}: {_first_line(exc)}") from exc
    return prepare_tokenizer(tok)


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str | None = None,
) -> LoadedModel:
    """Load a masked LM checkpoint and its tokenizer from a hub id or a local directory.

    Raises DiffutronError for a missing path, a checkpoint that is not a masked LM, or a tokenizer
    without a mask token.
    """
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    name_or_path = _resolve_bundled(name_or_path)
    _check_local_path(name_or_path)

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
    except (OSError, ValueError) as exc:
        raise DiffutronError(f"could not load a model config from {name_or_path!r}: {_first_line(exc)}") from exc
    if type(config) not in AutoModelForMaskedLM._model_mapping:
        raise DiffutronError(
            f"{name_or_path!r} is a {config.model_type!r} model with no masked-LM head; "
            "Diffutron needs a masked LM such as ModernBertForMaskedLM"
        )
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith("ForMaskedLM") for a in archs):
        raise DiffutronError(
            f"{name_or_path!r} holds a {archs[0]}, not a masked LM; "
            "Diffutron needs a *ForMaskedLM checkpoint such as ModernBertForMaskedLM"
        )
    tokenizer = load_tokenizer(name_or_path)
    kwargs = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForMaskedLM.from_pretrained(name_or_path, **kwargs)
    except Exception as exc:  # corrupt or truncated weights raise library-specific errors
        raise DiffutronError(f"could not load model weights from {name_or_path!r}: {_first_line(exc)}") from exc
    model.to(device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, device=device, dtype=torch_dtype)


def check_context(model_config, total: int) -> None:
    """Raise if a canvas of `total` tokens exceeds the model's context (max_position_embeddings)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit and total > limit:
        raise DiffutronError(
            f"prompt plus new tokens is {total} tokens, beyond the model's context of {limit}; "
            "shorten the prompt or lower max_new_tokens"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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


def encode_prompt(tokenizer, prompt: str | list[dict], chat: bool = True) -> list[int]:
    """Token ids of one prompt: a string (wrapped as one user turn when `chat`) or chat messages."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise DiffutronError("empty prompt: give some text to answer")
        text = render_chat([{"role": "user", "content": prompt}]) if chat else prompt
    else:
        if not any(isinstance(m, dict) and str(m.get("content", "")).strip() for m in prompt or []):
            raise DiffutronError("empty prompt: the messages have no content")
        text = render_chat(prompt)
    # The template adds no [CLS]/[SEP]: never let the tokenizer add special tokens.
    return tokenizer.encode(text, add_special_tokens=False)


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
