"""What the probes (cli_probe.py, serve_probe.py) share: how a run ends. Stdlib only, as they are."""

from __future__ import annotations

import json


def finish(summary: dict, details: dict, save: str | None, seconds: float, log) -> int:
    """Print `summary` as the last line of the output (one JSON line), write it with `details` (the
    cases or failures in full) to the file `save` when one is given, log the time taken, and return the
    probe's exit code: 0, whatever held (a probe that breaks raises instead)."""
    print(json.dumps(summary, ensure_ascii=False))
    if save:
        with open(save, "w") as f:
            json.dump({**summary, **details}, f, indent=1, ensure_ascii=False)
    log(f"done in {seconds:.0f} s")
    return 0
