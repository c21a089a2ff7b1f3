"""The API's wire format: request bodies parsed and validated by declared type, the response and chunk
builders, and errors in OpenAI's shape for every status. No I/O, no engine: the serving layer calls
these, and everything here is cheap (no tokenizing), so it runs before any costly work."""

from __future__ import annotations

import json
import typing
from dataclasses import dataclass

from .. import jsonio
from ..bounded import show
from ..config import SamplingParams, with_defaults
from ..errors import DiffutronError, check_utf8
from .config import ServerConfig

# OpenAI's error type for each status (the `type` field of the error object)
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                405: "invalid_request_error", 408: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error"}


class ApiError(Exception):
    """An answer with a status and OpenAI's error object; raised anywhere below the routes."""

    def __init__(self, status: int, message: str, type_: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status = status
        self.body = error_body(status, message, type_, param, code)


def error_body(status: int, message: str, type_: str | None = None, param: str | None = None,
               code: str | None = None) -> dict:
    kind = type_ or _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------- parsing
# The OpenAI fields each endpoint takes (besides any SamplingParams field as an extra), with the JSON
# types they accept; None is accepted for every one and means "not given".
_COMMON = {"model": str, "max_tokens": int, "max_completion_tokens": int, "temperature": float, "seed": int,
           "stop": (str, list), "n": int, "stream": bool, "stream_options": dict, "user": str}
_FIELDS = {False: {**_COMMON, "prompt": (str, list)}, True: {**_COMMON, "messages": list}}

# OpenAI fields with no diffusion counterpart: accepted at their neutral values (clients send them by
# default), refused with a clear message otherwise
NEUTRAL = {"top_p": (1, 1.0), "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False,),
           "top_logprobs": (0,), "echo": (False,), "best_of": (1,), "logit_bias": ({},), "suffix": (),
           "parallel_tool_calls": (False,), "tools": ([],), "tool_choice": ("none",),
           "response_format": ({"type": "text"},),
           "modalities": (["text"],), "store": (False,), "metadata": ({},)}

# The JSON types of SamplingParams' fields, from their declarations (one source of truth: a field added
# there is accepted here with its declared type)
_HINTS = typing.get_type_hints(SamplingParams)
# fields that are the API's under OpenAI's names, not extras
_RENAMED = {"max_new_tokens": "max_tokens", "stop_strings": "stop"}


@dataclass
class CompletionRequest:
    """A validated request: what the serving layer needs, nothing tokenized yet."""

    chat: bool
    prompts: list  # strings (completions) or one list of messages (chat)
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool

    @property
    def size(self) -> int:
        """Engine requests it becomes."""
        return len(self.prompts) * self.n


def parse_json(raw: bytes) -> dict:
    try:
        body = jsonio.parse_json(raw, "the request body")
    except DiffutronError as exc:  # not UTF-8, malformed, nested too deeply, an integer too long to convert
        raise ApiError(400, str(exc)) from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def parse_request(body: dict, *, chat: bool, config: ServerConfig) -> CompletionRequest:
    """Validate a parsed body for /v1/completions (chat=False) or /v1/chat/completions (chat=True).
    Every check is cheap and comes before tokenizing: types, ranges, counts, sizes."""
    openai, knobs = _split_fields(body, chat)
    if openai.get("model") not in (None, config.model_name):
        raise ApiError(404, f"the model {openai['model']!r:.100} does not exist; this server serves "
                       f"{config.model_name!r}", param="model", code="model_not_found")
    n = 1 if openai.get("n") is None else openai["n"]
    if not 1 <= n <= config.max_n:
        raise ApiError(400, f"n must be in [1, {config.max_n}], got {n}", param="n")
    prompts = _messages(openai.get("messages")) if chat else _prompts(openai.get("prompt"))
    if len(prompts) * n > config.max_queue:  # could never fit, however idle the server
        raise ApiError(400, f"a request holds at most {config.max_queue} prompts x n (the server's queue), got "
                       f"{len(prompts)} x {n}", param="messages" if chat else "prompt")
    for i, p in enumerate(prompts):
        _check_prompt(i, p, chat, config.max_prompt_bytes)
    stream = bool(openai.get("stream"))  # declared bool: True, False or None
    options = openai.get("stream_options") or {}
    unknown = sorted(set(options) - {"include_usage"})
    if unknown:
        raise ApiError(400, f"unknown stream_options field {unknown[0]!r:.60} (include_usage is known)",
                       param="stream_options")
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise ApiError(400, f"stream_options.include_usage must be true or false, got {include_usage!r:.60}",
                       param="stream_options")
    return CompletionRequest(chat=chat, prompts=prompts, params=_params(openai, knobs, config.defaults), n=n,
                             stream=stream, include_usage=bool(include_usage))


def _split_fields(body: dict, chat: bool) -> tuple[dict, dict]:
    """OpenAI fields (type-checked) and engine knobs (type-checked by SamplingParams' declarations)."""
    known = _FIELDS[chat]
    openai, knobs = {}, {}
    for key, value in body.items():
        if key in known:
            if value is not None and not _is(value, known[key]):
                raise ApiError(400, f"{key} must be {_describe(known[key])}, got {_short(value)}", param=key)
            openai[key] = value
        elif key in _FIELDS[not chat]:  # the other endpoint's field: say so, never ignore it
            other = "/v1/completions" if chat else "/v1/chat/completions"
            raise ApiError(400, f"{key!r} belongs to {other}; this endpoint takes "
                           f"{'messages' if chat else 'prompt'}", param=key)
        elif key in NEUTRAL:
            if value is not None and not any(value == v and type(value) is type(v) for v in NEUTRAL[key]):
                raise ApiError(400, f"{key}={_short(value)} is not supported by a masked diffusion sampler "
                               "(leave it out; repetition_penalty, temperature and the commit rules are)",
                               param=key)
        elif key in _HINTS and key not in _RENAMED:
            if value is not None or _optional(_HINTS[key]):
                if not _matches(value, _HINTS[key]):
                    raise ApiError(400, f"{key} must be {_describe_hint(_HINTS[key])}, got {_short(value)}",
                                   param=key)
                knobs[key] = value
        else:
            hint = f" (use {_RENAMED[key]!r})" if key in _RENAMED else ""
            raise ApiError(400, f"unknown field {key!r:.60}{hint}", param=key[:60])
    return openai, knobs


def _params(openai: dict, knobs: dict, defaults: dict) -> SamplingParams:
    fields_ = with_defaults(defaults, knobs)  # a rule the request gives replaces the default one
    max_tokens = openai.get("max_completion_tokens", openai.get("max_tokens"))
    if max_tokens is not None:
        fields_["max_new_tokens"] = max_tokens
    for key in ("temperature", "seed"):
        if openai.get(key) is not None:
            fields_[key] = openai[key]
    if openai.get("stop") is not None:
        stop = openai["stop"]
        if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
            raise ApiError(400, "stop must be a string or a list of strings", param="stop")
        fields_["stop_strings"] = stop
    try:
        return SamplingParams(**fields_)
    except DiffutronError as exc:  # in the API's names
        message = str(exc).replace("max_new_tokens", "max_tokens").replace("stop_strings", "stop")
        raise ApiError(400, message, param=_param_of(message, fields_)) from None


def _param_of(message: str, given: dict) -> str | None:
    for key in sorted(given, key=len, reverse=True):
        name = _RENAMED.get(key, key)
        if message.startswith(name):
            return name
    return None


def _prompts(prompt) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts:
        raise ApiError(400, "prompt must be a non-empty string or a non-empty list of them", param="prompt")
    if not all(isinstance(p, str) for p in prompts):
        raise ApiError(400, "prompt must be a string or a list of strings (token ids are not taken)",
                       param="prompt")
    return prompts


def _messages(messages) -> list[list[dict]]:
    """One conversation; a message's content is a string or a list of text parts (joined)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ApiError(400, f'message {i} must be an object with a string "role" and a "content"',
                           param="messages")
        content = m["content"]
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f'message {i}: content parts must be {{"type": "text", "text": ...}} '
                               "(this model reads text only)", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"message {i}: content must be a string or a list of text parts",
                           param="messages")
        out.append({"role": m["role"], "content": content})
    return [out]


def _check_prompt(i: int, prompt, chat: bool, max_bytes: int) -> None:
    """Size, UTF-8 and emptiness, before any tokenizing."""
    texts = [m["content"] for m in prompt] if chat else [prompt]
    param = "messages" if chat else "prompt"
    size = 0
    for text in texts:
        try:
            check_utf8(text, "the messages" if chat else f"prompt {i}")
        except DiffutronError as exc:
            raise ApiError(400, str(exc), param=param) from None
        size += len(text.encode("utf-8"))
    if size > max_bytes:
        what = "the messages are" if chat else f"prompt {i} is"
        raise ApiError(400, f"{what} {size:,} bytes; at most {max_bytes:,} (--max-prompt-bytes)", param=param)
    if not any(t.strip() for t in texts):
        raise ApiError(400, "empty prompt: the messages have no content" if chat else
                       f"empty prompt: prompt {i} has no text", param=param)


# JSON type checks: bool is not an int, an int is a float; a list's items are checked by declaration
def _is(value, types) -> bool:
    types = types if isinstance(types, tuple) else (types,)
    for t in types:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if t not in (int, float) and isinstance(value, t):
            return True
    return False


def _optional(hint) -> bool:
    return type(None) in typing.get_args(hint)


def _matches(value, hint) -> bool:
    """Whether a JSON value fits a declared type (int, float, bool, str, list[...], X | None)."""
    if value is None:
        return _optional(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if args:  # a union
        return any(_matches(value, a) for a in args if a is not type(None))
    if hint is bool:
        return isinstance(value, bool)
    return _is(value, hint)


_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
          dict: "an object"}


def _describe(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join(_NAMES[t] for t in types)


def _describe_hint(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return f"a list of {_describe_hint(args[0]).split(' ', 1)[1]}s"
    if args:
        return " or ".join(_describe_hint(a) if a is not type(None) else "null" for a in args)
    return _NAMES.get(hint, str(hint))


def _short(value) -> str:
    """A value of the body as its sender spelled it (JSON), cut to one short line."""
    return show(value, as_json=True)


# ------------------------------------------------------------------------------------------- responses
def finish_reason(out) -> str:
    return {"abort": "abort", "answer ended": "stop"}.get(out.finish_reason, "length")


def choice(index: int, text: str, reason: str | None, chat: bool) -> dict:
    if chat:
        return {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
    return {"index": index, "text": text, "logprobs": None, "finish_reason": reason}


def delta_choice(index: int, text: str, reason: str | None, chat: bool) -> dict:
    if chat:
        return {"index": index, "delta": {"content": text}, "finish_reason": reason}
    return choice(index, text, reason, chat=False)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(rid: str, created: int, model: str, choices: list, usage_: dict, chat: bool) -> dict:
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": choices, "usage": usage_}


def chunk(rid: str, created: int, model: str, choices: list, chat: bool, usage_: dict | None = None) -> dict:
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def sse(payload: dict | str) -> bytes:
    """One server-sent event: a JSON payload, or the literal [DONE]."""
    return b"data: " + (payload if isinstance(payload, str) else json.dumps(payload)).encode() + b"\n\n"
