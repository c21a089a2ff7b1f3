"""What the A/B scripts (serve_ab.py, overhead_ab.py) share: the two checkouts and the report file as
flags, and their checks before any measuring (each a one-line error)."""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from diffutron_engine.errors import DiffutronError  # noqa: E402
from diffutron_engine.outputs import check_file_output  # noqa: E402
from serve_probe import package_origin  # noqa: E402  (which checkout an interpreter imports)


def add_checkout_arguments(ap) -> None:
    """--repo-a, --repo-b, --python, --rounds, --save."""
    ap.add_argument("--repo-a", required=True, help="checkout A (e.g. a worktree of the base commit)")
    ap.add_argument("--repo-b", default=ROOT, help="checkout B (default: this one)")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--save", metavar="FILE", help="also write the JSON report here")


def checkout_problem(args) -> str | None:
    """Why the run cannot measure (the first problem found), or None: a report file that cannot be
    written, a checkout that is not a folder, or one whose package the interpreter would not run (an
    editable install of another checkout would be measured instead, without a sign), or fewer than one
    round."""
    if args.rounds < 1:
        return "--rounds must be >= 1"
    try:
        check_file_output(args.save, "--save")  # before minutes of measuring
    except DiffutronError as exc:
        return str(exc)
    for repo in (args.repo_a, args.repo_b):
        if not os.path.isdir(repo):
            return f"{repo} is not a folder (a checkout of this project)"
    for repo in (args.repo_a, args.repo_b):
        if os.path.realpath(package_origin(os.path.abspath(repo), args.python)) != os.path.realpath(repo):
            return f"{args.python} does not import diffutron_engine from {repo}"
    return None
