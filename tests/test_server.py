"""`diffutron-engine serve` (WIP, issue 11): the official openai client against a real server on a free
loopback port (started and stopped by the test), bad requests, disconnects, SIGTERM."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

# every test here starts a server process (model load included): the slow tier, like the torchrun tests
pytestmark = [pytest.mark.slow, pytest.mark.needs("openai", "fastapi", "uvicorn")]

try:
    import openai
except ImportError:  # the tests skip (needs)
    openai = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KNOBS = dict(steps=8, block_size=8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *flags):
        self.port = _free_port()
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("TRITON_INTERPRET", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "diffutron_engine.cli.main", "serve", "--model", "tiny-tr",
                                      "--port", str(self.port), "--max-batch", "8", *flags],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited: {self.proc.stdout.read().decode()[-2000:]}")
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not start within 120 s")

    def post(self, path, body: bytes, headers=None):
        req = urllib.request.Request(self.url + path, data=body, method="POST",
                                     headers={"content-type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def server():
    s = Server("--api-key", "sekret")
    yield s
    s.stop()


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sekret", max_retries=0)


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
    metrics = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    for name in ('diffutron_requests_total{outcome="ok"}', "diffutron_generation_tokens_total",
                 "diffutron_requests_in_flight 0", 'diffutron_step_seconds_bucket{le="+Inf"}'):
        assert name in metrics, name


def test_bad_requests_get_the_error_shape(server):
    c = _client(server)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="gpt-9", prompt="x", max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny-tr", prompt="x", max_tokens=-1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    auth = {"authorization": "Bearer sekret"}
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
                     {"content-type": "application/json"})
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


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads resident memory from /proc")
def test_a_thousand_requests_at_concurrency_64():
    """1,000 greedy requests, 64 at a time: all succeed, each answer equals its offline result, and the
    server's resident memory after the run is within 10% of after a warm-up of the same load."""
    from concurrent.futures import ThreadPoolExecutor

    from diffutron_engine import Engine, SamplingParams
    from diffutron_engine.loading import encode_prompt

    prompts = [f"Bu işlev {i}" for i in range(1000)]
    body = {"max_tokens": 4, "steps": 4, "block_size": 4, "temperature": 0}
    eng = Engine.from_pretrained("tiny-tr", max_batch=64)
    offline = eng.generate([encode_prompt(eng.tokenizer, p, chat=False) for p in prompts],
                           SamplingParams(max_new_tokens=4, steps=4, block_size=4))
    s = Server("--max-batch", "64", "--max-queue", "1024")
    try:
        def ask(p):
            return s.post("/v1/completions", json.dumps({"prompt": p, **body}).encode())

        with ThreadPoolExecutor(64) as pool:
            list(pool.map(ask, prompts[:128]))  # warm-up
            warm = _rss_mb(s.proc.pid)
            answers = list(pool.map(ask, prompts))
        after = _rss_mb(s.proc.pid)
    finally:
        s.stop()
    assert all(code == 200 for code, _ in answers)
    assert [a["choices"][0]["text"] for _, a in answers] == [o.text for o in offline]
    assert after <= 1.10 * warm, (warm, after)
