"""`diffutron-engine bench serve`: load benchmark of a running server.

    diffutron-engine bench serve --url http://127.0.0.1:8000 --num-requests 200 --concurrency 16

Sends streaming completions (prompts from a JSONL file, {"prompt": ...} per line, or generated), at a
fixed concurrency or a Poisson request rate, and reports requests/s, output tokens/s, time to first chunk
and end-to-end latency (p50, p90, p99) and errors; a table, then one JSON line. The report also names the
served model (its /v1/models entry; None where that cannot be read) and the machine the benchmark ran on
(the server's too when the URL is a loopback address).
"""

from __future__ import annotations

import asyncio
import json
import platform
import random
import time

from ..errors import DiffutronError
from .measure import cpu_name


def _percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "p99": None}
    xs = sorted(xs)

    def q(p):
        return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99)}


async def _one(client, url: str, body: dict, headers: dict) -> dict:
    t0 = time.perf_counter()
    first = None
    tokens = 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                return {"ok": False, "error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices") and chunk["choices"][0].get("text") and first is None:
                    first = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except Exception as exc:  # noqa: BLE001 - every failure is counted, the run goes on
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"ok": True, "ttfc": first if first is not None else time.perf_counter() - t0,
            "latency": time.perf_counter() - t0, "tokens": tokens}


async def _model_name(client, url: str, headers: dict) -> str | None:
    """The served model's id from /v1/models, or None (an old server, an error: the load still runs)."""
    try:
        r = await client.get(url + "/v1/models", headers=headers, timeout=10)
        return str(r.json()["data"][0]["id"]) if r.status_code == 200 else None
    except Exception:  # noqa: BLE001 - a name for the report, never a reason to fail the run
        return None


def client_machine() -> dict:
    """The machine the benchmark runs on (torch-free: the client never loads it)."""
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu_name()}


async def run(args) -> dict:
    import httpx

    prompts = _prompts(args)
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    extra = json.loads(args.extra_body) if args.extra_body else {}
    sem = asyncio.Semaphore(args.concurrency)
    rng = random.Random(0)

    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=args.concurrency + 4)) as client:
        model = await _model_name(client, args.url, headers)

        async def job(i):
            body = {"prompt": prompts[i % len(prompts)], "max_tokens": args.max_tokens, "temperature": 0,
                    "stream": True, "stream_options": {"include_usage": True}, **extra}
            async with sem:
                return await _one(client, args.url, body, headers)

        t0 = time.perf_counter()
        tasks = []
        for i in range(args.num_requests):
            tasks.append(asyncio.ensure_future(job(i)))
            if args.request_rate:
                await asyncio.sleep(rng.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["ok"]]
    tokens = sum(r["tokens"] for r in ok)
    return {"requests": args.num_requests, "concurrency": args.concurrency, "request_rate": args.request_rate,
            "errors": len(results) - len(ok), "seconds": wall, "requests_per_s": len(ok) / wall,
            "output_tokens_per_s": tokens / wall, "ttfc_s": _percentiles([r["ttfc"] for r in ok]),
            "latency_s": _percentiles([r["latency"] for r in ok]),
            "error_samples": [r["error"] for r in results if not r["ok"]][:3],
            "model": model, "machine": client_machine()}


def _prompts(args) -> list[str]:
    if args.prompts:
        try:
            with open(args.prompts, encoding="utf-8") as f:
                rows = [json.loads(line)["prompt"] for line in f if line.strip()]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            raise DiffutronError(f"cannot read --prompts {args.prompts!r}: {type(exc).__name__}: {exc} "
                                 '(a {"prompt": ...} object per line)') from None
        if not rows:
            raise DiffutronError(f"--prompts {args.prompts!r} has no prompts")
        return rows
    return [f"Bu işlev {i}" for i in range(64)]


def format_table(report: dict) -> str:
    t, lat = report["ttfc_s"], report["latency_s"]

    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    return "\n".join([
        f"{'requests':<10} {'errors':>6} {'req/s':>8} {'out tok/s':>10} {'TTFC p50/p99 s':>16} "
        f"{'latency p50/p99 s':>18}",
        f"{report['requests']:<10} {report['errors']:>6} {report['requests_per_s']:>8.2f} "
        f"{report['output_tokens_per_s']:>10.1f} {fmt(t['p50']) + '/' + fmt(t['p99']):>16} "
        f"{fmt(lat['p50']) + '/' + fmt(lat['p99']):>18}"])
