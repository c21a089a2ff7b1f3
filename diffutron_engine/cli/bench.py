"""`diffutron-engine bench BENCHMARK`: the benchmarks of diffutron_engine.bench, one subcommand each.

    bench throughput   the oracle and each engine mode on the same prompts (random mmBERT weights)
    bench overhead     the engine's own cost beside transformers' bare forward (a 1-layer model)
    bench eval         lm-eval's work: the Monte-Carlo likelihood (plain vs batched) and generate_until
                       (one request at a time through the oracle vs the engine's batch)
    bench serve        load on a running server
    bench plot         a PNG of saved reports (throughput, eval, or serve reports: one per concurrency)

Each prints a readable table, then one JSON line last; `--save FOLDER` also writes the report there
and `--plot FILE` (throughput, eval, serve; needs matplotlib) a PNG of it (the folder, the file and
matplotlib are checked before the measuring, bad flags before anything is built). `bench [FLAGS]`
runs `bench throughput [FLAGS]`, and `bench --overhead` runs `bench overhead`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import DiffutronError


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: throughput (default), overhead, eval, serve; plot",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                       default_subcommand="throughput")
    kinds = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", parser_class=type(p))
    kinds.required = True
    for name, what, add_arguments, run in (
            ("throughput", "end-to-end throughput: the oracle vs the engine's modes (random mmBERT weights)",
             add_throughput_arguments, run_throughput),
            ("overhead", "the engine's own cost: its step beside transformers' bare forward on a 1-layer model, "
             "at batch 1, 8, 32, 64", add_overhead_arguments, run_overhead),
            ("eval", "lm-eval's work on a masked diffusion LM: the Monte-Carlo likelihood (the plain implementation "
             "vs the batched one of the lm-eval model) and generate_until (per-request sampling through the "
             "oracle vs the engine's continuous batch), same requests and seed", add_eval_arguments, run_eval),
            ("serve", "load benchmark of a running server: requests/s, output tokens/s, time to first chunk, "
             "latency percentiles", add_serve_arguments, run_serve),
            ("plot", "a PNG of saved JSON reports, without measuring: one throughput or eval report, or serve "
             "reports (one per concurrency, drawn side by side)", add_plot_arguments, run_plot)):
        q = kinds.add_parser(name, help=what, description=what)
        add_arguments(q)
        q.set_defaults(func=run)


# ------------------------------------------------------------------------------------------ shared
def _at_least(least: int):
    """An argparse type: an integer >= least."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r:.40}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least}, got {value}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r:.40}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _add_report_arguments(p, tag_help: str, tag_default=None) -> None:
    p.add_argument("--save", metavar="FOLDER", help="also write the JSON report into FOLDER (e.g. bench/results)")
    p.add_argument("--tag", default=tag_default, help=f"file name tag for --save ({tag_help})")


def _check_save(args, tag: str) -> None:
    """Before the measuring (minutes): a report that could not be saved is refused now."""
    if args.save is not None:
        from ..outputs import check_report_folder

        check_report_folder(args.save, tag)


def _add_plot_argument(p) -> None:
    p.add_argument("--plot", metavar="FILE", help="also draw the report as a PNG into FILE (needs matplotlib: "
                   "pip install -e '.[plot]')")


def _check_plot(args, tag: str, inputs: tuple = ()):
    """Before the measuring: matplotlib importable, --plot a file that can be written (and not the report
    --save writes); its checked target, or None without --plot."""
    if getattr(args, "plot", None) is None:
        return None
    from ..bench.plot import require_matplotlib
    from ..outputs import check_file_output, report_path

    require_matplotlib("--plot")
    target = check_file_output(args.plot, "--plot", inputs)
    if args.save is not None and os.path.realpath(report_path(args.save, tag)) == target.path:
        raise DiffutronError(f"--plot {args.plot!r} is the report --save writes; give the PNG another name")
    return target


def _print_report(args, tag: str, report: dict, table: str, saved: dict | None = None, plot=None,
                  draw=None) -> None:
    """The table, then (with --save) the report's file named on stderr, (with --plot) the PNG drawn by
    draw(report) and named on stderr, then the report as the last line."""
    print(table)
    full = report if saved is None else saved
    if args.save is not None:
        from ..outputs import save_report

        print(f"saved {save_report(full, args.save, tag)}", file=sys.stderr)
    if plot is not None:
        from ..bench.plot import render
        from ..outputs import write_file

        write_file(plot, render(draw(full)), "--plot")
        print(f"plotted {plot.given}", file=sys.stderr)
    print(json.dumps(report))


def _log(line: str) -> None:
    print(line, file=sys.stderr)


