"""The server's layers without a server: request parsing by declared type, the --fast defaults, the
configuration's bounds, the batch gauge, the key's sources. Fast: no process, no HTTP."""

import argparse
import time

import pytest

from diffutron_engine.config import SamplingParams
from diffutron_engine.errors import DiffutronError
from diffutron_engine.server.config import ServerConfig
from diffutron_engine.server.protocol import ApiError, parse_json, parse_request

CONFIG = ServerConfig(model_name="tiny-tr")


def _parse(body, chat=False, config=CONFIG):
    return parse_request(body, chat=chat, config=config)


def _refused(body, chat=False, config=CONFIG, status=400):
    with pytest.raises(ApiError) as info:
        _parse(body, chat, config)
    assert info.value.status == status, info.value.body
    return info.value.body["error"]


def test_fields_are_checked_by_their_declared_types():
    for key, value in (("early_stop", "no"), ("early_stop", 0), ("stochastic_transfer", "false"),
                       ("right_shift_logits", 1), ("steps", 8.0), ("steps", "8"), ("steps", True), ("block_size", []),
                       ("temperature", "0"), ("cfg_scale", "1"), ("suppress_tokens", [1.5]),
                       ("suppress_tokens", [False]), ("stop", 3), ("stop", {"a": 1}), ("stream", "yes"),
                       ("n", 2.0), ("seed", "1"), ("max_tokens", "4"), ("stream_options", "x"), ("user", 5),
                       ("model", 1), ("remasking", 3)):
        error = _refused({"prompt": "x", key: value})
        assert error["param"] == key, (key, value, error)
    assert _parse({"prompt": "x", "early_stop": False}).params.early_stop is False
    assert _parse({"prompt": "x", "temperature": 1}).params.temperature == 1.0  # an int is a number
    assert _parse({"prompt": "x", "steps": None}).params.steps == SamplingParams().steps  # null: not given
    assert _parse({"prompt": "x", "threshold": None}).params.threshold is None  # null of an optional knob


def test_the_prompt_and_the_messages_belong_to_their_endpoints():
    assert _refused({"prompt": "x"}, chat=True)["param"] == "prompt"
    assert _refused({"messages": [{"role": "user", "content": "x"}]})["param"] == "messages"
    for prompt in ("", "  \n", ["ok", " "], [], [1, 2], 5, {"a": 1}, "\ud800", ["x", "a\udfffb"]):
        assert _refused({"prompt": prompt})["param"] == "prompt", prompt
    for messages in ("hi", [], [1], [{"role": "user"}], [{"role": 1, "content": "x"}],
                     [{"role": "user", "content": 5}], [{"role": "user", "content": " "}],
                     [{"role": "user", "content": [{"type": "image_url"}]}]):
        assert _refused({"messages": messages}, chat=True)["param"] == "messages", messages
    parts = _parse({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                              {"type": "text", "text": "b"}]}]}, chat=True)
    assert parts.prompts == [[{"role": "user", "content": "ab"}]]


def test_counts_and_sizes_are_checked_before_any_tokenizing():
    t = time.perf_counter()
    error = _refused({"prompt": ["a"] * 100_000})
    assert "at most 256 prompts x n" in error["message"] and time.perf_counter() - t < 0.5
    assert "at most 256" in _refused({"prompt": ["a"] * 20, "n": 16})["message"]
    assert _refused({"prompt": "x", "n": 17})["param"] == "n"
    small = CONFIG.replace(max_prompt_bytes=10)
    assert "11 bytes; at most 10" in _refused({"prompt": "a" * 11}, config=small)["message"]
    assert _parse({"prompt": "é" * 5}, config=small).prompts == ["é" * 5]  # 10 bytes
    assert _refused({"prompt": "x", "model": "gpt-4"}, status=404)["code"] == "model_not_found"


def test_float_knobs_float32_cannot_hold_are_refused_by_name():
    for key, value in (("repetition_penalty", 1e-320), ("cfg_scale", 1e308), ("factor", 1e39),
                       ("threshold", 1e-320), ("temperature", 1e-300), ("cfg_scale", 10**400)):
        error = _refused({"prompt": "x", key: value})
        assert error["param"] == key and key in error["message"], (key, error)
    for key, value in (("repetition_penalty", 1e-30), ("cfg_scale", 3e38), ("temperature", 1e-30)):
        assert getattr(_parse({"prompt": "x", key: value}).params, key) == value
    with pytest.raises(DiffutronError, match="early_stop must be true or false"):
        SamplingParams(early_stop="no")


def test_openai_fields_map_to_the_engine_and_bounds_are_refused():
    assert _parse({"prompt": "x", "stop": "</s>"}).params.stop_strings == ["</s>"]
    params = _parse({"prompt": "x", "stop": ["a", "b"], "max_tokens": 5, "seed": 3, "temperature": 0.5}).params
    assert (params.stop_strings, params.max_new_tokens, params.seed, params.temperature) == (["a", "b"], 5, 3, 0.5)
    assert _parse({"prompt": "x", "max_completion_tokens": 6, "max_tokens": 5}).params.max_new_tokens == 6
    for body, message in (({"temperature": 1e308}, "temperature must be <= 100"),
                          ({"steps": 10**8}, "steps must be <= 16,384"),
                          ({"max_tokens": 0}, "max_tokens must be >= 1")):
        error = _refused({"prompt": "x", **body})
        assert message in error["message"], error


