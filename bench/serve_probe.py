#!/usr/bin/env python3
"""Probe `diffutron-engine serve` the way a hostile or careless client would, and print what held.

    python bench/serve_probe.py --repo DIR [--python PY] [--only bodies|checks] [--save FILE.json]

Starts the servers it needs from DIR (tiny-tr on free loopback ports), so two checkouts can be compared
run for run. Part 1 sends 180 request bodies and judges each: the expected status, an OpenAI-shaped JSON
error for every 4xx (404/405 included), never a 5xx, and /health still answering within 1 s. Part 2 runs
load and lifecycle checks, each with a measured figure. Output: a markdown table on stdout, one line per
body that did not hold, then one JSON summary line. Exit 0 unless the probe itself breaks.

Stdlib only, and raw sockets on purpose: a client library would fix up exactly the bytes (framing,
encodings, lengths) this probe means to get wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from http.client import HTTPException, HTTPResponse, IncompleteRead

from probe_util import finish

KEY = "probe-Key-7q"  # letters in both cases, so a case-swapped key is a different key
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON_AUTH = {**AUTH, "Content-Type": "application/json"}
TINY = {"max_tokens": 4, "steps": 4, "block_size": 4}  # every generation the probe asks for stays fast
DROP = object()  # a field value meaning "leave the field out"


def log(msg: str) -> None:
    print(f"[probe] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(repo, extra=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=repo, HF_HUB_OFFLINE="1", **(extra or {}))
    return env


def package_origin(repo, python) -> str:
    """Where the server's `diffutron_engine` comes from. An editable install in the interpreter's
    site-packages serves its own checkout when DIR has no package, and the probe would then measure
    the wrong server without a sign of it."""
    code = "import importlib.util as u; s = u.find_spec('diffutron_engine'); print(s.origin if s else '')"
    out = subprocess.run([python, "-c", code], cwd=repo, env=server_env(repo), capture_output=True, text=True,
                         timeout=60).stdout.strip()
    return os.path.dirname(os.path.dirname(out)) if out else ""


class Server:
    """One `serve` process started from the checkout under test; stop() always SIGTERMs, then SIGKILLs."""

    def __init__(self, repo, python, args=(), env=None, port=None):
        self.repo, self.python, self.args, self.extra_env = repo, python, list(args), env or {}
        self.port = port or free_port()
        self.proc = None
        self.log = tempfile.NamedTemporaryFile(prefix="serve-probe-", suffix=".log", delete=False)

    def command(self):
        return [self.python, "-m", "diffutron_engine.cli.main", "serve", "--model", "tiny-tr", "--port",
                str(self.port), "--max-batch", "8", *self.args]  # a later --max-batch in args wins

    def spawn(self):
        env = server_env(self.repo, self.extra_env)
        # its own session: a Ctrl-C at the terminal reaches the probe only, whose finally stops it
        self.proc = subprocess.Popen(self.command(), cwd=self.repo, env=env, stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        return self.proc

    def start(self, timeout=120.0):
        self.spawn()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                last = (self.output().strip().splitlines() or [""])[-1]
                raise RuntimeError(f"server exited {self.proc.returncode}: {last[:160]}")
            if request(self.port, "GET", "/health", timeout=1).status == 200:
                return self
            time.sleep(0.25)
        raise RuntimeError(f"no /health within {timeout:.0f} s")

    def output(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return None if self.proc is None else self.proc.returncode


# ------------------------------------------------------------------------------------------------- HTTP
class Reply:
    def __init__(self, status=None, body=b"", error=None, seconds=0.0):
        self.status, self.body, self.error, self.seconds = status, body, error, seconds

    def got(self) -> str:
        head = str(self.status) if self.status is not None else f"no reply ({self.error})"
        return f"{head} {self.body[:100].decode('utf-8', 'replace')!r}"


def chunked(parts):
    for p in parts:
        if p:
            yield b"%x\r\n%s\r\n" % (len(p), p)
    yield b"0\r\n\r\n"


def connect(port, method, path, body=b"", headers=None, timeout=30.0):
    """Open a connection and send one request; returns (socket, sender thread, stop event). A list body
    goes out chunked; headers that set Content-Length or Transfer-Encoding take over the framing (for the
    framing abuse cases). The body is sent from a thread so that a server answering early (413) is read
    while the rest is still going out, never deadlocked on full buffers."""
    headers = dict(headers or {})
    framing = {k.lower() for k in headers} & {"content-length", "transfer-encoding"}
    if isinstance(body, list):
        if not framing:
            headers["Transfer-Encoding"] = "chunked"
        parts = chunked(body)
    else:
        if not framing and (body or method not in ("GET", "HEAD", "DELETE", "OPTIONS")):
            headers["Content-Length"] = str(len(body))
        parts = iter([body])
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
    head = (head + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode("latin-1")
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    stop = threading.Event()

    def pump():
        try:
            sock.sendall(head)
            for p in parts:
                if stop.is_set():
                    return
                sock.sendall(p)
        except OSError:  # the server answered or closed first: its reply is what counts
            pass

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    return sock, sender, stop


def hang_up(sock, sender, stop):
    stop.set()
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sender.join(5)
    sock.close()


def request(port, method, path, body=b"", headers=None, timeout=30.0) -> Reply:
    t0 = time.monotonic()
    try:
        conn = connect(port, method, path, body, headers, timeout)
    except OSError as exc:
        return Reply(error=f"connect: {exc}", seconds=time.monotonic() - t0)
    resp = HTTPResponse(conn[0], method=method)
    try:
        resp.begin()
        reply = Reply(resp.status, resp.read())
    except IncompleteRead as exc:
        reply = Reply(resp.status, exc.partial, error="incomplete body")
    except (OSError, HTTPException) as exc:
        reply = Reply(error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    finally:
        resp.close()
        hang_up(*conn)
    reply.seconds = time.monotonic() - t0
    return reply


def post(port, fields, path="/v1/completions", timeout=30.0) -> Reply:
    return request(port, "POST", path, json.dumps(fields).encode(), JSON_AUTH, timeout)


def metric(port, name):
    r = request(port, "GET", "/metrics", headers=AUTH, timeout=5)
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", r.body.decode("utf-8", "replace"), re.M)
    return float(m.group(1)) if r.status == 200 and m else None


def error_shaped(body: bytes) -> bool:
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return False
    return (isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str)
            and "param" in err and "code" in err)


def wellformed_2xx(body: bytes) -> bool:
    text = body.decode("utf-8", "replace")
    if text.lstrip().startswith("data:"):  # a stream: it ends with [DONE] and carries no error event
        return text.rstrip().endswith("data: [DONE]") and 'data: {"error"' not in text
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


class Poller(threading.Thread):
    """GETs a path every `every` seconds on a fresh connection; keeps each latency (a stall shows as the
    latency of the poll that was waiting through it)."""

    def __init__(self, port, path="/health", every=0.05, headers=None, parse=None):
        super().__init__(daemon=True)
        self.port, self.path, self.every, self.headers, self.parse = port, path, every, headers, parse
        self.latencies, self.values, self.halt = [], [], threading.Event()

    def run(self):
        while not self.halt.is_set():
            r = request(self.port, "GET", self.path, headers=self.headers, timeout=10)
            self.latencies.append(r.seconds if r.status == 200 else 10.0)
            if self.parse and r.status == 200:
                self.values.append(self.parse(r.body))
            self.halt.wait(max(0.0, self.every - r.seconds))

    def finish(self):
        self.halt.set()
        self.join(15)
        return max(self.latencies, default=float("nan"))


# ---------------------------------------------------------------------------------------- Part 1: bodies
def comp(raw: str = "", path_chat=False, **fields) -> bytes:
    """A request body: a valid tiny completion (or chat) with `fields` replacing its own; `raw` is JSON
    text spliced in for values json.dumps cannot write (NaN literals, 10**5000, 1e999999)."""
    base = {"messages": [{"role": "user", "content": "Merhaba"}]} if path_chat else {"prompt": "Merhaba"}
    d = {k: v for k, v in {**base, **TINY, **fields}.items() if v is not DROP}
    text = json.dumps(d)
    return (text[:-1] + ", " + raw + "}" if raw else text).encode()


def chat(**fields) -> bytes:
    return comp(path_chat=True, **fields)


def comp_fields(**kw) -> dict:
    return {"prompt": "Bu işlev", **TINY, **kw}


def cases():
    """(category, name, method, path, headers, body, expected, raw_ok). expected: "/"-separated
    alternatives, each a class ("2xx", "4xx"), an exact code, or "closed" (no reply, no 5xx). raw_ok: an
    HTTP-framing error the ASGI app never sees, so a plain-text 4xx from the HTTP layer is fine."""
    out = []
    C, CH = "/v1/completions", "/v1/chat/completions"

    def add(cat, name, body, expect="4xx", path=C, method="POST", headers=JSON_AUTH, raw_ok=False):
        out.append((cat, name, method, path, headers, body, expect, raw_ok))

    ok = comp()
    for name, body, expect in [
        ("not-json", b"hello", "4xx"), ("truncated", b'{"prompt": "Mer', "4xx"),
        ("bom", b"\xef\xbb\xbf" + ok, "2xx/4xx"), ("empty-body", b"", "4xx"), ("array", b"[]", "4xx"),
        ("array-of-object", b"[" + ok + b"]", "4xx"), ("number", b"42", "4xx"), ("null", b"null", "4xx"),
        ("invalid-utf8", ok.replace(b"Merhaba", b"\xff\xfe\xfd"), "4xx"),
        ("utf16-body", ok.decode().encode("utf-16"), "2xx/4xx"),
        ("lone-surrogate", comp(prompt="\ud800"), "4xx"),
        ("lone-surrogate-in-list", comp(prompt=["Merhaba", "\udfff"]), "4xx"),
        ("whitespace-prompt", comp(prompt="   "), "4xx"), ("empty-prompt", comp(prompt=""), "4xx"),
        ("empty-list", comp(prompt=[]), "4xx"), ("list-with-empty", comp(prompt=["Merhaba", ""]), "4xx"),
        ("nul-prompt", comp(prompt="\u0000"), "2xx/4xx"), ("no-prompt", comp(prompt=DROP), "4xx"),
        ("trailing-garbage", ok + b" xyz", "4xx"),
        ("duplicate-key", ok[:-1] + b', "prompt": 5}', "2xx/4xx")]:
        add("malformed", name, body, expect)
    add("malformed", "form-urlencoded", b"prompt=hi&max_tokens=4",
        headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"})

    # wrong types and out-of-range values, field by field (expected 4xx unless noted)
    bad = {"prompt": [5, {"a": 1}, [1, 2], None], "max_tokens": ["4", 4.5, True, -1, 0, 10**12],
           "max_completion_tokens": ["x"], "temperature": ["0", -1, True], "seed": [-1, 2**64, "1"],
           "n": [0, 17, "2", True], "stream": ["yes"], "early_stop": ["no"], "stochastic_transfer": ["false"],
           "right_shift_logits": [1], "stop": [{"a": 1}, [1, 2]], "steps": ["4", 0, 10**12],
           "block_size": [0, "4", None], "suppress_tokens": ["x", [-1], [10**12]], "remasking": ["bogus"],
           "repetition_penalty": [0, "1"], "threshold": [0, 1.5], "factor": [0], "cfg_scale": [-1], "foo": [1],
           "model": [5], "top_p": [0.5], "logit_bias": [{"1": 100}]}
    for field, values in bad.items():
        for v in values:
            add("types", f"{field}={json.dumps(v)[:20]}", comp(**{field: v}))
    for raw in ("NaN", "Infinity"):
        add("types", f"temperature={raw}", comp(raw=f'"temperature": {raw}'))
    add("types", "repetition_penalty=NaN", comp(raw='"repetition_penalty": NaN'))
    for name, obj in [("stream_options=x", "x"), ("stream_options=[1]", [1]), ("stream_options=5", 5),
                      ('include_usage="yes"', {"include_usage": "yes"})]:
        add("types", name, comp(stream=True, stream_options=obj))
    add("types", "threshold+factor", comp(threshold=0.9, factor=1.0))
    add("types", "model=other", comp(model="other"), "404")
    # ambiguous values: either answer is fine, only a 5xx or a hang is not
    for field, v in [("temperature", 1e9), ("max_tokens", None), ("stop", ""), ("stop", ["a", "b", "c", "d", "e"]),
                     ("stop", "x" * 10000), ("user", 5),
                     ("block_size", 10**12), ("prompt", [[1, 2]])]:
        add("types", f"{field}={json.dumps(v)[:20]}", comp(**{field: v}), "2xx/4xx")
    add("types", "seed=2**63-1,n=2", comp(seed=2**63 - 1, n=2), "2xx/4xx")

    # finite in float64, but 0 or inf once the engine holds them as float32
    for field, raw in [("repetition_penalty", "1e-320"), ("repetition_penalty", "1e308"), ("cfg_scale", "1e308"),
                       ("threshold", "1e-320"), ("factor", "1e308"), ("factor", "1e-320"), ("temperature", "1e39")]:
        add("float32", f"{field}={raw}", comp(raw=f'"{field}": {raw}'))
    add("float32", "temperature=1e-320", comp(raw='"temperature": 1e-320'), "2xx/4xx")

    deep = 100_000
    add("nesting", "deep-array-body", b"[" * deep + b"]" * deep)
    add("nesting", "deep-object-body", b'{"a":' * deep + b"1" + b"}" * deep)
    add("nesting", "deep-prompt", b'{"prompt": ' + b"[" * deep + b"]" * deep + b"}")
    add("nesting", "deep-stop", comp(raw='"stop": ' + "[" * deep + "]" * deep))
    add("nesting", "stop-nested-900", comp(raw='"stop": ' + "[" * 900 + '"a"' + "]" * 900))
    add("nesting", "temperature=1e999999", comp(raw='"temperature": 1e999999'))
    add("nesting", "max_tokens=1e999999", comp(raw='"max_tokens": 1e999999'))
    add("nesting", "seed=5000-digit-int", comp(raw='"seed": 1' + "0" * 5000))
    add("nesting", "steps=5000-digit-int", comp(raw='"steps": 1' + "0" * 5000))
    add("nesting", "steps=1e-999999", comp(raw='"steps": 1e-999999'))
    add("nesting", "500KB-unknown-key", comp(**{"k" * 500_000: 1}))
    add("nesting", "50000-unknown-keys", comp(**{f"k{i}": 1 for i in range(50_000)}))

    big = comp(prompt="a" * 1_100_000)  # over the default 1 MiB body limit
    add("size", "over-1MiB", big, "413")
    add("size", "over-1MiB-chunked", [big[i:i + 65536] for i in range(0, len(big), 65536)], "413")
    add("size", "false-small-length", ok, "4xx/closed", headers={**JSON_AUTH, "Content-Length": "10"})
    add("size", "length-not-a-number", ok, "4xx/closed", headers={**JSON_AUTH, "Content-Length": "abc"}, raw_ok=True)
    add("size", "negative-length", ok, "4xx/closed", headers={**JSON_AUTH, "Content-Length": "-1"}, raw_ok=True)
    add("size", "bad-chunk-size", b"zz\r\n" + ok + b"\r\n0\r\n\r\n", "4xx/closed",
        headers={**JSON_AUTH, "Transfer-Encoding": "chunked"}, raw_ok=True)
    # 1 MiB: more than one socket read whatever the segmentation, so a parser's header limit always applies
    add("size", "1MiB-header", ok, "4xx/closed", headers={**JSON_AUTH, "X-Pad": "a" * (1 << 20)}, raw_ok=True)

    for method, path, expect in [("GET", "/nope", "404"), ("POST", "/nope", "404"), ("GET", "/v1", "404"),
                                 ("GET", "/%2e%2e/%2e%2e/etc/passwd", "404"), ("GET", C, "405"),
                                 ("GET", CH, "405"), ("DELETE", "/v1/models", "405"), ("POST", "/health", "405"),
                                 ("PUT", C, "405"), ("PATCH", CH, "405"), ("OPTIONS", C, "4xx"),
                                 ("GET", "/v1/models/tiny-tr", "2xx/404")]:
        add("routes", f"{method} {path}", ok if method in ("POST", "PUT", "PATCH") else b"", expect, path, method)

    add("chat", "prompt-to-chat", comp(), path=CH)
    add("chat", "messages-to-completions", chat())
    msg = {"role": "user", "content": "Merhaba"}
    for name, messages, expect in [
        ("messages={}", {}, "4xx"), ('messages="hi"', "hi", "4xx"), ("messages=[]", [], "4xx"),
        ("messages=null", None, "4xx"), ('messages=["hi"]', ["hi"], "4xx"),
        ("no-content", [{"role": "user"}], "4xx"), ("no-role", [{"content": "hi"}], "4xx"),
        ("role=5", [{**msg, "role": 5}], "4xx"), ("content=5", [{**msg, "content": 5}], "4xx"),
        ("content=null", [{**msg, "content": None}], "4xx"),
        ("content-surrogate", [{**msg, "content": "\ud800"}], "4xx"),
        ("role=wizard", [{**msg, "role": "wizard"}], "2xx/4xx"),
        ("content-parts", [{**msg, "content": [{"type": "text", "text": "hi"}]}], "2xx/4xx")]:
        add("chat", name, chat(messages=messages), expect, CH)

    # the new server wants the key everywhere but /health
    wrong = {"no-key": {}, "wrong-key": {"Authorization": "Bearer nope"}, "empty-bearer": {"Authorization": "Bearer "},
             "key-case": {"Authorization": f"Bearer {KEY.swapcase()}"}}
    for method, path in [("GET", "/v1/models"), ("POST", C), ("GET", "/metrics"), ("GET", "/docs"),
                         ("GET", "/openapi.json")]:
        for variant, h in wrong.items():
            add("auth", f"{variant} {path}", ok if method == "POST" else b"", "401", path, method,
                {**h, "Content-Type": "application/json"})
    add("auth", "no-key /health", b"", "2xx", "/health", "GET", {})
    for path, expect in [("/metrics", "2xx"), ("/v1/models", "2xx"), ("/docs", "404"), ("/openapi.json", "404"),
                         ("/redoc", "404")]:
        add("auth", f"key {path}", b"", expect, path, "GET", AUTH)

    for name, body, path in [
        ("completion", ok, C), ("list-prompt", comp(prompt=["Merhaba", "Bu işlev"]), C), ("chat", chat(), CH),
        ("n=2-seed", comp(n=2, seed=7), C), ("stream", comp(stream=True), C),
        ("stream-usage", comp(stream=True, stream_options={"include_usage": True}), C),
        ("chat-stream", chat(stream=True), CH),
        ("neutral-fields", comp(top_p=1, logprobs=None, frequency_penalty=0, presence_penalty=0), C),
        ("max_completion_tokens", comp(max_tokens=DROP, max_completion_tokens=4), C),
        ("stop-string", comp(stop="."), C), ("model-named", comp(model="tiny-tr"), C),
        ("knobs", comp(threshold=0.9, early_stop=False, repetition_penalty=1.2), C),
        ("turkish-utf8", comp(prompt="Bu işlev çalışıyor ğüşıöç"), C),
        ("one-byte-chunks", [bytes([b]) for b in ok], C)]:
        add("good", name, body, "2xx", path)
    return out


def judge(expect, raw_ok, path, r: Reply):
    """None when the reply holds, else why not."""
    if r.status is not None and r.status >= 500:
        return "5xx"
    alts = expect.split("/")
    if r.status is None:
        if "closed" in alts and "timed out" not in str(r.error):
            return None
        return "no reply"
    cls = f"{r.status // 100}xx"
    if str(r.status) not in alts and cls not in alts:
        return f"status {r.status}"
    if cls == "4xx" and not raw_ok and not error_shaped(r.body):
        return "4xx not in OpenAI error shape"
    if cls == "2xx" and path.startswith("/v1") and not wellformed_2xx(r.body):
        return "2xx body malformed"
    return None


def run_bodies(srv: Server):
    tally, failures = {}, []
    for cat, name, method, path, headers, body, expect, raw_ok in cases():
        if srv.proc.poll() is not None:  # a body killed it: it counts there, the rest go to a fresh one
            log(f"server died (exit {srv.proc.returncode}) before {cat}/{name}; restarting")
            try:
                srv.start()
            except RuntimeError as exc:
                log(f"restart failed: {exc}")
        r = request(srv.port, method, path, body, headers)
        why = judge(expect, raw_ok, path, r)
        if why is None:
            h = request(srv.port, "GET", "/health", timeout=1)
            if h.status != 200:
                why = f"/health after: {h.got()}"
        t = tally.setdefault(cat, {"tried": 0, "held": 0})
        t["tried"] += 1
        t["held"] += why is None
        if why is not None:
            failures.append({"category": cat, "name": name, "expected": expect, "why": why, "got": r.got()})
    return tally, failures


# ---------------------------------------------------------------------------------------- Part 2: checks
def rss_mb(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) / 1024


def check_chunked_64mb(srv):
    pid = srv.proc.pid
    before = rss_mb(pid)
    try:  # reset the kernel's peak-RSS mark, so VmHWM afterwards is this request's peak
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        hwm = True
    except OSError:
        hwm = False
    samples, halt = [before], threading.Event()

    def sample():  # also sample: a body buffered then freed leaves no trace in the RSS after
        while not halt.wait(0.01):
            samples.append(rss_mb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    chunk = b"a" * 65536
    r = request(srv.port, "POST", "/v1/completions", [b'{"prompt": "'] + [chunk] * 1024 + [b'"}'], JSON_AUTH, 60)
    halt.set()
    sampler.join()
    peak = max(max(samples), rss_mb(pid, "VmHWM") if hwm else 0)
    grew = peak - before
    return r.status == 413 and grew < 16, f"{r.status or r.error}; peak RSS +{grew:.1f} MB in {r.seconds:.1f} s"


def refused_with_health(srv, body):
    """Send one heavy body while /health is polled: (refused with a 4xx, seconds, worst /health, figure)."""
    poller = Poller(srv.port)
    poller.start()
    time.sleep(0.3)
    r = request(srv.port, "POST", "/v1/completions", body, JSON_AUTH, 60)
    time.sleep(0.1)
    worst = poller.finish()
    refused = r.status is not None and 400 <= r.status < 500
    return refused, r.seconds, worst, f"{r.status or r.error} in {r.seconds:.2f} s; max /health {worst:.3f} s"


def check_many_prompts(srv):
    refused, secs, worst, fig = refused_with_health(srv, comp(prompt=["a"] * 100_000))
    return refused and secs < 1 and worst < 0.2, fig


def check_big_prompt(srv):
    refused, _, worst, fig = refused_with_health(srv, comp(prompt="a" * 900_000))
    return refused and worst < 0.2, fig


def check_stalled(srv):
    """250 connections that never finish a request; returns (does the server still serve, does it close
    them within 30 s)."""
    t0 = time.monotonic()
    socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(250)]
    for s in socks[200:]:  # half a header line, then nothing
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
    try:
        h = request(srv.port, "GET", "/health", timeout=5)
        c = post(srv.port, comp_fields(), timeout=5)
        serving = (h.status == 200 and c.status == 200 and max(h.seconds, c.seconds) < 5,
                   f"/health {h.status or h.error} in {h.seconds:.2f} s, "
                   f"completion {c.status or c.error} in {c.seconds:.2f} s")
        open_, deadline = set(socks), t0 + 30
        while open_ and time.monotonic() < deadline:
            ready, _, _ = select.select(list(open_), [], [], max(0.0, min(1.0, deadline - time.monotonic())))
            for s in ready:
                try:
                    data = s.recv(4096)
                except OSError:
                    data = b""
                if not data:  # EOF or reset: the server closed it (a 408 first is fine: keep reading)
                    open_.discard(s)
        closed = len(socks) - len(open_)
        return serving, (not open_, f"{closed}/{len(socks)} closed by the server within {time.monotonic() - t0:.1f} s")
    finally:
        for s in socks:
            s.close()


LONG = {"prompt": "Bu işlev", "max_tokens": 400, "steps": 400, "block_size": 16, "early_stop": False}


def check_disconnect(srv, stream):
    """Client A starts a long request on a --max-batch 1 server and goes away; B's short request must
    not wait for A's generation."""
    conn = connect(srv.port, "POST", "/v1/completions", json.dumps({**LONG, "stream": stream}).encode(), JSON_AUTH)
    try:
        if stream:  # read up to the first event, then leave
            resp = HTTPResponse(conn[0], method="POST")
            resp.begin()
            line = b"-"
            while line and not line.startswith(b"data:"):
                line = resp.readline()
        else:
            time.sleep(1)
        steps_at_close = metric(srv.port, "diffutron_step_seconds_count")
    finally:
        hang_up(*conn)
    t_close = time.monotonic()
    b = post(srv.port, comp_fields())
    lat = time.monotonic() - t_close
    steps_after = metric(srv.port, "diffutron_step_seconds_count")
    moved = "?" if None in (steps_at_close, steps_after) else f"{steps_after - steps_at_close:.0f}"
    return b.status == 200 and lat < 5, f"B {b.status or b.error} {lat:.2f} s after A left; {moved} steps between"