# ------------------------------------------------------------------------------------------ throughput
def _modes(text: str) -> tuple[str, ...]:
    from ..bench.modes import check_modes

    try:
        return check_modes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_throughput_arguments(p) -> None:
    from ..bench.modes import BENCH_MODES, DEFAULT_BENCH_MODES

    positive = _at_least(1)
    p.add_argument("--batch-size", type=positive, default=1)
    p.add_argument("--prompt-len", type=positive, default=64)
    p.add_argument("--new-tokens", type=positive, default=128)
    p.add_argument("--block-size", type=positive, default=32)
    p.add_argument("--steps", type=positive, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=positive, default=22, help="fewer layers for quick runs (real model: 22)")
    p.add_argument("--modes", type=_modes, default=DEFAULT_BENCH_MODES,
                   help=f"comma-separated, from: {', '.join(BENCH_MODES)} (default: {','.join(DEFAULT_BENCH_MODES)})")
    p.add_argument("--threads", type=positive, help="torch CPU threads")
    p.add_argument("--init-std", type=float, default=0.02,
                   help="random weight std; 0.02 gives flat next-token distributions, larger gives peaked ones")
    p.add_argument("--vocab-size", type=positive,
                   help="smaller vocabulary for quick checks (default: mmBERT's 256,000)")
    p.add_argument("--cuda-graphs", action="store_true", help="engine modes replay forwards from CUDA graphs")
    _add_report_arguments(p, "default: derived from the config")
    _add_plot_argument(p)
    # the spelling from before the subcommands: `bench --overhead` runs `bench overhead` (which reads only
    # --threads, --save and --tag)
    p.add_argument("--overhead", action="store_const", dest="func", const=run_overhead, help=argparse.SUPPRESS)


def run_throughput(args) -> int:
    from ..bench.throughput import BenchConfig, format_table, run

    try:
        cfg = BenchConfig(batch_size=args.batch_size, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                          block_size=args.block_size, steps=args.steps, temperature=args.temperature,
                          dtype=args.dtype, device=args.device, layers=args.layers, modes=args.modes,
                          threads=args.threads, init_std=args.init_std, vocab_size=args.vocab_size,
                          cuda_graphs=args.cuda_graphs)
    except ValueError as exc:
        raise DiffutronError(str(exc)) from None
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DiffutronError("--device cuda was asked for but no CUDA GPU is available")
    tag = args.tag or f"bench-{cfg.device}-b{cfg.batch_size}-t{cfg.temperature:g}-L{cfg.layers}-{cfg.dtype}"
    _check_save(args, tag)
    plot = _check_plot(args, tag)
    report = run(cfg, log=_log)
    from ..bench.plot import plot_throughput

    _print_report(args, tag, report, format_table(report), plot=plot, draw=plot_throughput)
    return 0


# ------------------------------------------------------------------------------------------ overhead
def add_overhead_arguments(p) -> None:
    p.add_argument("--threads", type=_at_least(1), help="torch CPU threads")
    _add_report_arguments(p, "default: overhead-cpu")


def run_overhead(args) -> int:
    from ..bench.overhead import OverheadConfig, format_table, run

    try:
        cfg = OverheadConfig(threads=args.threads)
    except ValueError as exc:
        raise DiffutronError(str(exc)) from None
    if getattr(args, "plot", None):  # `bench --overhead` parses the throughput flags
        raise DiffutronError("--plot draws throughput, eval and serve reports; bench overhead has no plot")
    tag = args.tag or "overhead-cpu"
    _check_save(args, tag)
    report = run(cfg, log=_log)
    _print_report(args, tag, report, format_table(report))
    return 0