def test_stream_options_and_neutral_openai_fields():
    req = _parse({"prompt": "x", "stream": True, "stream_options": {"include_usage": True}})
    assert req.stream and req.include_usage
    assert _refused({"prompt": "x", "stream_options": {"include_usage": 1}})["param"] == "stream_options"
    assert _refused({"prompt": "x", "stream_options": {"other": True}})["param"] == "stream_options"
    assert _parse({"prompt": "x", "top_p": 1, "logprobs": None, "frequency_penalty": 0, "user": "u"}).n == 1
    assert _refused({"prompt": "x", "top_p": 0.5})["param"] == "top_p"
    assert _refused({"prompt": "x", "max_new_tokens": 4})["message"].endswith("(use 'max_tokens')")
    assert _refused({"prompt": "x", "nonsense": 1})["param"] == "nonsense"


def test_fast_defaults_apply_and_a_request_can_replace_them():
    from diffutron_engine.cli.serve import add_parser, server_config

    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers())
    fast = server_config(ap.parse_args(["serve", "--fast", "--model", "tiny-tr"]))
    assert fast.defaults == {"threshold": 0.9}
    assert _parse({"prompt": "x"}, config=fast).params.threshold == 0.9
    assert _parse({"prompt": "x", "threshold": None}, config=fast).params.threshold is None  # exact on request
    own = _parse({"prompt": "x", "factor": 2.0}, config=fast).params
    assert own.factor == 2.0 and own.threshold is None  # the request's rule replaces the default one
    assert server_config(ap.parse_args(["serve", "--model", "tiny-tr"])).defaults == {}
    # generate --fast reads the same pair
    from diffutron_engine.cli import generate
    from diffutron_engine.cli.main import build_parser
    from diffutron_engine.config import FAST

    from diffutron_engine.cli.engine_args import engine_config

    params, engine = generate.settings(build_parser().parse_args(["generate", "x", "--fast"]))
    assert engine.cache == FAST.engine["cache"] and params.threshold == FAST.request["threshold"] == fast.defaults["threshold"]
    served = engine_config(ap.parse_args(["serve", "--fast", "--model", "tiny-tr"]), max_batch=engine.max_batch)
    assert served == engine  # the same EngineConfig: cache, graphs, fused head, dtype, device


def test_json_bodies():
    assert parse_json(b'{"prompt": "x"}') == {"prompt": "x"}
    for raw in (b"", b"{", b"[1]", b"null", b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b"1" * 5000,
                b'{"a": NaN'):
        with pytest.raises(ApiError) as info:
            parse_json(raw)
        assert info.value.status == 400


def test_server_config_bounds():
    for kwargs in (dict(max_queue=0), dict(max_body_bytes=True), dict(timeout_body=float("nan")),
                   dict(drain_timeout=-1), dict(api_key=""), dict(api_key="a b"), dict(api_key="ключ"),
                   dict(model_name="")):
        with pytest.raises(DiffutronError):
            ServerConfig(**kwargs)
    assert "sekret" not in repr(ServerConfig(api_key="sekret"))


def test_the_batch_gauge_counts_running_rows_only():
    """Twenty requests on two rows, fifteen aborted at once: the step that reports the fifteen aborts
    leaves at most two rows running, and the gauge says so (it once counted the step's outputs)."""
    from diffutron_engine import Engine
    from diffutron_engine.server.loop import EngineLoop

    engine = Engine.from_pretrained("tiny-tr", max_batch=2)
    loop = EngineLoop(engine)
    seen = []
    deliver = loop._deliver
    loop._deliver = lambda outputs: (seen.append((loop.stats.running, len(outputs))), deliver(outputs))
    ids = [engine.add_request(f"Bu işlev {i}", SamplingParams(max_new_tokens=4, steps=4, block_size=4))
           for i in range(20)]
    for rid in ids[5:]:
        engine.abort(rid)
    loop.start()
    deadline = time.time() + 60
    while engine.has_unfinished() and time.time() < deadline:
        time.sleep(0.01)
    loop.stop(timeout=10)
    assert not engine.has_unfinished()
    assert max(outputs for _, outputs in seen) >= 15  # the aborts were reported in one step
    assert max(running for running, _ in seen) <= 2


def test_the_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from diffutron_engine.cli.serve import read_api_key

    def args(**kw):
        return argparse.Namespace(**{"api_key": None, "api_key_file": None, **kw})

    monkeypatch.delenv("DIFFUTRON_API_KEY", raising=False)
    assert read_api_key(args()) is None
    monkeypatch.setenv("DIFFUTRON_API_KEY", "from-env")
    assert read_api_key(args()) == "from-env"
    key = tmp_path / "key"
    key.write_text("from-file\nsecond line ignored\n")
    key.chmod(0o600)
    assert read_api_key(args(api_key_file=str(key))) == "from-file"  # a file beats the environment
    key.chmod(0o644)
    with pytest.warns(Warning, match="can be read by other users"):
        read_api_key(args(api_key_file=str(key)))
    with pytest.warns(Warning, match="process list"):
        assert read_api_key(args(api_key="k")) == "k"
    big = tmp_path / "big"
    big.write_bytes(b"k" * 5000)
    for bad in (args(api_key_file=str(big)), args(api_key_file=str(tmp_path)), args(api_key_file=str(key), api_key="k")):
        with pytest.raises(DiffutronError):
            read_api_key(bad)
