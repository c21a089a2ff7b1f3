"""Prompts the engine understands (diffutron_engine.inputs): every form gives the ids the others give
for the same content, and bad prompts are one line naming the problem (and, in a call of several, the
prompt's index)."""

import pytest
import torch

from diffutron_engine import ChatPrompt, DiffutronError, Engine, SamplingParams, TextPrompt, TokensPrompt
from diffutron_engine.errors import PromptError
from diffutron_engine.inputs import encode_chat, encode_text, prompt_ids
from diffutron_engine.loading import render_chat


def test_every_form_reads_as_its_ids(golden):
    tok, vocab = golden.tokenizer, golden.model.config.vocab_size
    chat = tok.encode(render_chat([{"role": "user", "content": "merhaba"}]), add_special_tokens=False)
    raw = tok.encode("merhaba", add_special_tokens=False)
    assert prompt_ids(tok, "merhaba", vocab) == chat == encode_text(tok, "merhaba")
    assert prompt_ids(tok, TextPrompt(prompt="merhaba"), vocab) == chat
    assert prompt_ids(tok, TextPrompt(prompt="merhaba", chat_template=False), vocab) == raw
    messages = [{"role": "user", "content": "merhaba"}]
    assert prompt_ids(tok, messages, vocab) == prompt_ids(tok, ChatPrompt(messages=messages), vocab) == chat
    assert encode_chat(tok, messages) == chat
    assert prompt_ids(tok, TokensPrompt(prompt_token_ids=raw), vocab) == raw
    assert prompt_ids(tok, raw, vocab) == prompt_ids(tok, torch.tensor(raw), vocab) == raw


@pytest.mark.parametrize("prompt,message", [
    ({"prompt": "x", "chat": False}, "got keys 'chat'"),
    ({"text": "x"}, "a prompt object holds one of"),
    ({"prompt": 5}, "'prompt' must be a string"),
    ({"prompt": "x", "chat_template": "no"}, "chat_template must be true or false"),
    ({"prompt": "  "}, "empty prompt"),
    ({"messages": []}, "empty prompt: the messages have no content"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role 'robot'"),
    ({"prompt_token_ids": [1, 10**9]}, "outside the vocabulary"),
    ({"prompt_token_ids": [1, 2.5]}, "a sequence of token ids"),
    ([1, True], "a sequence of token ids"),
    (b"bytes", "a prompt must be a string"),
    (7, "a sequence of token ids"),
    (torch.tensor(3), "a sequence of token ids"),
])
def test_bad_prompts_are_one_line(golden, prompt, message):
    with pytest.raises(DiffutronError, match=message):
        prompt_ids(golden.tokenizer, prompt, golden.model.config.vocab_size)


def test_the_engine_reads_every_form_and_names_a_bad_prompt_by_index(golden):
    engine = Engine(golden.model, golden.tokenizer, max_batch=3)
    params = SamplingParams(max_new_tokens=4, steps=4, block_size=4, seed=1)
    ids = engine.encode(TextPrompt(prompt="merhaba", chat_template=False))
    outs = engine.generate([TextPrompt(prompt="merhaba", chat_template=False), TokensPrompt(prompt_token_ids=ids),
                            ids], [params] * 3)
    assert outs[0].tokens == outs[1].tokens == outs[2].tokens
    # the context is checked once, in the engine, and the bad prompt is named by its index
    with pytest.raises(PromptError, match=r"prompt 2: prompt plus new tokens is \d+ tokens, beyond the model's "
                                          "context") as info:
        long = ids * (golden.model.config.max_position_embeddings // len(ids) + 1)
        engine.generate([ids, long], SamplingParams(max_new_tokens=4, steps=4, block_size=4))
    assert info.value.index == 1 and "beyond" in info.value.reason
    assert not engine.has_unfinished()  # all or none: the good prompt was not queued either


def test_a_parameter_problem_is_not_blamed_on_a_prompt(golden):
    """Only what is wrong with a prompt itself (its text, ids, the context) names the prompt; a bad
    parameter is the call's, one DiffutronError as it is."""
    engine = Engine(golden.model, golden.tokenizer, max_batch=2)
    bad = SamplingParams(max_new_tokens=4, steps=4, block_size=4, suppress_tokens=[10**6])
    with pytest.raises(DiffutronError, match=r"^suppress_tokens has ids outside") as info:
        engine.generate([[5, 6], [7, 8]], bad)
    assert not isinstance(info.value, PromptError)
    with pytest.raises(PromptError, match=r"^prompt 2: empty prompt") as info:
        engine.generate(["merhaba", " "], SamplingParams(max_new_tokens=4, steps=4, block_size=4))
    assert info.value.index == 1 and not info.value.too_long
    with pytest.raises(DiffutronError, match=r"^empty prompt") as info:  # one prompt, added alone: no index
        engine.add_request(" ")
    assert not isinstance(info.value, PromptError)
