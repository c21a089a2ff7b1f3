"""`diffutron-engine bench`: end-to-end throughput of the oracle and each engine mode (see
diffutron_engine.benchmark). A readable table, then the last line is one JSON document."""

from __future__ import annotations

import json
import sys

from ..errors import DiffutronError


def add_parser(sub) -> None:
    from ..config import BENCH_MODES as MODES, DEFAULT_BENCH_MODES as DEFAULT_MODES

    p = sub.add_parser("bench", help="end-to-end throughput: oracle vs engine modes (random mmBERT weights); "
                       "`bench serve --help`: load benchmark of a running server")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=22, help="fewer layers for quick runs (real model: 22)")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated, from: {', '.join(MODES)}")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--init-std", type=float, default=0.02,
                   help="random weight std; 0.02 gives flat next-token distributions, larger gives peaked ones")
    p.add_argument("--vocab-size", type=int, help="smaller vocabulary for quick checks (default: mmBERT's 256,000)")
    p.add_argument("--cuda-graphs", action="store_true", help="engine modes replay forwards from CUDA graphs")
    p.add_argument("--overhead", action="store_true",
                   help="the engine's own cost: its step beside transformers' bare forward on a 1-layer model, "
                        "at batch 1, 8, 32, 64 (other flags but --threads, --save and --tag are ignored)")
    p.add_argument("--save", metavar="FOLDER", help="also write the JSON report into FOLDER (e.g. bench/results)")
    p.add_argument("--tag", default=None, help="file name tag for --save (default: derived from the config)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..benchmark import BenchConfig, format_table, run as run_bench
    from ..outputs import check_report_folder, save_report

    if args.overhead:
        return _run_overhead(args)

    try:
        cfg = BenchConfig(batch_size=args.batch_size, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                          block_size=args.block_size, steps=args.steps, temperature=args.temperature,
                          dtype=args.dtype, device=args.device, layers=args.layers,
                          modes=tuple(m.strip() for m in args.modes.split(",") if m.strip()), threads=args.threads,
                          init_std=args.init_std, vocab_size=args.vocab_size, cuda_graphs=args.cuda_graphs)
    except ValueError as exc:
        raise DiffutronError(str(exc)) from None
    if cfg.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise DiffutronError("--device cuda was asked for but no CUDA GPU is available")
    tag = args.tag or (f"bench-{cfg.device}-b{cfg.batch_size}-t{cfg.temperature:g}-L{cfg.layers}-{cfg.dtype}")
    if args.save is not None:
        check_report_folder(args.save, tag)  # before minutes of measuring
    report = run_bench(cfg, log=lambda s: print(s, file=sys.stderr))
    print(format_table(report))
    if args.save is not None:
        print(f"saved {save_report(report, args.save, tag)}", file=sys.stderr)
    print(json.dumps(report))
    return 0


def _run_overhead(args) -> int:
    from ..outputs import check_report_folder, save_report
    from ..overhead import OverheadConfig, format_table, run as run_overhead

    try:
        cfg = OverheadConfig(threads=args.threads)
    except ValueError as exc:
        raise DiffutronError(str(exc)) from None
    tag = args.tag or "overhead-cpu"
    if args.save is not None:
        check_report_folder(args.save, tag)  # before the measuring
    report = run_overhead(cfg, log=lambda s: print(s, file=sys.stderr))
    print(format_table(report))
    if args.save is not None:
        print(f"saved {save_report(report, args.save, tag)}", file=sys.stderr)
    print(json.dumps(report))
    return 0
