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
    C++ on CPU, torch as the fallback. `available` names the backends the op has; forcing C++ on an op
    that has no C++ implementation (a few hundred numbers, nothing to win) runs its torch version."""
    forced = forced_backend()
    if forced == "cpp" and "cpp" not in available:
        forced = "torch"
    if forced is not None:
        if not available.get(forced, False):
            raise RuntimeError(f"backend {forced!r} was forced but is not available for this op on {device}")
        return forced
    order = ("triton", "torch") if device.type == "cuda" else ("cpp", "torch")
    return next(b for b in order if available.get(b, False))


# --------------------------------------------------------------------------- the fused sampler
def sample_cpp(logits: torch.Tensor, p) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler contract (kernels/sampling.py) on float32 CPU logits, through the C++ extension."""
    if logits.dim() != 2 or logits.device.type != "cpu" or logits.dtype != torch.float32:
        raise ValueError(f"the C++ sampler needs float32 CPU logits [N, V], got {logits.dtype} "
                         f"{tuple(logits.shape)} on {logits.device}")
    n, v = logits.shape
    ids = torch.empty(n, dtype=torch.long)
    conf = torch.empty(n, dtype=torch.float32)
    if n == 0:
        return ids, conf
    r = p.resolve(n, v, "cpu")
    f = r.flags
    valid = None if r.valid is None else r.valid.contiguous().view(torch.int8)

    def addr(t, on=True):
        return t.contiguous().data_ptr() if on and t is not None else 0

    # every argument is contiguous already (made so by resolve) except possibly views the caller gave
    args = [r.temperature.contiguous(), r.penalty.contiguous(), r.seeds.contiguous(), r.positions.contiguous(),
            r.steps.contiguous(), r.streams.contiguous(), r.maps.contiguous()]
    temperature, penalty, seeds, positions, steps, streams, maps = args
    cpp_extension().fused_sample(
        logits.data_ptr(), n, v, logits.stride(0), logits.stride(1), temperature.data_ptr(), penalty.data_ptr(),
        addr(valid), seeds.data_ptr(), positions.data_ptr(), steps.data_ptr(), streams.data_ptr(), maps.data_ptr(),
        addr(r.seen, f.penalty), r.seen_stride, addr(r.suppress, f.suppress), r.suppress_stride,
        addr(r.begin, f.begin), r.begin_stride, ids.data_ptr(), conf.data_ptr())
    return ids, r.with_random_confidence(conf)


def sample(logits: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor]:
    """Token choice and confidence per row of logits [N, V] (params: kernels.sampling.SampleParams) on
    the best available backend: triton on CUDA, C++ for float32 on CPU, torch otherwise."""
    from .kernels import sampling

    cpu_f32 = logits.device.type == "cpu" and logits.dtype == torch.float32
    backend = pick(logits.device, {"triton": _triton_usable(logits.device), "cpp": cpu_f32 and cpp_available(),
                                   "torch": True})
    if backend == "triton":
        return sampling.sample_triton(logits if logits.stride(1) == 1 else logits.contiguous(), params)
    if backend == "cpp":
        return sample_cpp(logits, params)
    return sampling.sample_torch(logits, params)


def _triton_usable(device: torch.device) -> bool:
    """Triton runs CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests)."""
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    return triton_installed() and (device.type == "cuda" or (interp and device.type == "cpu"))


# --------------------------------------------------------------------------- commit (unmask)
def unmask(conf, tokens, k, block_start, canvas, rule="topk", value=None, rows=None, seen=None,
           unseen: tuple[int, ...] = ()) -> torch.Tensor:
    """Commit each row's chosen block positions into its canvas row and set their seen bits
    (kernels/unmask.py); returns the chosen mask [B, L]. Triton on CUDA, torch elsewhere (a few hundred
    numbers: nothing for C++ to win)."""
    from .kernels import unmask as um

    backend = pick(conf.device, {"triton": _triton_usable(conf.device), "torch": True})
    fn = um.unmask_triton if backend == "triton" else um.unmask_torch
    return fn(conf, tokens, k, block_start, canvas, rule, value, rows=rows, seen=seen, unseen=unseen)


# --------------------------------------------------------------------------- attention
def attention_backend(device: torch.device, dtype: torch.dtype) -> str:
    """'triton' (kernels/attention.py) for half precision on CUDA, else 'torch' (SDPA with an explicit
    mask). float32 on CUDA stays on SDPA: the kernel's exact float32 dot products are slower than
    cuBLAS/TF32 there. A forced triton backend also runs float32 (the interpreter tests do)."""
    available = {"triton": _triton_usable(device) and (dtype != torch.float32 or forced_backend() == "triton"),
                 "torch": True}
    return pick(device, available)


def describe() -> dict[str, str]:
    """Backend status and the backend each op runs on, for `diffutron-engine env`."""
    cuda = torch.cuda.is_available()
    out = {
        "cpp extension": "built" if cpp_available() else "not built (torch fallback on CPU)",
        "triton kernels": ("available" + ("" if cuda else " (no CUDA device: interpreter only)"))
        if triton_installed() else "not installed",
        "forced backend": forced_backend() or "none (automatic)",
    }
    devices = [("cpu", torch.float32)] + ([("cuda", torch.bfloat16)] if cuda else [])
    for dev, dtype in devices:
        d = torch.device(dev)
        try:
            out[f"sampler on {dev}"] = pick(d, {"triton": _triton_usable(d),
                                                "cpp": dev == "cpu" and cpp_available(), "torch": True})
            out[f"unmask on {dev}"] = pick(d, {"triton": _triton_usable(d), "torch": True})
            out[f"attention on {dev} ({str(dtype).split('.')[-1]})"] = attention_backend(d, dtype)
        except RuntimeError as exc:  # a forced backend this device cannot run
            out[f"ops on {dev}"] = str(exc)
    if not cuda:
        out["on cuda"] = "no CUDA device"
    return out
