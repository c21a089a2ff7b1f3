"""The server under hostile and careless clients, on loopback with bounded loops: bodies that never end,
requests that would freeze the event loop, clients that leave or never speak, the key kept out of argv,
a busy port, the drain deadline, and every malformed field a 400 (never a 500)."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
from serve_util import AUTH, KEY, KNOBS, ROOT, Server, raw_http, read_response, server_env

pytestmark = [pytest.mark.slow, pytest.mark.needs("fastapi", "uvicorn"),
              pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc")]


@pytest.fixture(scope="module")
def server():
    s = Server("--timeout-header", "2", "--max-prompt-bytes", "2000000", "--max-body-bytes", "2000000")
    yield s
    s.stop()


class HealthPoller:
    """Polls /health every 20 ms in a thread; the slowest answer while it ran."""

    def __init__(self, server):
        self.server, self.latencies, self._stop = server, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            t = time.perf_counter()
            status, _ = self.server.get("/health", timeout=10)
            assert status == 200
            self.latencies.append(time.perf_counter() - t)
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        time.sleep(0.1)
        return self

    def __exit__(self, *exc):
        time.sleep(0.1)
        self._stop.set()
        self._thread.join(15)

    @property
    def worst(self) -> float:
        return max(self.latencies)


def test_a_64_mb_chunked_body_is_refused_without_holding_it(server):
    server.post("/v1/completions", {"prompt": "Bu", "max_tokens": 4, **KNOBS})  # warm
    before = server.rss_mb()
    sock = server.connect()
    raw_http(sock, f"POST /v1/completions HTTP/1.1\nhost: x\nauthorization: Bearer {KEY}\n"
                   "content-type: application/json\ntransfer-encoding: chunked\n")
    piece = b"1000000\r\n" + b" " * (1 << 24) + b"\r\n"  # 16 MiB chunks, 4 of them
    sent = 0
    try:
        for _ in range(4):
            sock.sendall(piece)
            sent += 1 << 24
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed: the rest is never read
    status, reply = read_response(sock)
    sock.close()
    after = server.rss_mb()
    assert status == 413 and b"over 2,000,000 bytes" in reply, reply[:300]
    assert after - before < 16, (before, after, sent)


def test_a_request_of_100000_prompts_is_refused_at_once(server):
    body = json.dumps({"prompt": ["a"] * 100_000, "max_tokens": 4}).encode()
    with HealthPoller(server) as health:
        t = time.perf_counter()
        status, payload = server.post("/v1/completions", body)
        took = time.perf_counter() - t
    assert status == 400 and "at most 256 prompts" in payload["error"]["message"], payload
    assert took < 1.0 and health.worst < 0.2, (took, health.worst)


def test_tokenizing_a_huge_prompt_does_not_stall_other_clients(server):
    """900 KB (about 0.8 s to tokenize here) is over the model's context: a 400 after tokenizing, which
    ran off the event loop while /health kept answering."""
    prompt = "Bu işlev seçili hücreleri " * 34_000
    with HealthPoller(server) as health:
        status, payload = server.post("/v1/completions", {"prompt": prompt, "max_tokens": 4})
    assert status == 400 and "context" in payload["error"]["message"], payload
    assert health.worst < 0.2, health.worst


def test_a_prompt_over_the_byte_cap_is_refused_before_tokenizing():
    s = Server("--max-prompt-bytes", "1000")
    try:
        t = time.perf_counter()
        status, payload = s.post("/v1/completions", {"prompt": "é" * 501, "max_tokens": 4})
        assert status == 400 and "1,002 bytes; at most 1,000" in payload["error"]["message"], payload
        assert time.perf_counter() - t < 1.0
        status, payload = s.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "a" * 600},
                                                                       {"role": "user", "content": "b" * 600}]})
        assert status == 400 and payload["error"]["param"] == "messages", payload
    finally:
        s.stop()


def test_stalled_connections_neither_block_nor_stay(server):
    """200 connections that send nothing and 50 that send half a header: a new request is answered at
    once, and the stalled ones are closed after --timeout-header (2 s here)."""
    silent = [server.connect() for _ in range(200)]
    partial = []
    for _ in range(50):
        sock = server.connect()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
        partial.append(sock)
    try:
        t = time.perf_counter()
        assert server.get("/health", timeout=5)[0] == 200
        status, _ = server.post("/v1/completions", {"prompt": "Bu", "max_tokens": 4, **KNOBS}, timeout=10)
        assert status == 200 and time.perf_counter() - t < 5
        time.sleep(3.5)
        closed = 0
        for sock in silent + partial:
            sock.settimeout(2)
            try:
                closed += sock.recv(1) == b""
            except (socket.timeout, ConnectionResetError):
                pass
        assert closed == 250, closed
    finally:
        for sock in silent + partial:
            sock.close()


def test_a_kept_alive_connection_owes_its_next_headers_in_time_too(server):
    """After a first request answered on a kept-alive connection, half of a second request's headers and
    then silence: closed at --timeout-header (2 s here), though uvicorn's keep-alive timer stopped at the
    first new byte."""
    sock = server.connect()
    try:
        raw_http(sock, "GET /health HTTP/1.1\nhost: x\n")
        status, _ = read_response(sock, timeout=5)
        assert status == 200
        sock.sendall(b"GET /health HTTP/1.1\r\nho")
        sock.settimeout(4)
        t = time.perf_counter()
        try:
            assert sock.recv(1) == b""
        except ConnectionResetError:
            pass
        assert time.perf_counter() - t < 3.5
    finally:
        sock.close()


def test_connections_beyond_the_cap_are_closed_as_they_arrive():
    """--max-connections 20: of 30 silent connections the last 10 are closed at once, the first 20 at
    the header timeout (2 s); then the server answers again."""
    import select

    s = Server("--max-connections", "20", "--timeout-header", "2")
    socks = [s.connect() for _ in range(30)]
    try:
        time.sleep(0.5)
        readable, _, _ = select.select(socks, [], [], 0)  # a closed connection reads as end-of-file
        assert {socks.index(x) for x in readable} == set(range(20, 30))
        assert all(x.recv(1) == b"" for x in readable)
        time.sleep(2.5)
        assert len(select.select(socks[:20], [], [], 0)[0]) == 20
        assert s.get("/health", timeout=5)[0] == 200
    finally:
        for sock in socks:
            sock.close()
        s.stop()


def _step_count(server) -> float:
    return server.metrics()["diffutron_step_seconds_count"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_is_aborted_within_two_steps(stream):
    """One row (--max-batch 1) held by a long request; its client closes the connection after 1 s
    (non-streaming: it is waiting for the whole answer). The engine takes at most 2 more steps for it:
    the in-flight count drops to 0 by then, and a waiting short request is answered."""
    s = Server("--max-batch", "1")
    try:
        sock = s.connect()
        body = json.dumps({"prompt": "Bu işlev", "max_tokens": 400, "steps": 400, "block_size": 16,
                           "early_stop": False, "stream": stream}).encode()
        raw_http(sock, f"POST /v1/completions HTTP/1.1\nhost: x\nauthorization: Bearer {KEY}\n"
                       f"content-type: application/json\ncontent-length: {len(body)}\n", body)
        time.sleep(1.0)
        metrics = s.metrics()
        assert metrics["diffutron_requests_in_flight"] == 1 and metrics["diffutron_running_batch_size"] == 1
        steps_then = metrics["diffutron_step_seconds_count"]
        sock.close()
        deadline = time.time() + 10
        while s.metrics()["diffutron_requests_in_flight"] and time.time() < deadline:
            time.sleep(0.005)
        # read in the same instant the in-flight count reached 0: the engine then ran the abort's step
        assert _step_count(s) - steps_then <= 2 + 1, "the aborted request kept stepping"
        status, _ = s.post("/v1/completions", {"prompt": "Seçili", "max_tokens": 8, **KNOBS}, timeout=10)
        assert status == 200
        assert s.metrics()['diffutron_requests_total{outcome="disconnected"}'] == 1
    finally:
        s.stop()


def test_the_key_never_needs_argv(tmp_path):
    """DIFFUTRON_API_KEY or --api-key-file; every route but /health needs it; docs only with --docs."""
    s = Server()  # the key from DIFFUTRON_API_KEY
    try:
        with open(f"/proc/{s.proc.pid}/cmdline", "rb") as f:
            assert KEY.encode() not in f.read()
        assert s.get("/health")[0] == 200
        for path in ("/v1/models", "/metrics", "/docs", "/openapi.json", "/nowhere"):
            status, payload = s.get(path)
            assert status == 401 and payload["error"]["code"] == "invalid_api_key", (path, payload)
            assert s.get(path, {"authorization": f"Bearer {KEY}x"})[0] == 401
            assert s.get(path, {"authorization": f"bearer {KEY}"})[0] == 401
        assert s.get("/v1/models", AUTH)[0] == 200 and s.get("/metrics", AUTH)[0] == 200
        assert s.get("/docs", AUTH)[0] == 404 and s.get("/openapi.json", AUTH)[0] == 404
    finally:
        s.stop()
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    os.chmod(key_file, stat.S_IRUSR | stat.S_IWUSR)
    s = Server("--api-key-file", str(key_file), "--docs", key=None)
    try:
        assert s.get("/v1/models")[0] == 401 and s.get("/v1/models", AUTH)[0] == 200
        assert s.get("/docs")[0] == 401 and s.get("/docs", AUTH)[0] == 200
        assert "warning" not in s.log
    finally:
        s.stop()


def _serve_cli(*flags, env=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "diffutron_engine.cli.main", "serve", "--model", "tiny-tr", *flags],
                          env=server_env(**(env or {})), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_bad_flags_and_a_busy_port_are_one_line_before_the_model_loads(tmp_path, server):
    t = time.perf_counter()
    busy = _serve_cli("--port", str(server.port))
    assert busy.returncode == 2 and "serving" not in busy.stderr, busy.stderr
    assert busy.stderr.strip().count("\n") == 0 and "port is in use" in busy.stderr
    assert time.perf_counter() - t < 10
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for flags, env, message in (
            (("--api-key-file", str(tmp_path / "missing")), None, "cannot read --api-key-file"),
            (("--api-key-file", str(empty)), None, "is empty"),
            (("--api-key-file", str(empty), "--api-key", "x"), None, "one way"),
            ((), {"DIFFUTRON_API_KEY": ""}, "set but empty"),
            (("--api-key", " ab"), None, "white space"),
            ((), {"DIFFUTRON_API_KEY": "a b"}, "printable ASCII"),
            (("--max-queue", "0"), None, "--max-queue must be"),
            (("--timeout-body", "nan"), None, "--timeout-body must be"),
            (("--port", "70000"), None, "--port must be")):
        r = _serve_cli(*flags, env=env)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (flags, r.stderr)


def test_past_the_drain_timeout_every_request_gets_an_error():
    """SIGTERM with two long requests in flight and --drain-timeout 1: the plain client gets a 503 body,
    the stream an SSE error event and [DONE]; the server exits 0 soon after."""
    s = Server("--max-batch", "2", "--drain-timeout", "1")
    long = {"prompt": "Bu işlev", "max_tokens": 400, "steps": 400, "block_size": 16, "early_stop": False}
    plain, stream = s.connect(), s.connect()
    for sock, extra in ((plain, {}), (stream, {"stream": True})):
        body = json.dumps({**long, **extra}).encode()
        raw_http(sock, f"POST /v1/completions HTTP/1.1\nhost: x\nauthorization: Bearer {KEY}\n"
                       f"content-type: application/json\ncontent-length: {len(body)}\n", body)
    time.sleep(1.0)
    t = time.perf_counter()
    s.proc.send_signal(signal.SIGTERM)
    status, reply = read_response(plain, timeout=15)
    assert status == 503 and json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "shutdown", reply
    events = b""
    stream.settimeout(15)
    while b"data: [DONE]" not in events:
        part = stream.recv(65536)
        if not part:
            break
        events += part
    last = [line for line in events.split(b"\n") if line.startswith(b"data: ")][-2:]
    assert json.loads(last[0][6:])["error"]["code"] == "shutdown" and last[1].strip() == b"data: [DONE]", last
    assert s.proc.wait(20) == 0 and time.perf_counter() - t < 10
    plain.close()
    stream.close()


# (body, why): each was a 500 (or silently wrong) before; each is a 400 in OpenAI's error shape
BAD_BODIES = [
    ({"prompt": "\ud800"}, "a lone surrogate"),
    ({"prompt": ["ok", " \n\t "]}, "a whitespace-only prompt"),
    ({"prompt": "x", "stream_options": "yes"}, "stream_options a string"),
    ({"prompt": "x", "stream_options": [1]}, "stream_options a list"),
    ({"prompt": "x", "stream_options": 5}, "stream_options a number"),
    ({"prompt": "x", "stream_options": {"include_usage": "yes"}}, "include_usage a string"),
    ({"prompt": "x", "early_stop": "no"}, "a boolean knob given a string"),
    ({"prompt": "x", "stochastic_transfer": "false"}, "a boolean knob given a string"),
    ({"prompt": "x", "right_shift_logits": 1}, "a boolean knob given a number"),
    ({"prompt": "x", "stream": "yes"}, "stream a string"),
    ({"prompt": "x", "stop": {"a": 1}}, "stop an object"),
    ({"prompt": "x", "stop": [1, 2]}, "stop numbers"),
    ({"prompt": "x", "repetition_penalty": 1e-320}, "a penalty float32 flushes to 0"),
    ({"prompt": "x", "cfg_scale": 1e308}, "a scale float32 overflows"),
    ({"prompt": "x", "factor": 1e39}, "a factor float32 overflows"),
    ({"prompt": "x", "threshold": 1e-320}, "a threshold float32 flushes to 0"),
    ({"prompt": "x", "suppress_tokens": [True]}, "token ids given booleans"),
    ({"prompt": "x", "suppress_tokens": {"1": 2}}, "token ids given an object"),
    ({"prompt": "x", "seed": 2**64}, "a seed beyond 2**63"),
    ({"prompt": "x", "n": 17}, "n over 16"),
    ({"prompt": "x", "max_tokens": 10**12}, "max_tokens beyond the context"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "messages on /v1/completions"),
]
BAD_CHAT = [
    ({"prompt": "x"}, "prompt on chat"),
    ({"messages": [{"role": "user", "content": "x"}], "prompt": "x"}, "prompt beside messages on chat"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "an unknown role"),
    ({"messages": [{"role": "user", "content": "   "}]}, "whitespace-only content"),
    ({"messages": [{"role": "user", "content": "\udfff"}]}, "a lone surrogate in content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]}, "an image part"),
]


def test_every_malformed_field_is_a_400(server):
    for path, cases in (("/v1/completions", BAD_BODIES), ("/v1/chat/completions", BAD_CHAT)):
        for body, why in cases:
            status, payload = server.post(path, {**body, "max_tokens": body.get("max_tokens", 4), **KNOBS}
                                          if "prompt" in body or "messages" in body else body)
            assert status == 400 and set(payload["error"]) == {"message", "type", "param", "code"}, (why, payload)
    for method, path, status in (("GET", "/nowhere", 404), ("POST", "/v1/nowhere", 404),
                                 ("GET", "/v1/completions", 405), ("DELETE", "/v1/models", 405)):
        code, payload = server.request(method, path, None, AUTH)
        assert code == status and payload["error"]["type"] == "invalid_request_error", (path, payload)
    chat = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Bu "}, {"type": "text", "text": "işlev"}]}], "max_tokens": 4, **KNOBS})
    assert chat[0] == 200, chat
    assert server.metrics()['diffutron_requests_total{outcome="failed"}'] == 0
