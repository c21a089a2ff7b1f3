"""`diffutron-engine serve`: the OpenAI-compatible server (diffutron_engine/server/, docs/serving.md).

Everything a flag can get wrong is refused before the model loads, the port included: one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import stat
import sys
import warnings

from ..errors import DiffutronError, DiffutronWarning
from ..server.config import ServerConfig
from .engine_args import add_engine_arguments, add_model_arguments, engine_config, model_arguments, request_defaults

KEY_ENV = "DIFFUTRON_API_KEY"
_D = ServerConfig()  # the defaults, shown in --help

# The bounds' flags: ServerConfig field -> what it bounds.
_BOUNDS = (
    ("max_queue", "requests (prompts x n) in flight before 429; also the most one request may hold"),
    ("max_body_bytes", "largest request body, counted as it arrives"),
    ("max_prompt_bytes", "largest prompt (or chat), checked before tokenizing"),
    ("max_connections", "open connections; more are closed as they arrive, and the file-descriptor limit is "
                        "raised to fit them where it can"),
    ("timeout_header", "seconds a connection has to send a request's headers"),
    ("timeout_body", "seconds a client has to send a whole body before 408"),
    ("timeout_keep_alive", "seconds an idle connection is kept open"),
)


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="Serve completions and chat completions (with streaming) over HTTP, the "
                       "OpenAI way. Needs the `serve` extra: pip install 'diffutron-engine[serve]'.")
    add_model_arguments(p)
    p.add_argument("--served-model-name", help="the model's name in the API (default: --adapter, else --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one (default: 8000)")
    eng = p.add_argument_group("engine (fast modes change outputs; exact mode is the default)")
    eng.add_argument("--max-batch", type=int, default=8, help="requests stepped together (default: 8)")
    add_engine_arguments(eng)  # --fast: its request part is every request's default; a request may replace it
    key = p.add_argument_group("the API key (required on every route but /health once set)")
    key.add_argument("--api-key-file", metavar="FILE", help="read the key from FILE (its first line)")
    key.add_argument("--api-key", metavar="KEY",
                     help=f"the key itself: visible to every local user in `ps`; prefer --api-key-file or "
                     f"the {KEY_ENV} environment variable")
    lim = p.add_argument_group("bounds on what one client can hold")
    for name, what in _BOUNDS:  # each flag is ServerConfig's field of the same name, its default shown
        default = getattr(_D, name)
        shown = f"{default:g}" if isinstance(default, float) else str(default)
        lim.add_argument("--" + name.replace("_", "-"), type=type(default), default=default,
                         help=f"{what} (default: {shown})")
    p.add_argument("--drain-timeout", type=float, default=_D.drain_timeout,
                   help="on SIGTERM/SIGINT, seconds the requests in flight have to finish; the rest then get "
                   f"an error (default: {_D.drain_timeout:g})")
    p.add_argument("--docs", action="store_true", help="serve /docs and /openapi.json (behind the key)")
    p.set_defaults(func=run)


def read_api_key(args: argparse.Namespace) -> str | None:
    """The key from --api-key-file, DIFFUTRON_API_KEY or --api-key (with a warning), at most one of them."""
    given = [name for name, v in (("--api-key-file", args.api_key_file), ("--api-key", args.api_key)) if v is not None]
    if len(given) > 1:
        raise DiffutronError("give the key one way: --api-key-file or --api-key (or DIFFUTRON_API_KEY), not both")
    if args.api_key_file is not None:
        try:
            with open(args.api_key_file, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                raw = f.read(4097)
        except OSError as exc:
            raise DiffutronError(f"cannot read --api-key-file {args.api_key_file}: {exc.strerror or exc}") from None
        if len(raw) > 4096:
            raise DiffutronError(f"--api-key-file {args.api_key_file} is over 4 KiB: not a key file")
        try:
            lines = raw.decode("utf-8").splitlines()
        except UnicodeDecodeError:
            raise DiffutronError(f"--api-key-file {args.api_key_file} is not UTF-8 text") from None
        if not lines or not lines[0].strip():
            raise DiffutronError(f"--api-key-file {args.api_key_file} is empty: its first line is the key")
        if stat.S_ISREG(mode) and mode & 0o077:
            warnings.warn(f"--api-key-file {args.api_key_file} can be read by other users (chmod 600 it)",
                          DiffutronWarning, stacklevel=2)
        return lines[0].strip()
    if args.api_key is not None:
        warnings.warn(f"--api-key shows the key to every local user in the process list; use --api-key-file or "
                      f"{KEY_ENV}", DiffutronWarning, stacklevel=2)
        return args.api_key
    env = os.environ.get(KEY_ENV)
    if env is not None and not env.strip():
        raise DiffutronError(f"{KEY_ENV} is set but empty; unset it to serve without a key")
    return env


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        model_name=args.served_model_name or args.model, max_body_bytes=args.max_body_bytes,
        max_prompt_bytes=args.max_prompt_bytes, max_queue=args.max_queue, max_connections=args.max_connections,
        timeout_header=args.timeout_header, timeout_body=args.timeout_body,
        timeout_keep_alive=args.timeout_keep_alive, drain_timeout=args.drain_timeout, api_key=read_api_key(args),
        docs=args.docs, defaults=request_defaults(args))


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port < 65536:
        raise DiffutronError(f"--port must be in 0..65535 (0: a free one), got {args.port}")
    if isinstance(args.max_batch, bool) or args.max_batch < 1:
        raise DiffutronError(f"--max-batch must be >= 1, got {args.max_batch}")
    _, adapter = model_arguments(args)  # --adapter checked, args.model the base, before anything loads
    if adapter is not None and args.served_model_name is None:
        args.served_model_name = args.adapter  # the API names what it serves: the adapted model, not its base
    config = server_config(args)
    engine_cfg = engine_config(args, max_batch=args.max_batch)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise DiffutronError(f"serving needs the `serve` extra ({exc.name} is missing): "
                             "pip install 'diffutron-engine[serve]'") from None
    from ..server.http import bind_socket, connection_budget

    max_connections = connection_budget(config.max_connections)
    if max_connections < config.max_connections:
        warnings.warn(f"the file-descriptor limit fits {max_connections} connections, not --max-connections "
                      f"{config.max_connections} (raise `ulimit -n`)", DiffutronWarning, stacklevel=2)
    sock = bind_socket(args.host, args.port)  # before the model: a busy port is one line, at once
    if config.api_key is None and not ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback:
        warnings.warn(f"serving on {args.host} without a key: anyone who reaches this address can use the model "
                      f"(set {KEY_ENV} or --api-key-file)", DiffutronWarning, stacklevel=2)
    try:
        return _serve(args, engine_cfg, config, sock, max_connections)
    finally:
        sock.close()


def _serve(args, engine_cfg, config: ServerConfig, sock, max_connections: int) -> int:
    from ..engine import Engine
    from ..server.app import create_app
    from ..server.http import make_server
    from ..server.loop import EngineLoop

    engine = Engine.from_pretrained(args.model, engine_cfg, adapter=args.adapter)
    loop = EngineLoop(engine)
    app = create_app(loop, config)
    server = make_server(app, loop, config, max_connections)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    loop.start()
    print(f"diffutron-engine: serving {args.model} on http://{shown}:{port}/v1", file=sys.stderr, flush=True)
    # SIGTERM/SIGINT: uvicorn stops accepting, lets the requests in flight finish (up to the drain
    # timeout), then hands the signal to the handler that was there before it; that one does nothing,
    # so the drained server exits 0 instead of dying of the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        server.cancel_deadline()
        loop.stop(timeout=30)
        app.serving.close()
    return 0
