"""A real `diffutron-engine serve` process on a loopback port for the server tests: started on port 0
(the server picks a free port and names it on its "serving on" line, so two test runs never race for
one), its output collected by a thread (a full pipe would block the server), stopped with SIGTERM."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEY = "sekret-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
KNOBS = dict(steps=8, block_size=8)


def server_env(**extra) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    env.pop("DIFFUTRON_API_KEY", None)
    env.update(extra)
    return env


class Server:
    def __init__(self, *flags, env: dict | None = None, key: str | None = KEY, wait: bool = True):
        env = server_env(**({"DIFFUTRON_API_KEY": key} if key else {}), **(env or {}))
        self.cmd = [sys.executable, "-m", "diffutron_engine.cli.main", "serve", "--model", "tiny-tr", "--port", "0",
                    "--max-batch", "8", *flags]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = None
        if wait:
            self.wait_ready()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", "replace"))

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = re.search(r"serving \S+ on http://127\.0\.0\.1:(\d+)/v1", self.log)
            if found:
                self.port = int(found.group(1))
                self.url = f"http://127.0.0.1:{self.port}"
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {self.log[-2000:]}")
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server did not start within {timeout} s: {self.log[-2000:]}")

    def request(self, method: str, path: str, body: bytes | None = None, headers=None, timeout: float = 60):
        """(status, parsed JSON or text) of one request. A server that refuses a body before reading it
        all (413) answers and closes while the body is still being sent: the send fails with a broken
        pipe, and the answer is read anyway."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            try:
                conn.request(method, path, body=body,
                             headers={"content-type": "application/json", "connection": "close", **(headers or {})})
            except (BrokenPipeError, ConnectionResetError):
                pass  # the answer, if the server sent one, is waiting to be read
            response = conn.getresponse()
            status, raw = response.status, response.read()
        finally:
            conn.close()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def post(self, path: str, body, headers=None, timeout: float = 60):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request("POST", path, data, {**AUTH, **(headers or {})}, timeout)

    def get(self, path: str, headers=None, timeout: float = 60):
        return self.request("GET", path, None, headers, timeout)

    def metrics(self) -> dict[str, float]:
        status, text = self.get("/metrics", AUTH, timeout=10)
        assert status == 200, text
        return {name: float(value) for name, value in
                (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._reader.join(5)
        return self.proc.returncode


def raw_http(sock: socket.socket, head: str, body: bytes = b"") -> None:
    sock.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)


def read_response(sock: socket.socket, timeout: float = 30) -> tuple[int, bytes]:
    """Status and everything the server sent until it closed the connection or went quiet."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            part = sock.recv(65536)
            if not part:
                break
            data += part
            if b"\r\n\r\n" in data and _complete(data):
                break
    except (socket.timeout, ConnectionResetError):
        pass
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    found = re.search(rb"content-length: *(\d+)", head, re.I)
    return bool(found) and len(body) >= int(found.group(1))


def redraw(trace: list, k: int | None = None) -> list[int]:
    """The canvas after step k of a trace over HTTP (all steps when None; 0: before the first): start
    from `start`, write each step's tokens at its positions, take `canvas` whole where given."""
    tokens = list(trace[0]["start"]["tokens"])
    for step in trace[: len(trace) if k is None else k]:
        for pos, tok in zip(step["positions"], step["tokens"]):
            tokens[pos] = tok
        if "canvas" in step:
            tokens = list(step["canvas"]["tokens"])
    return tokens
