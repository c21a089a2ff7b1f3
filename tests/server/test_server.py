"""`diffutron-engine serve`: the official openai client against a real server on a loopback port
(started and stopped by the test), bad requests, disconnects, SIGTERM, a thousand requests.
The hostile clients are in test_server_limits.py."""

import json
import os
import signal
import time

import pytest
from serve_util import AUTH, KEY, KNOBS, Server

# every test here starts a server process (model load included): the slow tier, like the torchrun tests
pytestmark = [pytest.mark.slow, pytest.mark.needs("openai", "fastapi", "uvicorn")]

try:
    import openai
except ImportError:  # the tests skip (needs)
    openai = None



@pytest.fixture(scope="module")
def server():
    s = Server()
    yield s
    s.stop()


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def test_openai_client_completions_chat_streaming_n_seed(server):
    c = _client(server)
    assert [m.id for m in c.models.list().data] == ["tiny-tr"]
    r = c.completions.create(model="tiny-tr", prompt=["Bu işlev", "Seçili"], max_tokens=8, temperature=0,
                             extra_body=KNOBS)
    assert len(r.choices) == 2 and r.usage.completion_tokens > 0
    again = c.completions.create(model="tiny-tr", prompt=["Bu işlev", "Seçili"], max_tokens=8, temperature=0,
                                 extra_body=KNOBS)
    assert [ch.text for ch in again.choices] == [ch.text for ch in r.choices]
    chat = c.chat.completions.create(model="tiny-tr", messages=[{"role": "user", "content": "Belgeyi"}], max_tokens=8,
                                     n=2, seed=5, temperature=0.8, extra_body=KNOBS)
    chat2 = c.chat.completions.create(model="tiny-tr", messages=[{"role": "user", "content": "Belgeyi"}], max_tokens=8,
                                      n=2, seed=5, temperature=0.8, extra_body=KNOBS)
    assert [ch.message.content for ch in chat.choices] == [ch.message.content for ch in chat2.choices]
    pieces = [ch.choices[0].text for ch in c.completions.create(model="tiny-tr", prompt="Bu işlev", max_tokens=8,
                                                                 temperature=0, stream=True, extra_body=KNOBS)]
    assert "".join(pieces) == r.choices[0].text
    metrics = server.metrics()
    assert metrics['diffutron_requests_total{outcome="ok"}'] >= 5 and metrics["diffutron_generation_tokens_total"] > 0
    assert metrics["diffutron_requests_in_flight"] == 0 and metrics['diffutron_step_seconds_bucket{le="+Inf"}'] > 0


def test_bad_requests_get_the_error_shape(server):
    c = _client(server)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-9", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny-tr", prompt="x", max_tokens=-1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    auth = AUTH
    for body, status in ((b"{not json", 400), (b"[1, 2]", 400), (json.dumps({"prompt": 5}).encode(), 400),
                         (json.dumps({"prompt": "x", "steps": "many"}).encode(), 400),
                         (b"{" + b" " * (2 << 20) + b"}", 413)):
        code, payload = server.post("/v1/completions", body, auth)
        assert code == status and set(payload["error"]) == {"message", "type", "param", "code"}, (body[:40], payload)
    code, payload = server.post("/v1/completions", json.dumps({"prompt": "Bu", "max_tokens": 4, "top_p": 1,
                                                              "logprobs": None, **KNOBS}).encode(), auth)
    assert code == 200  # OpenAI fields at their neutral values are accepted
    code, payload = server.post("/v1/completions", json.dumps({"prompt": "Bu", "top_p": 0.5}).encode(), auth)
    assert code == 400 and payload["error"]["param"] == "top_p"
    for messages in ("hi", [], [1, 2], [{"role": "user"}], [{"role": "user", "content": 5}]):
        code, payload = server.post("/v1/chat/completions", json.dumps({"messages": messages}).encode(), auth)
        assert code == 400 and payload["error"]["param"] == "messages", (messages, payload)


def test_sigterm_finishes_the_requests_in_flight():
    import threading

    s = Server()
    results = []

    def ask():
        results.append(s.post("/v1/completions", json.dumps({"prompt": "Bu işlev", "max_tokens": 16, "steps": 64,
                                                             "block_size": 16}).encode()))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    s.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    assert s.proc.wait(60) == 0
    assert [code for code, _ in results] == [200] * 4


