"""`diffutron-engine serve`: the OpenAI-compatible server (WIP, issue 11)."""

from __future__ import annotations

import argparse
import signal
import sys

from ..config import CACHE_MODES, FAST_PRESET
from ..errors import DiffutronError
from ..loading import DEFAULT_MODEL, DEVICES, DTYPES


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description="Serve completions and chat completions (with streaming) over HTTP, the "
                       "OpenAI way. Needs the `serve` extra: pip install 'diffutron-engine[serve]'.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local directory (default: {DEFAULT_MODEL})")
    p.add_argument("--served-model-name", help="the model's name in the API (default: --model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="requests stepped together (default: 8)")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)} (default: auto)")
    p.add_argument("--cache", choices=CACHE_MODES, help="K/V reuse across the steps of a block (default: none)")
    p.add_argument("--fast", action="store_true",
                   help=f"the measured fast setting: {', '.join(f'{k}={v}' for k, v in FAST_PRESET.items())}")
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 (default: no key)")
    p.add_argument("--max-queue", type=int, default=256, help="requests in flight before 429 (default: 256)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="on SIGTERM/SIGINT, seconds to finish the requests in flight (default: 60)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from ..server.app import create_app
    except ImportError as exc:
        raise DiffutronError(f"serving needs the `serve` extra ({exc.name} is missing): "
                             "pip install 'diffutron-engine[serve]'") from None
    from ..engine import Engine
    from ..server.loop import EngineLoop

    if not 0 < args.port < 65536:
        raise DiffutronError(f"--port must be in 1..65535, got {args.port}")
    if args.max_queue < 1 or args.drain_timeout < 0:
        raise DiffutronError("--max-queue must be >= 1 and --drain-timeout >= 0")
    cache = args.cache or (FAST_PRESET["cache"] if args.fast else "none")
    engine = Engine.from_pretrained(args.model, dtype=args.dtype, device=args.device, max_batch=args.max_batch,
                                    cache=cache)
    loop = EngineLoop(engine)
    loop.start()
    app = create_app(loop, args.served_model_name or args.model, api_key=args.api_key, max_queue=args.max_queue)
    print(f"diffutron-engine: serving {args.model} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    # SIGTERM/SIGINT: uvicorn stops accepting, lets the requests in flight finish (up to the drain
    # timeout), then hands the signal to the handler that was there before it; that one does nothing,
    # so the drained server exits 0 instead of dying of the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=args.drain_timeout)
    finally:
        loop.stop(timeout=30)
    return 0
