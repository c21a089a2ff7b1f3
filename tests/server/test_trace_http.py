"""The per-step trace over HTTP (server/trace.py), without a browser: a real `serve --model tiny-tr`,
requests giving "trace": true streamed and not, the canvas redrawn from the wire as the format says, and
requests without it answered as before."""

import json
import urllib.request

import pytest
from serve_util import redraw

# a server process per module (model load included): the slow tier, like test_server.py
pytestmark = [pytest.mark.slow, pytest.mark.needs("openai", "fastapi", "uvicorn")]

BODY = {"prompt": "Bu işlev", "max_tokens": 24, "steps": 24, "block_size": 8, "temperature": 0.7, "seed": 7,
        "early_stop": False}


def stream(server, path: str, body: dict) -> list[dict]:
    """The payloads of a streamed answer, [DONE] included as the string."""
    req = urllib.request.Request(server.url + path, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.status == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = r.read().decode().split("\n\n")
    out = []
    for event in filter(None, events):
        assert event.startswith("data: "), event
        data = event[len("data: "):]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.fixture(scope="module")
def server(open_server):
    return open_server


@pytest.fixture(scope="module")
def tokenizer():
    from diffutron_engine.loading import load_tokenizer, prepare_tokenizer

    return prepare_tokenizer(load_tokenizer("tiny-tr"))


def test_a_streamed_trace_redraws_to_the_final_canvas(server, tokenizer):
    from diffutron_engine.loading import decode_answer

    events = stream(server, "/v1/completions", {**BODY, "trace": True})
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    trace = [c["choices"][0]["trace"] for c in chunks]
    assert all("trace" in c["choices"][0] for c in chunks)  # traced: every chunk is a step
    assert [s["step"] for s in trace] == list(range(1, len(trace) + 1))
    start = trace[0]["start"]
    assert "start" not in trace[1] and start["mask_token"] == tokenizer.mask_token_id
    n = start["prompt_tokens"]
    assert "".join(start["texts"][:n]) == BODY["prompt"]  # display texts: byte-level pieces decoded
    assert start["tokens"][n:] == [start["mask_token"]] * BODY["max_tokens"]
    final = redraw(trace)
    assert start["mask_token"] not in final[n:]  # early_stop false: every answer position is filled
    for s in trace:
        assert len(s["positions"]) == len(s["tokens"]) == len(s["texts"]) == len(s["confidences"]) >= 1
        assert all(s["block"][0] <= p < s["block"][1] for p in s["positions"])
        assert all(0 <= c <= 1 for c in s["confidences"])
    text = "".join(c["choices"][0]["text"] for c in chunks)
    status, answer = server.post("/v1/completions", BODY)
    assert status == 200 and text == answer["choices"][0]["text"]
    assert decode_answer(tokenizer, final, n)[0] == text


def test_without_streaming_one_trace_entry_per_forward_pass(server):
    def passes(body):
        before = server.metrics()["diffutron_step_seconds_count"]
        status, answer = server.post("/v1/completions", body)
        assert status == 200, answer
        return int(server.metrics()["diffutron_step_seconds_count"] - before), answer

    steps, answer = passes({**BODY, "trace": True})
    trace = answer["choices"][0]["trace"]
    assert len(trace) == steps == BODY["steps"] and [s["step"] for s in trace] == list(range(1, steps + 1))
    early = {**BODY, "early_stop": True, "max_tokens": 32, "steps": 32, "block_size": 8, "stop": ","}
    steps, answer = passes({**early, "trace": True})  # an answer that ends early takes fewer passes
    assert len(answer["choices"][0]["trace"]) == steps
    streamed = [e["choices"][0]["trace"] for e in stream(server, "/v1/completions", {**BODY, "trace": True})[:-1]
                if e["choices"]]
    status, answer = server.post("/v1/completions", {**BODY, "trace": True})
    assert streamed == answer["choices"][0]["trace"]  # the same steps either way


def test_a_stop_string_rewrite_sends_the_canvas(server):
    body = {**BODY, "stop": ",", "trace": True}
    status, answer = server.post("/v1/completions", body)
    assert status == 200, answer
    trace = answer["choices"][0]["trace"]
    rewritten = [s for s in trace if "canvas" in s]
    assert rewritten, "the stop string should have made the server rewrite the canvas"
    canvas = rewritten[-1]["canvas"]
    assert set(canvas) == {"tokens", "texts", "prompt_tokens", "mask_token"}
    assert len(canvas["tokens"]) == len(canvas["texts"]) == len(trace[0]["start"]["tokens"])
    streamed = [e["choices"][0]["trace"] for e in stream(server, "/v1/completions", body)[:-1] if e["choices"]]
    assert redraw(streamed) == redraw(trace)


def test_chat_carries_the_trace_too(server):
    body = {"messages": [{"role": "user", "content": "Belgeyi"}], "max_tokens": 8, "steps": 8, "block_size": 8,
            "trace": True}
    status, answer = server.post("/v1/chat/completions", body)
    assert status == 200, answer
    trace = answer["choices"][0]["trace"]
    assert len(trace) == 8 and trace[0]["start"]["prompt_tokens"] > 1
    events = stream(server, "/v1/chat/completions", body)
    assert all("trace" in e["choices"][0] for e in events[:-1] if e["choices"])


def test_without_trace_nothing_changes(server):
    import openai

    status, answer = server.post("/v1/completions", BODY)
    assert status == 200 and set(answer["choices"][0]) == {"index", "text", "logprobs", "finish_reason"}
    events = stream(server, "/v1/completions", BODY)
    assert not any("trace" in c for e in events[:-1] for c in e["choices"])
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    r = client.completions.create(model="tiny-tr", prompt=BODY["prompt"], max_tokens=8, seed=7,
                                  extra_body={"steps": 8, "block_size": 8})
    assert not (r.choices[0].model_extra or {}) and r.choices[0].text == client.completions.create(
        model="tiny-tr", prompt=BODY["prompt"], max_tokens=8, seed=7,
        extra_body={"steps": 8, "block_size": 8, "trace": False}).choices[0].text


def test_trace_must_be_a_boolean(server):
    for value in ("yes", 1, "true"):  # null is "not given", as for every field
        status, answer = server.post("/v1/completions", {**BODY, "trace": value})
        assert status == 400 and answer["error"]["param"] == "trace", (value, answer)
        assert "trace must be true or false" in answer["error"]["message"]
