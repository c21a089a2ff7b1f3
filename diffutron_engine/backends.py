"""Which implementation runs each op: triton (CUDA), the C++ extension (CPU) or torch (anywhere).

Every backend of an op has the same signature. Nothing is probed at import time: availability is
checked on first use and cached. Tests (and users) force a backend with `force_backend(...)` or the
environment variable DIFFUTRON_BACKEND=torch|cpp|triton.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from functools import lru_cache

import torch

BACKENDS = ("triton", "cpp", "torch")
_forced: str | None = None


@lru_cache(maxsize=None)
def cpp_extension():
    """The compiled extension module, or None when it was not built."""
    try:
        from . import _C
    except ImportError:
        return None
    return _C


def cpp_available() -> bool:
    return cpp_extension() is not None


@lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def forced_backend() -> str | None:
    name = _forced or os.environ.get("DIFFUTRON_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise ValueError(f"DIFFUTRON_BACKEND={name!r} is not one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def force_backend(name: str | None):
    """Run the body with every op on backend `name` (None: automatic choice)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    old, _forced = _forced, name
    try:
        yield
    finally:
        _forced = old


def pick(device: torch.device, available: dict[str, bool]) -> str:
    """The backend for an op on `device`: the forced one (error if unavailable), else triton on CUDA,
    C++ on CPU, torch as the fallback."""
    forced = forced_backend()
    if forced is not None:
        if not available.get(forced, False):
            raise RuntimeError(f"backend {forced!r} was forced but is not available for this op on {device}")
        return forced
    order = ("triton", "torch") if device.type == "cuda" else ("cpp", "torch")
    return next(b for b in order if available.get(b, False))


# --------------------------------------------------------------------------- argmax + confidence
def argmax_confidence_torch(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: argmax id of each row and its softmax probability (logits [N, V])."""
    ids = logits.argmax(dim=-1)
    conf = torch.softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return ids, conf


def argmax_confidence_cpp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.dim() != 2 or logits.device.type != "cpu" or logits.dtype != torch.float32:
        raise ValueError("argmax_confidence_cpp needs float32 CPU logits of shape [N, V]")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    n, v = logits.shape
    ids = torch.empty(n, dtype=torch.long)
    conf = torch.empty(n, dtype=torch.float32)
    if n:
        cpp_extension().argmax_confidence(logits.data_ptr(), n, v, logits.stride(0), ids.data_ptr(), conf.data_ptr())
    return ids, conf


def argmax_confidence(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy choice and confidence per row, on the best available backend."""
    cpu_f32 = logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
    backend = pick(logits.device, {"cpp": cpu_f32 and cpp_available(), "torch": True})
    return argmax_confidence_cpp(logits) if backend == "cpp" else argmax_confidence_torch(logits)


def describe() -> dict[str, str]:
    """Backend status, for `diffutron-engine env`."""
    cuda = torch.cuda.is_available()
    return {
        "cpp extension": "built" if cpp_available() else "not built (torch fallback on CPU)",
        "triton": ("installed" + ("" if cuda else " (no CUDA device: interpreter only)"))
        if triton_installed() else "not installed",
        "forced backend": forced_backend() or "none (automatic)",
        "active on cpu": pick(torch.device("cpu"), {"cpp": cpp_available(), "torch": True}),
        "active on cuda": ("triton" if triton_installed() else "torch") if cuda else "no CUDA device",
    }
