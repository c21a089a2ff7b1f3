"""`diffutron-engine` entry point: dispatches to one module per subcommand.

Bad input (DiffutronError) is one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import DiffutronError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2) like every other bad input."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import bench, env, generate, serve, train
    from . import eval as eval_cmd

    parser = _Parser(
        prog="diffutron-engine",
        description="Fast, exact generation with masked diffusion language models of the Diffutron family.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    generate.add_parser(sub)
    bench.add_parser(sub)
    train.add_parser(sub)
    eval_cmd.add_parser(sub)
    env.add_parser(sub)
    serve.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        # commands with argument parsers of their own: a server's load benchmark, the likelihood
        # benchmark, and lm-evaluation-harness's CLI
        if argv[:2] == ["bench", "serve"]:
            from ..bench_serve import main as bench_serve

            return bench_serve(argv[2:], prog="diffutron-engine bench serve")
        if argv[:2] == ["bench", "eval"]:
            from ..bench_eval import main as bench_eval

            return bench_eval(argv[2:], prog="diffutron-engine bench eval")
        if argv[:2] == ["eval", "lm-eval"]:
            from ..integrations.lm_eval import cli_main

            return cli_main(argv[2:])
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except DiffutronError as exc:
        print(f"diffutron-engine: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffutron-engine: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
