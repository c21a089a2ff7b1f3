"""Which implementation runs each op: triton (CUDA), the C++ extension (CPU) or torch (anywhere).

Every backend of an op has the same signature. Nothing is probed at import time: availability is
checked on first use and cached. Tests (and users) force a backend with `force_backend(...)` or the
environment variable DIFFUTRON_BACKEND=torch|cpp|triton.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from .config import BACKENDS, check_backend_env
from .errors import DiffutronError

_forced: str | None = None


class BackendUnavailable(DiffutronError, RuntimeError):
    """A forced backend that cannot run here: a setting the user can fix (DiffutronError, so the CLI
    prints one line), and a RuntimeError for callers that catch an op that cannot run."""


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
    """The backend forced by force_backend(), else by DIFFUTRON_BACKEND (checked), else None."""
    return _forced or check_backend_env()


def _unavailable(forced: str, device: torch.device) -> BackendUnavailable:
    source = "DIFFUTRON_BACKEND=" + forced if _forced is None else f"backend {forced!r}"
    if forced == "triton":
        why = ("triton is not installed" if not triton_installed() else
               f"Triton kernels run on CUDA GPUs and this op runs on {device.type}")
    elif forced == "cpp":
        why = "the C++ extension (diffutron_engine._C) was not built"
    else:
        why = f"this op has no {forced} version on {device.type}"
    return BackendUnavailable(f"{source} was forced but is not available for this op on {device}: {why}; "
                              "unset it or choose another backend")


@contextlib.contextmanager
def force_backend(name: str | None):
    """Run the body with every op on backend `name` (None: automatic choice)."""
    global _forced
    if name is not None and name not in BACKENDS:
        raise DiffutronError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    old, _forced = _forced, name
    try:
        yield
    finally:
        _forced = old


def pick(device: torch.device, available: dict[str, bool]) -> str:
    """The backend for an op on `device`: the forced one (error if unavailable), else triton on CUDA,
    C++ on CPU, torch as the fallback. `available` names the backends the op has; forcing C++ on an op
    that has no C++ implementation (a few hundred numbers, nothing to win) runs its torch version."""
    forced = forced_backend()
    if forced == "cpp" and "cpp" not in available:
        forced = "torch"
    if forced is not None:
        if not available.get(forced, False):
            raise _unavailable(forced, device)
        return forced
    order = ("triton", "torch") if device.type == "cuda" else ("cpp", "torch")
    return next(b for b in order if available.get(b, False))


# --------------------------------------------------------------------------- per-op choices
def _triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests)."""
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    return triton_installed() and (device.type == "cuda" or (interp and device.type == "cpu"))


def sampler_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The fused sampler (kernels/sampling.py): triton on CUDA, C++ for float32 on CPU, torch otherwise."""
    cpu_f32 = device.type == "cpu" and dtype == torch.float32
    return pick(device, {"triton": _triton_usable(device), "cpp": cpu_f32 and cpp_available(), "torch": True})


def unmask_backend(device: torch.device) -> str:
    """The commit (kernels/unmask.py): triton on CUDA, torch elsewhere (a few hundred numbers per row:
    nothing for C++ to win)."""
    return pick(device, {"triton": _triton_usable(device), "torch": True})


def attention_backend(device: torch.device, dtype: torch.dtype) -> str:
    """'triton' (kernels/attention.py) for half precision on CUDA, else 'torch' (SDPA with an explicit
    mask). float32 on CUDA stays on SDPA: the kernel's exact float32 dot products are slower than
    cuBLAS/TF32 there. A forced triton backend also runs float32 (the interpreter tests do)."""
    available = {"triton": _triton_usable(device) and (dtype != torch.float32 or forced_backend() == "triton"),
                 "torch": True}
    return pick(device, available)


def cross_entropy_backend(device: torch.device) -> str:
    """The fused linear cross-entropy's passes (kernels/cross_entropy.py): triton on CUDA, torch
    elsewhere (no C++ version: a forced cpp runs torch)."""
    return pick(device, {"triton": _triton_usable(device), "torch": True})


@dataclass(frozen=True)
class Ops:
    """The backend of every op of a step, chosen once for a device and dtype (a runner keeps one, so a
    step makes no choice and reads no environment)."""

    sampler: str  # "triton", "cpp" or "torch"
    committer: str  # the unmask op's: "triton" or "torch"
    attention: str  # "triton" or "torch"

    @classmethod
    def select(cls, device: torch.device, dtype: torch.dtype) -> "Ops":
        device = torch.device(device)
        return cls(sampler_backend(device, dtype), unmask_backend(device), attention_backend(device, dtype))

    def sample(self, logits: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor]:
        """Token choice and confidence per row of logits [N, V] (params: kernels.sampling.SampleParams)."""
        from .kernels import sampling

        if self.sampler == "triton":
            return sampling.sample_triton(logits if logits.stride(1) == 1 else logits.contiguous(), params)
        if self.sampler == "cpp":
            return sampling.sample_cpp(logits, params)
        return sampling.sample_torch(logits, params)

    def unmask(self, conf, tokens, k, block_start, canvas, rule="topk", value=None, rows=None, seen=None,
               unseen: tuple[int, ...] = ()) -> torch.Tensor:
        """Commit each row's chosen block positions into its canvas row and set their seen bits; returns
        the chosen mask [B, L]."""
        from .kernels import unmask as um

        fn = um.unmask_triton if self.committer == "triton" else um.unmask_torch
        return fn(conf, tokens, k, block_start, canvas, rule, value, rows=rows, seen=seen, unseen=unseen)


def sample(logits: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor]:
    """One call of the sampler on the backend `Ops.select` would choose (for callers outside a runner)."""
    return Ops.select(logits.device, logits.dtype).sample(logits, params)


def _describe_forced() -> str:
    try:
        return forced_backend() or "none (automatic)"
    except DiffutronError as exc:  # `env` is where one looks for what is wrong: show it, do not fail
        return f"invalid: {exc}"


def describe() -> dict[str, str]:
    """Backend status and the backend each op runs on, for `diffutron-engine env`."""
    cuda = torch.cuda.is_available()
    out = {
        "cpp extension": "built" if cpp_available() else "not built (torch fallback on CPU)",
        "triton kernels": ("available" + ("" if cuda else " (no CUDA device: interpreter only)"))
        if triton_installed() else "not installed",
        "forced backend": _describe_forced(),
    }
    devices = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if cuda else [])
    for dev, dtype in devices:
        d = torch.device(dev)
        try:
            ops = Ops.select(d, dtype)
            out[f"sampler on {dev}"] = ops.sampler
            out[f"unmask on {dev}"] = ops.committer
            out[f"attention on {dev} ({str(dtype).split('.')[-1]})"] = ops.attention
        except DiffutronError as exc:  # a forced backend this device cannot run (or an invalid name)
            out[f"ops on {dev}"] = str(exc)
    if not cuda:
        out["on cuda"] = "no CUDA device"
    return out
