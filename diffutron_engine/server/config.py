"""The server's settings, declared once and validated: what the command line fills, what the app, the
serving layer and the HTTP protocol read. Without torch or FastAPI, so that `serve` refuses bad flags
before it imports either."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..errors import DiffutronError


@dataclass(frozen=True)
class ServerConfig:
    """Bounds on what one client can make the server hold or do, checked before the work they bound.

    - max_body_bytes: a request body, counted as it is read (with or without a Content-Length).
    - max_prompt_bytes: one prompt (or one chat's messages), in UTF-8, checked before tokenizing.
    - max_queue: requests (prompts x n) in flight; a request that could never fit is a 400, one that
      does not fit now a 429. It is also the cap on prompts x n in one request.
    - max_n: choices per prompt.
    - max_connections: open connections; one beyond is closed as it is accepted.
    - timeout_header: seconds from a connection's first byte (or its previous response) to the end of
      a request's headers; a connection that takes longer is closed (0: no limit).
    - timeout_body: seconds to read a whole request body (408 past it); 0: no limit, as for the others.
    - timeout_keep_alive: seconds an idle keep-alive connection stays open.
    - drain_timeout: on SIGTERM/SIGINT, seconds the requests in flight have to finish; the ones still
      running then end with an error (503, or an SSE error event).
    - api_key: the bearer key every route but /health requires (None: no key).
    - docs: serve /docs and /openapi.json (behind the key like the rest).
    - defaults: SamplingParams fields every request starts from (`--fast` sets the threshold).
    """

    model_name: str = "model"
    max_body_bytes: int = 1 << 20
    max_prompt_bytes: int = 256 << 10
    max_queue: int = 256
    max_n: int = 16
    max_connections: int = 1024
    timeout_header: float = 10.0
    timeout_body: float = 30.0
    timeout_keep_alive: float = 5.0
    drain_timeout: float = 60.0
    api_key: str | None = field(default=None, repr=False)  # never printed
    docs: bool = False
    defaults: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_prompt_bytes", "max_queue", "max_n", "max_connections"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise DiffutronError(f"{_flag(name)} must be an integer >= 1, got {v!r}")
        for name in ("timeout_header", "timeout_body", "timeout_keep_alive", "drain_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise DiffutronError(f"{_flag(name)} must be a finite number of seconds >= 0, got {v!r}")
        if self.api_key is not None:
            if not self.api_key or self.api_key != self.api_key.strip():
                raise DiffutronError("the API key must be non-empty, without leading or trailing white space")
            if not all(0x21 <= ord(c) <= 0x7E for c in self.api_key):
                raise DiffutronError("the API key must be printable ASCII (it travels in an HTTP header)")
        if not isinstance(self.model_name, str) or not self.model_name:
            raise DiffutronError("the served model name must be a non-empty string")

    def replace(self, **kwargs) -> "ServerConfig":
        return dataclasses.replace(self, **kwargs)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