def context_tokens(repo) -> int:
    with open(os.path.join(repo, "diffutron_engine", "models", "tiny-tr", "config.json")) as f:
        return json.load(f)["max_position_embeddings"]


def check_drain_timeout(srv, repo, drain=1.0):
    # as long as the context allows (the brief's 2000 does not fit tiny-tr's 512): whole 64-token blocks
    # with room for the prompt
    n = (context_tokens(repo) - 64) // 64 * 64
    long = {"prompt": "Bu işlev", "max_tokens": n, "steps": n, "block_size": 64, "early_stop": False}
    lines, nonstream = [], {}

    def streamer():
        body = json.dumps({**long, "stream": True}).encode()
        conn = connect(srv.port, "POST", "/v1/completions", body, JSON_AUTH, 40)
        resp = HTTPResponse(conn[0], method="POST")
        try:
            resp.begin()
            while True:
                line = resp.readline()
                if not line:
                    break
                if line.strip():
                    lines.append(line.strip().decode("utf-8", "replace"))
        except (OSError, HTTPException):
            pass
        finally:
            hang_up(*conn)

    def plain():
        nonstream["r"] = post(srv.port, long, timeout=40)

    threads = [threading.Thread(target=streamer, daemon=True), threading.Thread(target=plain, daemon=True)]
    for t in threads:
        t.start()
        time.sleep(0.4)
    time.sleep(0.6)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    try:
        rc = srv.proc.wait(drain + 20)
    except subprocess.TimeoutExpired:
        rc = None
    took = time.monotonic() - t0
    for t in threads:
        t.join(15)
    r = nonstream.get("r", Reply(error="no reply"))
    ns_ok = r.status == 503 and error_shaped(r.body)
    st_ok = len(lines) >= 2 and lines[-1] == "data: [DONE]" and lines[-2].startswith('data: {"error"')
    stream = "error+[DONE]" if st_ok else f"cut after {len(lines)} events (last: {lines[-1][:40] if lines else '-'})"
    fig = (f"non-stream {r.status or r.error} {r.body[:40].decode('utf-8', 'replace')!r}; stream {stream}; "
           f"exit {rc} after {took:.1f} s")
    return ns_ok and st_ok and rc is not None and took <= drain + 10, fig