# ------------------------------------------------------------------------------------------ eval
def _phases(text: str) -> tuple[str, ...]:
    from ..bench.likelihood import check_phases  # torch is imported only inside its functions

    try:
        return check_phases(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_eval_arguments(p) -> None:
    p.add_argument("--phases", type=_phases, default=("likelihood", "generation"),
                   help="comma-separated, from: likelihood, generation (default: both; the defaults take about "
                        "10 minutes on 2 CPU threads, the generation phase about 7 of them)")
    p.add_argument("--layers", type=_at_least(1), default=2,
                   help="transformer layers of the random mmBERT (default: 2)")
    p.add_argument("--requests", type=_at_least(1), default=16, help="(context, continuation) pairs (default: 16)")
    p.add_argument("--mc-num", type=int, default=32, help="noisy copies per request (default: 32)")
    p.add_argument("--batch-size", type=int, default=32, help="copies per stratified draw (default: 32)")
    p.add_argument("--vocab", type=_at_least(1000), default=256_000, help="vocabulary size, >= 1000 (the "
                   "benchmark tokenizer's; default: mmBERT's 256,000)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    p.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--token-budget", type=_at_least(1), default=None, help="tokens per batched forward "
                   "(default: 8192 on CPU, 65536 on CUDA)")
    p.add_argument("--seed", type=_at_least(0), default=0)
    p.add_argument("--threads", type=_at_least(1), default=None, help="torch CPU threads")
    p.add_argument("--gen-requests", type=_at_least(1), default=32,
                   help="generation: requests, all sent to the engine at once (default: 32)")
    p.add_argument("--gen-new-tokens", type=_at_least(1), default=32,
                   help="generation: max_new_tokens of each request; steps the same, blocks of up to 32 "
                        "(default: 32)")
    p.add_argument("--gen-max-batch", type=_at_least(1), default=32,
                   help="generation: the engine's max_batch, rows decoded together (default: 32)")
    p.add_argument("--gen-plain-requests", type=_at_least(1), default=None,
                   help="generation: how many of the requests (evenly spaced) the one-at-a-time oracle answers; "
                        "its requests/s does not depend on how many wait (default: 8, or all when fewer; at most "
                        "--gen-requests)")
    _add_report_arguments(p, "default: eval-<device>-l<layers>")
    _add_plot_argument(p)


def run_eval(args) -> int:
    from ..bench.likelihood import format_table, run
    from ..bench.plot import plot_eval
    from ..loading import resolve_device

    if args.gen_plain_requests is None:
        args.gen_plain_requests = min(8, args.gen_requests)
    if "generation" in args.phases and args.gen_plain_requests > args.gen_requests:
        raise DiffutronError(f"--gen-plain-requests {args.gen_plain_requests} is more than --gen-requests "
                             f"{args.gen_requests}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tag = args.tag or f"eval-{resolve_device(args.device).split(':')[0]}-l{args.layers}"
    _check_save(args, tag)
    plot = _check_plot(args, tag)
    report = run(args.layers, args.requests, args.mc_num, args.batch_size, args.vocab, args.device, args.dtype,
                 args.seed, args.token_budget, log=_log, phases=args.phases, gen_requests=args.gen_requests,
                 gen_new_tokens=args.gen_new_tokens, gen_max_batch=args.gen_max_batch,
                 gen_plain_requests=args.gen_plain_requests)
    _print_report(args, tag, report, format_table(report), plot=plot, draw=plot_eval)
    return 0


# ------------------------------------------------------------------------------------------ serve
def _json_object(text: str) -> str:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r:.40}")
    return text


def add_serve_arguments(p) -> None:
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--num-requests", type=_at_least(1), default=100)
    p.add_argument("--concurrency", type=_at_least(1), default=16)
    p.add_argument("--request-rate", type=_positive_float, help="requests per second (Poisson); "
                   "default: all at once")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompts", help="JSONL file with a {\"prompt\": ...} per line")
    p.add_argument("--extra-body", type=_json_object, help="JSON object merged into every request (diffusion knobs)")
    p.add_argument("--api-key", default=os.environ.get("DIFFUTRON_API_KEY"),
                   help="the server's key (default: DIFFUTRON_API_KEY, which keeps it out of `ps`)")
    _add_report_arguments(p, "default: serve; the file's is TAG-c<concurrency>", tag_default="serve")
    p.add_argument("--plot", metavar="FILE", help="also draw this run's latency and time-to-first-chunk "
                   "percentiles as a PNG into FILE (needs matplotlib); `bench plot` draws several saved runs, "
                   "one per concurrency, side by side")


def run_serve(args) -> int:
    import asyncio

    from ..bench.plot import plot_serve
    from ..bench.serve import format_table, run

    tag = f"{args.tag}-c{args.concurrency}"
    _check_save(args, tag)
    plot = _check_plot(args, tag, inputs=(args.prompts,))
    report = asyncio.run(run(args))
    # a report never carries the key, nor the parser's own bookkeeping
    shown = {k: v for k, v in vars(args).items() if k not in ("api_key", "func", "command", "bench_command")}
    _print_report(args, tag, report, format_table(report), saved={"args": shown, **report}, plot=plot,
                  draw=plot_serve)
    return 0 if report["errors"] == 0 else 1


# ------------------------------------------------------------------------------------------ plot
MAX_REPORT_BYTES = 64 * 2**20


def add_plot_arguments(p) -> None:
    p.add_argument("reports", nargs="+", metavar="REPORT.json",
                   help="saved reports (--save): one throughput or eval report, or serve reports")
    p.add_argument("--out", required=True, metavar="FILE.png", help="the PNG to write")


def _read_report(name: str):
    from ..jsonio import parse_json

    try:
        with open(name, "rb") as f:
            raw = f.read(MAX_REPORT_BYTES + 1)
    except OSError as exc:
        raise DiffutronError(f"cannot read report {name!r}: {exc.strerror or exc}") from None
    if len(raw) > MAX_REPORT_BYTES:
        raise DiffutronError(f"report {name!r} is larger than {MAX_REPORT_BYTES // 2**20} MiB; not a benchmark report")
    return parse_json(raw, f"report {name!r}")


def run_plot(args) -> int:
    from ..bench.plot import plot_reports, render, require_matplotlib
    from ..outputs import check_file_output, write_file

    require_matplotlib("bench plot")
    target = check_file_output(args.out, "--out", inputs=tuple(args.reports))
    reports = [_read_report(name) for name in args.reports]
    write_file(target, render(plot_reports(reports, args.reports)), "--out")
    print(f"plotted {args.out}", file=sys.stderr)
    return 0
