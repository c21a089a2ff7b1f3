"""`bench serve` on two checkouts of the server, interleaved, to tell a change from the machine's noise.

    python bench/serve_ab.py --repo-a /tmp/before --repo-b . --concurrency 1 16 64 --rounds 3

Starts `serve --model tiny-tr` from each checkout (one server at a time, so they never share the CPU),
and for each round and concurrency runs the same load (streaming completions, this checkout's client)
against A then B. Prints per concurrency the median over rounds of output tokens/s and p50 latency for
each, their ratio B/A, and the spread across rounds (what noise looks like here); then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffutron_engine.bench import serve as bench_serve  # noqa: E402
from diffutron_engine.bench.measure import cpu_name  # noqa: E402
from diffutron_engine.outputs import write_text_file  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_util import add_checkout_arguments, checkout_problem  # noqa: E402
from serve_probe import Server  # noqa: E402  (one way to start a checkout's server)

KEY = "serve-ab-key"


def _load(url: str, concurrency: int, requests: int, max_tokens: int, extra: dict) -> dict:
    args = argparse.Namespace(url=url, num_requests=requests, concurrency=concurrency, request_rate=None,
                              max_tokens=max_tokens, prompts=None, extra_body=json.dumps(extra), api_key=KEY)
    return asyncio.run(bench_serve.run(args))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkout_arguments(ap)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--requests-per-client", type=int, default=4, help="requests = concurrency x this (min 16)")
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    problem = checkout_problem(args) or ("--concurrency must be >= 1" if min(args.concurrency) < 1 else None)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    extra = {"steps": args.max_tokens, "block_size": args.max_tokens}
    rows: dict[tuple[str, int], list[dict]] = {}
    max_batch = max(args.concurrency)
    for r in range(args.rounds):
        for side, repo in (("A", args.repo_a), ("B", args.repo_b)):
            # --api-key works in every version of the server (newer ones warn and prefer a file)
            server = Server(os.path.abspath(repo), args.python, ["--max-batch", str(max_batch), "--max-queue", "1024",
                                                                 "--api-key", KEY]).start()
            url = f"http://127.0.0.1:{server.port}"
            try:
                _load(url, 4, 16, args.max_tokens, extra)  # warm-up
                for c in args.concurrency:
                    report = _load(url, c, max(16, c * args.requests_per_client), args.max_tokens, extra)
                    rows.setdefault((side, c), []).append(report)
                    print(f"round {r + 1} {side} c{c}: {report['output_tokens_per_s']:.0f} tok/s, p50 "
                          f"{report['latency_s']['p50']:.3f} s, errors {report['errors']}", file=sys.stderr)
            finally:
                server.stop()
                os.unlink(server.log.name)
    summary = []
    print("\n| concurrency | A tok/s | B tok/s | B/A | A p50 s | B p50 s | B/A | spread A, B (tok/s, max/min) | errors |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for c in args.concurrency:
        a, b = rows[("A", c)], rows[("B", c)]
        ta = statistics.median(x["output_tokens_per_s"] for x in a)
        tb = statistics.median(x["output_tokens_per_s"] for x in b)
        la = statistics.median(x["latency_s"]["p50"] for x in a)
        lb = statistics.median(x["latency_s"]["p50"] for x in b)
        spread = [max(x["output_tokens_per_s"] for x in xs) / min(x["output_tokens_per_s"] for x in xs) for xs in (a, b)]
        errors = sum(x["errors"] for x in a + b)
        print(f"| {c} | {ta:.0f} | {tb:.0f} | {tb / ta:.2f} | {la:.3f} | {lb:.3f} | {lb / la:.2f} | "
              f"{spread[0]:.2f}, {spread[1]:.2f} | {errors} |")
        summary.append({"concurrency": c, "a_tokens_per_s": ta, "b_tokens_per_s": tb, "ratio_tokens": tb / ta,
                        "a_p50_s": la, "b_p50_s": lb, "ratio_p50": lb / la, "spread": spread, "errors": errors})
    out = {"repo_a": args.repo_a, "repo_b": args.repo_b, "rounds": args.rounds, "max_tokens": args.max_tokens,
           "hardware": {"cpu": cpu_name(), "cores": os.cpu_count()}, "rows": summary}
    if args.save:
        write_text_file(args.save, json.dumps(out, indent=1), "--save")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
