"""The HTTP server under the app: the listening socket, uvicorn's connection protocol with the bounds
uvicorn lacks, and a shutdown that answers every request it stops.

- The socket is bound before the model loads, so a busy port is one line and exit 2 in a second, not
  a model load followed by uvicorn's bind error.
- uvicorn puts no limit on how long a client may take to send its headers, and counts a connection
  against `limit_concurrency` only once a request arrives: stalled connections pile up until the file
  descriptors run out. The protocol here closes a connection whose headers are not complete
  `timeout_header` seconds after its first byte was due, and closes a connection beyond
  `max_connections` as it is accepted.
- On SIGTERM/SIGINT uvicorn stops accepting and waits for the requests in flight; at `drain_timeout`
  the ones still running are ended with an error their clients receive (503, or an SSE error event),
  instead of uvicorn cancelling them into an empty reply.
"""

from __future__ import annotations

import logging
import resource
import socket
import threading

from ..errors import DiffutronError
from .config import ServerConfig
from .loop import EngineLoop, ShuttingDown

log = logging.getLogger("diffutron_engine.server")

# file descriptors kept for everything that is not a client connection (model files, logs, threads)
FD_RESERVE = 64


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), or a DiffutronError naming the cause."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        raise DiffutronError(f"cannot listen on {host!r}: the address does not resolve ({exc})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        # a restarted server may bind while the old connections sit in TIME_WAIT; two listeners on one
        # port are still refused (that would take SO_REUSEPORT)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = "the port is in use" if exc.errno in (98, 48, 10048) else exc.strerror or str(exc)
        raise DiffutronError(f"cannot listen on {host}:{port}: {reason}") from None
    sock.set_inheritable(True)
    return sock


def connection_budget(wanted: int) -> int:
    """Raise the soft file-descriptor limit toward the hard one as far as `wanted` connections need, and
    return how many connections fit under it (with FD_RESERVE kept back)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - FD_RESERVE))


def guarded_protocol(base: type, config: ServerConfig, max_connections: int) -> type:
    """`base` (uvicorn's h11 or httptools protocol) with a header timeout and a connection cap."""

    class GuardedProtocol(base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._header_timer, self._header_for = None, None
            if len(self.connections) > max_connections:  # over the cap: closed before it costs more
                transport.abort()
                return
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # bytes of a next request on a kept-alive connection: its headers are due in time too. A timer
            # still pending from an earlier request is replaced; one armed for this wait is kept, so bytes
            # trickled one at a time never push the deadline back.
            if (self.cycle is None or self.cycle.response_complete) and (
                    self._header_timer is None or self._header_for is not self.cycle):
                if self._header_timer is not None:
                    self._header_timer.cancel()
                self._arm_header_timer()

        def connection_lost(self, exc) -> None:
            if getattr(self, "_header_timer", None) is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self._header_for = self.cycle
            if config.timeout_header > 0:
                self._header_timer = self.loop.call_later(config.timeout_header, self._header_timeout, self.cycle)

        def _header_timeout(self, cycle_then) -> None:
            self._header_timer = None
            if self.cycle is cycle_then and not self.transport.is_closing():  # no request since: stalled
                self.transport.close()

    GuardedProtocol.__name__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def make_server(app, loop: EngineLoop, config: ServerConfig, max_connections: int):
    """A uvicorn Server for `app` with the bounds above and the answered drain."""
    import uvicorn

    uv_config = uvicorn.Config(
        app, log_level="warning", lifespan="off",
        timeout_keep_alive=config.timeout_keep_alive,
        # after the drain deadline the requests still running are answered with an error: leave time
        # for those answers to be written before uvicorn cancels what is left
        timeout_graceful_shutdown=config.drain_timeout + 5,
    )
    uv_config.load()  # picks the protocol ("auto": httptools where installed, else h11); then guarded
    uv_config.http_protocol_class = guarded_protocol(uv_config.http_protocol_class, config, max_connections)

    class DrainingServer(uvicorn.Server):
        _deadline: threading.Timer | None = None

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            if self._deadline is None:
                self._deadline = threading.Timer(config.drain_timeout, self._end_the_rest)
                self._deadline.daemon = True
                self._deadline.start()

        @staticmethod
        def _end_the_rest() -> None:
            if loop.in_flight:
                log.warning("drain timeout (%g s): ending %d requests still running", config.drain_timeout,
                            loop.in_flight)
            loop.fail_all(ShuttingDown(f"the drain timeout of {config.drain_timeout:g} s passed"))

        def cancel_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()

    return DrainingServer(uv_config)
