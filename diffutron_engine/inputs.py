"""Prompts the engine understands, as vLLM's inputs: what a caller passes, turned into token ids in one
place (here), so that the command line, the server and the lm-eval model hand prompts over as they are.

    "Merhaba"                                   text, answered as one user turn of the chat template
    TextPrompt(prompt="Merhaba", chat_template=False)   the text as it is (completions, likelihoods)
    ChatPrompt(messages=[{"role": "user", "content": "Merhaba"}])   chat messages, with the template
    [{"role": "user", "content": "Merhaba"}]    the same, as a plain list
    TokensPrompt(prompt_token_ids=[5, 6, 7])    token ids, used as they are
    [5, 6, 7] (or a 1-D tensor of ids)          the same

The template adds no [CLS]/[SEP]: the tokenizer never adds special tokens. Torch-free.
"""

from __future__ import annotations

import operator
from typing import TypedDict, Union

from .errors import DiffutronError, check_utf8


class _Text(TypedDict):
    prompt: str


class TextPrompt(_Text, total=False):
    chat_template: bool  # default True: the text is one user turn of the chat template


class ChatPrompt(TypedDict):
    messages: list[dict]


class TokensPrompt(TypedDict):
    prompt_token_ids: list[int]


Prompt = Union[str, list, TextPrompt, ChatPrompt, TokensPrompt]

_KEYS = {"prompt": ("prompt", "chat_template"), "messages": ("messages",), "prompt_token_ids": ("prompt_token_ids",)}


def prompt_ids(tokenizer, prompt, vocab_size: int) -> list[int]:
    """The token ids of one prompt (any form above), each within [0, vocab_size); bad input raises one
    DiffutronError naming what is wrong."""
    if isinstance(prompt, dict):
        kind = next((k for k in _KEYS if k in prompt), None)
        if kind is None or set(prompt) - set(_KEYS[kind]):
            extra = sorted(set(prompt) - set(_KEYS.get(kind, ())))
            raise DiffutronError("a prompt object holds one of 'prompt' (with 'chat_template'), 'messages' or "
                                 f"'prompt_token_ids'; got keys {', '.join(map(repr, extra or prompt))}"[:300])
        if kind == "prompt":
            chat = prompt.get("chat_template", True)
            if chat is not True and chat is not False:
                raise DiffutronError(f"chat_template must be true or false, got {chat!r:.60}")
            if not isinstance(prompt["prompt"], str):
                raise DiffutronError(f"'prompt' must be a string, got {type(prompt['prompt']).__name__}")
            return encode_text(tokenizer, prompt["prompt"], chat=chat)
        if kind == "messages":
            return encode_chat(tokenizer, prompt["messages"])
        return _checked_ids(prompt["prompt_token_ids"], vocab_size)
    if isinstance(prompt, str):
        return encode_text(tokenizer, prompt, chat=True)
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        return encode_chat(tokenizer, list(prompt))
    return _checked_ids(prompt, vocab_size)


def encode_text(tokenizer, text: str, chat: bool = True) -> list[int]:
    """Token ids of a text: wrapped as one user turn of the chat template when `chat`, else as it is."""
    from .loading import render_chat

    check_utf8(text, "the prompt")
    if not text.strip():
        raise DiffutronError("empty prompt: give some text to answer")
    return tokenizer.encode(render_chat([{"role": "user", "content": text}]) if chat else text,
                            add_special_tokens=False)


def encode_chat(tokenizer, messages) -> list[int]:
    """Token ids of chat messages rendered with Diffutron-Instruct's template, ending in the answer's turn."""
    from .loading import render_chat

    if not isinstance(messages, list) or not any(isinstance(m, dict) and str(m.get("content", "")).strip()
                                                 for m in messages):
        raise DiffutronError("empty prompt: the messages have no content")
    return tokenizer.encode(render_chat(messages), add_special_tokens=False)


def _checked_ids(prompt, vocab_size: int) -> list[int]:
    if isinstance(prompt, (str, bytes, dict)):
        raise DiffutronError("a prompt must be a string, chat messages, or a sequence of token ids")
    try:
        values = prompt.tolist() if hasattr(prompt, "tolist") else list(prompt)
        if not isinstance(values, list):  # a 0-d tensor's tolist() is a number
            raise TypeError
        ids = [operator.index(t) if not isinstance(t, bool) else _not_an_id() for t in values]
    except (TypeError, ValueError):
        raise DiffutronError("a prompt must be a string, chat messages, or a sequence of token ids") from None
    if any(t < 0 or t >= vocab_size for t in ids):
        raise DiffutronError(f"prompt has token ids outside the vocabulary [0, {vocab_size})")
    return ids


def _not_an_id():
    raise TypeError