def test_a_client_that_disconnects_frees_its_slot():
    """One slot (--max-batch 1): a long streaming request holds it, a short one waits; the first client
    goes away after its first chunk and the short one is admitted and answered at once."""
    import http.client
    import threading

    s = Server("--max-batch", "1")
    try:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "Bu işlev", "max_tokens": 400, "steps": 400, "early_stop": False,
                                                            "block_size": 16, "stream": True}),
                     {"content-type": "application/json", **AUTH})
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")  # streaming: it holds the slot
        done = []
        waiter = threading.Thread(target=lambda: done.append(s.post("/v1/completions", json.dumps(
            {"prompt": "Seçili", "max_tokens": 8, **KNOBS}).encode())))
        waiter.start()
        time.sleep(0.5)
        assert not done  # waiting behind the long request
        t = time.time()
        conn.close()  # the client goes away mid-stream
        waiter.join(30)
        assert done and done[0][0] == 200 and time.time() - t < 10
    finally:
        s.stop()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident memory from /proc")
def test_a_thousand_requests_at_concurrency_64():
    """1,000 greedy requests, 64 at a time: all succeed, each answer equals its offline result, and the
    server's resident memory after the run is within 10% of after a warm-up of the same load."""
    from concurrent.futures import ThreadPoolExecutor

    from diffutron_engine import Engine, SamplingParams
    from diffutron_engine.inputs import TextPrompt

    prompts = [f"Bu işlev {i}" for i in range(1000)]
    body = {"max_tokens": 4, "steps": 4, "block_size": 4, "temperature": 0}
    eng = Engine.from_pretrained("tiny-tr", max_batch=64)
    offline = eng.generate([TextPrompt(prompt=p, chat_template=False) for p in prompts],
                           SamplingParams(max_new_tokens=4, steps=4, block_size=4))
    s = Server("--max-batch", "64", "--max-queue", "1024")
    try:
        def ask(p):
            return s.post("/v1/completions", json.dumps({"prompt": p, **body}).encode())

        with ThreadPoolExecutor(64) as pool:
            list(pool.map(ask, prompts[:128]))  # warm-up
            warm = s.rss_mb()
            answers = list(pool.map(ask, prompts))
        after = s.rss_mb()
    finally:
        s.stop()
    assert all(code == 200 for code, _ in answers)
    assert [a["choices"][0]["text"] for _, a in answers] == [o.text for o in offline]
    assert after <= 1.10 * warm, (warm, after)


def test_serve_fast_applies_the_same_pair_as_generate_fast(tmp_path):
    """`serve --fast` reads config.FAST as `generate --fast` does: the engine's cache and every request's
    default threshold. A copy of tiny-tr with a peaked head (confident predictions, so the threshold
    commits many positions per step) shows the threshold in the server's step count: a request with the
    default takes the steps the offline fast engine takes, far fewer than one that gives threshold null."""
    import shutil

    from safetensors.torch import load_file, save_file

    from diffutron_engine import Engine, SamplingParams
    from diffutron_engine.config import FAST
    from diffutron_engine.inputs import TextPrompt
    from diffutron_engine.loading import BUNDLED_MODELS

    model = tmp_path / "peaked"
    shutil.copytree(BUNDLED_MODELS["tiny-tr"], model)
    weights = load_file(model / "model.safetensors")
    weights["head.norm.weight"] = weights["head.norm.weight"] * 30
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    knobs = dict(max_tokens=32, steps=32, block_size=32, temperature=0)
    eng = Engine.from_pretrained(str(model), FAST.engine_config())
    offline = eng.generate([TextPrompt(prompt="Bu işlev", chat_template=False)],
                           SamplingParams(max_new_tokens=32, steps=32, block_size=32, **FAST.request))[0]
    assert offline.forward_passes < 16  # the threshold shows in this model

    s = Server("--fast", "--model", str(model))
    try:
        def steps_of(body):
            before = s.metrics()["diffutron_step_seconds_count"]
            status, payload = s.post("/v1/completions", {"prompt": "Bu işlev", **knobs, **body})
            assert status == 200, payload
            return s.metrics()["diffutron_step_seconds_count"] - before, payload["choices"][0]["text"]

        fast_steps, text = steps_of({})
        exact_steps, _ = steps_of({"threshold": None})
    finally:
        s.stop()
    assert text == offline.text and fast_steps <= offline.forward_passes + 1 < exact_steps
