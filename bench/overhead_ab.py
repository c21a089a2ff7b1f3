"""`bench overhead` on two checkouts, interleaved, to tell a change from the machine's noise.

    python bench/overhead_ab.py --repo-a /tmp/before --repo-b . --rounds 3 --threads 1

Runs each checkout's own overhead benchmark (`bench overhead`, or `bench --overhead` for checkouts from
before the subcommands: both spellings work there) in a fresh interpreter, A then B, round after round,
so both see the same machine. Prints per batch size the median over rounds of the engine's step and
transformers' forward (ms) for each, the engine/transformers ratio of each, B's step over A's, and the
spread across rounds; then the ops per step; then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

from ab_util import add_checkout_arguments, checkout_problem  # noqa: E402
from diffutron_engine.bench.measure import cpu_name  # noqa: E402
from diffutron_engine.outputs import write_text_file  # noqa: E402


def _run(repo: str, python: str, threads: int, out: str) -> dict:
    """One overhead run of `repo`'s package; its JSON report."""
    cmd = [python, "-m", "diffutron_engine", "bench", "--overhead", "--threads", str(threads), "--save", out,
           "--tag", "ab"]
    env = dict(os.environ, PYTHONPATH=repo, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"{repo}: bench overhead exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(reports: list[dict], batch: int, key: str) -> tuple[float, float]:
    """(median over rounds, max/min over rounds) of row `key` at `batch`."""
    values = [next(r[key] for r in rep["rows"] if r["batch"] == batch) for rep in reports]
    return statistics.median(values), max(values) / min(values)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkout_arguments(ap)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads of every run (default: 1)")
    args = ap.parse_args(argv)
    problem = checkout_problem(args) or ("--threads must be >= 1" if args.threads < 1 else None)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    reports = {"A": [], "B": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for side, repo in (("A", args.repo_a), ("B", args.repo_b)):
                out = os.path.join(tmp, f"{side}{r}")
                os.mkdir(out)
                reports[side].append(_run(os.path.abspath(repo), args.python, args.threads, out))
                print(f"round {r + 1}/{args.rounds} {side}: done", file=sys.stderr, flush=True)
    batches = [row["batch"] for row in reports["A"][0]["rows"]]
    rows = []
    print("| batch | A engine ms | B engine ms | B/A | A tf ms | B tf ms | A engine/tf | B engine/tf | spread A, B |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for b in batches:
        (ea, sa), (eb, sb) = _median(reports["A"], b, "engine_step_ms"), _median(reports["B"], b, "engine_step_ms")
        (ta, _), (tb, _) = _median(reports["A"], b, "hf_ms"), _median(reports["B"], b, "hf_ms")
        row = dict(batch=b, a_engine_ms=round(ea, 3), b_engine_ms=round(eb, 3), b_over_a=round(eb / ea, 3),
                   a_hf_ms=round(ta, 3), b_hf_ms=round(tb, 3), a_engine_over_hf=round(ea / ta, 3),
                   b_engine_over_hf=round(eb / tb, 3), spread_a=round(sa, 3), spread_b=round(sb, 3))
        rows.append(row)
        print(f"| {b} | {ea:.3f} | {eb:.3f} | {eb / ea:.3f} | {ta:.3f} | {tb:.3f} | {ea / ta:.3f} | {eb / tb:.3f} "
              f"| {sa:.2f}, {sb:.2f} |")
    for side in ("A", "B"):  # checkouts with the per-step trace also time a traced step
        if all("trace_cost" in row for rep in reports[side] for row in rep["rows"]):
            costs = {b: _median(reports[side], b, "trace_cost")[0] for b in batches}
            print(f"{side}: traced step / untraced step: " + ", ".join(f"batch {b} {c:.3f}" for b, c in costs.items()))
            for row in rows:
                row[f"{side.lower()}_trace_cost"] = round(costs[row["batch"]], 3)
    ops = {side: sorted({row["ops_per_step"] for rep in reps for row in rep["rows"]}) for side, reps in reports.items()}
    print(f"\nops per step: A {ops['A']}, B {ops['B']}")
    result = {"repo_a": os.path.abspath(args.repo_a), "repo_b": os.path.abspath(args.repo_b), "rounds": args.rounds,
              "threads": args.threads, "cpu": cpu_name(), "rows": rows, "ops_per_step": ops}
    if args.save:
        write_text_file(args.save, json.dumps(result, indent=2) + "\n", "--save")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
