"""`diffutron-engine env`: versions, devices and which kernel backends are available and active."""

from __future__ import annotations

import importlib.metadata
import platform


def add_parser(sub) -> None:
    p = sub.add_parser("env", help="print versions and available backends")
    p.set_defaults(func=run)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def run(args) -> int:
    import torch

    from .. import __version__
    from ..backends import describe

    rows = [
        ("diffutron-engine", __version__),
        ("python", platform.python_version()),
        ("platform", f"{platform.system()} {platform.machine()}"),
        ("torch", torch.__version__),
        ("transformers", _version("transformers")),
        ("tokenizers", _version("tokenizers")),
        ("triton", _version("triton")),
        ("cpu threads", str(torch.get_num_threads())),
        ("cuda", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"),
    ]
    rows += list(describe().items())
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
