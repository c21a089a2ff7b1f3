"""`diffutron-engine` entry point: dispatches to one module per subcommand.

Bad input (DiffutronError) is one line on stderr and exit code 2, never a traceback. Standard output
closed by its reader (`| head -1`) ends the command quietly with exit code 141, as a Unix tool killed
by SIGPIPE reports it (128 + 13), so `set -o pipefail` scripts still see that the output was cut; a
standard output that cannot be written (a full disk, /dev/full) is bad input like any other: one line,
exit code 2. Answers go to standard output as UTF-8 bytes, whatever encoding Python gave it (write_stdout).
"""

from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import DiffutronError, DiffutronWarning, RunFailed, StepFailed
from .stdout import silence_stdout, write_stdout

EXIT_STDOUT_CLOSED = 141


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2) like every other bad input; and a parser
    with subcommands may name one, `default_subcommand`, that runs when its arguments are none or start
    with an option other than --help (`bench --layers 4` is `bench throughput --layers 4`)."""

    def __init__(self, *args, default_subcommand: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.default_subcommand = default_subcommand

    def parse_known_args(self, args=None, namespace=None):
        if self.default_subcommand is not None:
            args = list(sys.argv[1:] if args is None else args)
            if not args or (args[0].startswith("-") and args[0] not in ("-h", "--help")):
                args.insert(0, self.default_subcommand)
        return super().parse_known_args(args, namespace)

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


def _one_line_warning(message, category, filename, lineno, line=None, _default=warnings.formatwarning):
    if issubclass(category, DiffutronWarning):
        return f"diffutron-engine: warning: {message}\n"
    return _default(message, category, filename, lineno, line)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    warnings.formatwarning = _one_line_warning
    try:
        code = _dispatch(argv)
        write_stdout("")  # what print() left in the buffer goes out now, where its errors are handled
        return code
    except DiffutronError as exc:
        print(f"diffutron-engine: error: {exc}", file=sys.stderr)
        return 2
    except (StepFailed, RunFailed) as exc:  # not bad input (out of memory, a diverged run): one line, exit 1
        print(f"diffutron-engine: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader of our output went away (`| head -1`): stop quietly
        silence_stdout()
        return EXIT_STDOUT_CLOSED
    except KeyboardInterrupt:
        print("diffutron-engine: interrupted", file=sys.stderr)
        return 130


def _dispatch(argv: list[str]) -> int:
    # lm-evaluation-harness's CLI parses its own arguments
    if argv[:2] == ["eval", "lm-eval"]:
        from ..integrations.lm_eval import cli_main

        return cli_main(argv[2:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