def check_gauge(srv):
    def batch_size(body):
        m = re.search(rb"^diffutron_running_batch_size (\S+)$", body, re.M)
        return float(m.group(1)) if m else None

    poller = Poller(srv.port, "/metrics", every=0.02, headers=AUTH, parse=batch_size)
    poller.start()
    codes = []
    workers = [threading.Thread(target=lambda: codes.append(post(srv.port, comp_fields(
        max_tokens=16, steps=16, block_size=16), timeout=120).status)) for _ in range(64)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    poller.finish()
    seen = [v for v in poller.values if v is not None]
    if not seen:
        return False, "diffutron_running_batch_size not found"
    return max(seen) <= 8, f"max {max(seen):.0f} over {len(seen)} scrapes; {codes.count(200)}/64 answered 200"


def check_key(srv):
    no, yes = request(srv.port, "GET", "/v1/models"), request(srv.port, "GET", "/v1/models", headers=AUTH)
    return no.status == 401 and yes.status == 200, f"no key -> {no.status}, key -> {yes.status}"


def check_port_busy(repo, python, port):
    other = Server(repo, python, ["--api-key", KEY], port=port)
    t0 = time.monotonic()
    try:
        rc = other.spawn().wait(120)
    except subprocess.TimeoutExpired:
        rc = None
    took = time.monotonic() - t0
    out = other.output()
    other.stop()
    os.unlink(other.log.name)
    said = re.search(r"\bserving\b.*\bon\b", out) is not None
    return (rc == 2 and not said and took < 10,
            f"exit {rc} after {took:.1f} s; {'printed' if said else 'no'} 'serving on'")


def check_sigterm_drain(srv):
    # 64 tokens and steps (the brief's 16 tokens cap steps at 16: done before the signal lands)
    body = comp_fields(max_tokens=64, steps=64, block_size=16, early_stop=False)
    done = []  # (status, when it came back): one back before the signal would make the check vacuous
    workers = [threading.Thread(target=lambda: done.append((post(srv.port, body, timeout=90).status, time.monotonic())))
               for _ in range(4)]
    for w in workers:
        w.start()
    time.sleep(1)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    for w in workers:
        w.join(90)
    try:
        rc = srv.proc.wait(60)
    except subprocess.TimeoutExpired:
        rc = None
    codes = [c for c, _ in done]
    late = sum(t > t0 for _, t in done)
    took = time.monotonic() - t0
    return (codes.count(200) == 4 and rc == 0,
            f"{codes.count(200)}/4 answered 200 ({late} in flight at SIGTERM); exit {rc} after {took:.1f} s")


def run_checks(repo, python, main_srv, results):
    def run(name, fn, *args):
        log(f"check {name}")
        try:
            results[name] = fn(*args)
        except Exception as exc:  # one broken check is a FAIL with its reason, not the end of the run
            traceback.print_exc()
            results[name] = (False, f"probe error: {type(exc).__name__}: {exc}")
        log(f"  {'PASS' if results[name][0] else 'FAIL'}: {results[name][1]}")

    def on_main(name, fn, *args):  # a check that killed the main server leaves a fresh one to the next
        if main_srv.proc.poll() is not None:
            log(f"main server gone (exit {main_srv.proc.returncode}); restarting")
            main_srv.start()
        run(name, fn, main_srv, *args)

    def metrics_auth(srv):
        r = request(srv.port, "GET", "/metrics")
        return r.status == 401, f"/metrics without key -> {r.status}"

    def docs_off(srv):
        r = request(srv.port, "GET", "/docs", headers=AUTH)
        return r.status == 404, f"/docs with key -> {r.status}"

    closing = {}

    def stalled(srv):  # two result lines: stalled-closed after its own
        serving, closing["stalled-closed"] = check_stalled(srv)
        return serving

    on_main("metrics-auth", metrics_auth)
    on_main("docs-off", docs_off)
    on_main("gauge", check_gauge)
    on_main("many-prompts", check_many_prompts)
    on_main("big-prompt", check_big_prompt)
    on_main("chunked-64MB", check_chunked_64mb)
    on_main("port-busy", lambda srv: check_port_busy(repo, python, srv.port))
    on_main("stalled-connections", stalled)
    for name, (ok, fig) in closing.items():
        results[name] = ok, fig
        log(f"  {name} {'PASS' if ok else 'FAIL'}: {fig}")
    main_srv.stop()

    def with_server(args, env, names_fns):
        srv = Server(repo, python, args, env)
        try:
            srv.start()
            for name, fn in names_fns:
                run(name, fn, srv)
        except RuntimeError as exc:  # start() only: run() keeps the checks' own errors
            for name, _ in names_fns:
                results[name] = (False, f"did not start: {exc}")
                log(f"  FAIL {name}: did not start: {exc}")
        finally:
            srv.stop()
            os.unlink(srv.log.name)

    with_server(["--api-key", KEY, "--max-batch", "1", "--drain-timeout", "1"], {},
                [("nonstream-disconnect", lambda s: check_disconnect(s, False)),
                 ("stream-disconnect", lambda s: check_disconnect(s, True)),
                 ("drain-timeout", lambda s: check_drain_timeout(s, repo))])
    with_server([], {"DIFFUTRON_API_KEY": KEY}, [("key-argv", check_key), ("sigterm-drain", check_sigterm_drain)])
    with tempfile.NamedTemporaryFile("w", prefix="serve-probe-key-", delete=False) as f:
        f.write(KEY + "\n")
    try:
        with_server(["--api-key-file", f.name], {}, [("key-file", check_key)])
    finally:
        os.unlink(f.name)


# ------------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True, help="checkout whose server to probe")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs the server")
    ap.add_argument("--only", choices=("bodies", "checks"))
    ap.add_argument("--save", help="write the summary and every failure as JSON here")
    args = ap.parse_args(argv)
    repo = os.path.abspath(args.repo)
    t0 = time.monotonic()
    tally, failures, checks = {}, [], {}
    origin = package_origin(repo, args.python)
    if os.path.realpath(origin) != os.path.realpath(repo):
        sys.exit(f"serve_probe: {args.python} imports diffutron_engine from {origin or 'nowhere'}, not from {repo}")
    srv, error = Server(repo, args.python, ["--api-key", KEY]), None
    try:
        log(f"starting {repo} on port {srv.port}")
        srv.start()
    except RuntimeError as exc:  # a server that does not start is a result, not a broken probe
        error = f"the server did not start: {exc}"
        log(error)
    try:
        if error is None and args.only != "checks":
            log("part 1: request bodies")
            tally, failures = run_bodies(srv)
        if error is None and args.only != "bodies":
            log("part 2: checks")
            run_checks(repo, args.python, srv, checks)
    finally:
        srv.stop()
        os.unlink(srv.log.name)
    seconds = time.monotonic() - t0

    if error:
        print(f"**{error}**\n")
    if tally:
        print("| category | bodies | held |\n|---|---|---|")
        for cat, t in tally.items():
            print(f"| {cat} | {t['tried']} | {t['held']} |")
        print(f"| **all** | {sum(t['tried'] for t in tally.values())} | {sum(t['held'] for t in tally.values())} |\n")
    if checks:
        print("| check | result | figure |\n|---|---|---|")
        for name, (ok, fig) in checks.items():
            print(f"| {name} | {'PASS' if ok else 'FAIL'} | {fig} |")
        print()
    if failures:
        print("Bodies that did not hold:\n")
        for f in failures:
            print(f"- {f['category']}/{f['name']}: expected {f['expected']}, {f['why']}; got {f['got']}")
        print()
    summary = {"repo": repo, "seconds": round(seconds, 1), "error": error, "bodies": tally,
               "checks": {k: {"pass": ok, "figure": fig} for k, (ok, fig) in checks.items()},
               "not_held": [f"{f['category']}/{f['name']}" for f in failures]}
    return finish(summary, {"failures": failures}, args.save, seconds, log)


if __name__ == "__main__":
    sys.exit(main())
