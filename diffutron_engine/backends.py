"""Which implementation runs each op: triton (CUDA), the C++ extension (CPU) or torch (anywhere).

The one place where a backend is chosen and called: `Ops.select(device, dtype)` picks the backend of
every op (the sampler, the LM head fused into it, the commit, attention, the fused linear
cross-entropy) once, and its methods (`ops.sample`, `ops.sample_head`, `ops.unmask`, `ops.attention`,
`ops.cross_entropy`) call the chosen implementation from kernels/. Nothing else names a backend's
function (tests/kernels/test_backends.py checks it). Every backend of an op has the same signature.
Nothing is probed at import time: availability is checked on first use and cached. Tests (and users)
force a backend with `force_backend(...)` or the environment variable DIFFUTRON_BACKEND=torch|cpp|triton.
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


def _choose_sampler(device: torch.device, dtype: torch.dtype) -> str:
    """The fused sampler (kernels/sampling.py): triton on CUDA, C++ for float32 on CPU, torch otherwise."""
    cpu_f32 = device.type == "cpu" and dtype == torch.float32
    return pick(device, {"triton": _triton_usable(device), "cpp": cpu_f32 and cpp_available(), "torch": True})


def _choose_head(sampler: str) -> str | None:
    """The LM head fused into the sampler (kernels/sampling.py, logits never stored): a Triton kernel, so
    it runs where the Triton sampler does; None elsewhere (the head is then a matmul before the sampler)."""
    return "triton" if sampler == "triton" else None


def _choose_unmask(device: torch.device) -> str:
    """The commit (kernels/unmask.py): triton on CUDA, torch elsewhere (a few hundred numbers per row:
    nothing for C++ to win)."""
    return pick(device, {"triton": _triton_usable(device), "torch": True})


def _choose_attention(device: torch.device, dtype: torch.dtype) -> str:
    """'triton' (kernels/attention.py) for half precision on CUDA, else 'torch' (SDPA with an explicit
    mask). float32 on CUDA stays on SDPA: the kernel's exact float32 dot products are slower than
    cuBLAS/TF32 there. A forced triton backend also runs float32 (the interpreter tests do)."""
    available = {"triton": _triton_usable(device) and (dtype != torch.float32 or forced_backend() == "triton"),
                 "torch": True}
    return pick(device, available)


def _choose_cross_entropy(device: torch.device) -> str:
    """The fused linear cross-entropy's passes (kernels/cross_entropy.py): triton on CUDA, torch
    elsewhere (no C++ version: a forced cpp runs torch)."""
    return pick(device, {"triton": _triton_usable(device), "torch": True})


OPS = ("sample", "sample_head", "unmask", "attention", "cross_entropy")


@dataclass(frozen=True)
class Ops:
    """The backend of every op, chosen once for a device and dtype (`select`), and the calls that run
    them. A runner keeps one, so a step makes no choice and reads no environment: each call below only
    reads a field. An op that was not selected (or cannot run here, for the fused head) has None and
    raises when called."""

    sample_backend: str | None = None  # the sampler: "triton", "cpp" or "torch"
    head_backend: str | None = None  # the LM head fused into the sampler: "triton", or None where it cannot run
    unmask_backend: str | None = None  # the commit: "triton" or "torch"
    attention_backend: str | None = None  # "triton" or "torch"
    cross_entropy_backend: str | None = None  # the fused linear cross-entropy: "triton" or "torch"

    @classmethod
    def select(cls, device, dtype: torch.dtype, only: tuple[str, ...] = OPS) -> "Ops":
        """Each op's backend on `device` for a model in `dtype` (see `pick`: the forced backend, else
        triton on CUDA, C++ on CPU, torch). `only` names the ops the caller runs (of OPS); the others stay
        None, so a backend forced for them cannot fail a caller that never runs them (training selects
        only the cross-entropy, a model's forward only the attention)."""
        unknown = set(only) - set(OPS)
        if unknown:
            raise ValueError(f"unknown ops {sorted(unknown)}; choose among {', '.join(OPS)}")
        device = torch.device(device)
        sampler = _choose_sampler(device, dtype) if {"sample", "sample_head"} & set(only) else None
        return cls(
            sample_backend=sampler if "sample" in only else None,
            head_backend=_choose_head(sampler) if "sample_head" in only else None,
            unmask_backend=_choose_unmask(device) if "unmask" in only else None,
            attention_backend=_choose_attention(device, dtype) if "attention" in only else None,
            cross_entropy_backend=_choose_cross_entropy(device) if "cross_entropy" in only else None,
        )

    @property
    def fused_head(self) -> bool:
        """Whether `sample_head` can run (the LM head and the sampler as one kernel)."""
        return self.head_backend is not None

    @staticmethod
    def _missing(op: str):
        why = ("it runs with the Triton sampler only (on CUDA)" if op == "sample_head" else
               "it was not selected (Ops.select's `only`)")
        return BackendUnavailable(f"op {op!r} has no backend here: {why}")

    # ------------------------------------------------------------------ sampler
    def sample(self, logits: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor]:
        """Token choice and confidence per row of logits [N, V] (params: kernels.sampling.SamplingTensors)."""
        from .kernels import sampling

        if self.sample_backend == "triton":
            return sampling.sample_triton(logits if logits.stride(1) == 1 else logits.contiguous(), params)
        if self.sample_backend == "cpp":
            return sampling.sample_cpp(logits, params)
        if self.sample_backend == "torch":
            return sampling.sample_torch(logits, params)
        raise self._missing("sample")

    def sample_head(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    params) -> tuple[torch.Tensor, torch.Tensor]:
        """As `sample` on logits = hidden @ weight.T + bias, which are never stored (hidden [N, H] after
        the head's transform, weight [V, H], bias [V] or None)."""
        from .kernels import sampling

        if self.head_backend == "triton":
            return sampling.sample_head_triton(hidden.contiguous(), weight, bias, params)
        raise self._missing("sample_head")

    # ------------------------------------------------------------------ commit
    def unmask(self, conf, tokens, k, block_start, canvas, rule="topk", value=None, rows=None, seen=None,
               unseen: tuple[int, ...] = ()) -> torch.Tensor:
        """Commit each row's chosen block positions into its canvas row and set their seen bits; returns
        the chosen mask [B, L]."""
        from .kernels import unmask as um

        if self.unmask_backend == "triton":
            fn = um.unmask_triton
        elif self.unmask_backend == "torch":
            fn = um.unmask_torch
        else:
            raise self._missing("unmask")
        return fn(conf, tokens, k, block_start, canvas, rule, value, rows=rows, seen=seen, unseen=unseen)

    # ------------------------------------------------------------------ attention
    def attention_mask(self, q_pos, key_valid, half_window):
        """The explicit [B, 1, Q, T] mask the torch attention reads, built once per layer kind and forward
        and passed to `attention`; None for the Triton kernel (it masks as it goes)."""
        from .kernels import attention as at

        if self.attention_backend == "torch":
            return at.attention_mask(q_pos, key_valid, half_window)
        if self.attention_backend == "triton":
            return None
        raise self._missing("attention")

    def attention(self, q, k_store, v_store, slots, q_pos, key_valid, half_window, scale, mask=None):
        """Queries q [B, H, Q, D] at positions q_pos [B, Q] over keys 0..T-1 (T = key_valid.shape[1]) held
        per row ([B, H, T, D], slots None) or in a pool's slots [S, H, P, D] (row b reads slots[b]);
        `mask`: from `attention_mask` for the same positions (torch), or None."""
        from .kernels import attention as at

        if self.attention_backend == "triton":
            if slots is None:
                slots = torch.arange(q.shape[0], device=q.device)
            return at.attention_triton(q, k_store, v_store, slots, q_pos, key_valid, half_window, scale)
        if self.attention_backend == "torch":
            return at.attention_torch(q, k_store, v_store, slots, q_pos, key_valid, half_window, scale, mask)
        raise self._missing("attention")

    # ------------------------------------------------------------------ training
    def cross_entropy(self, hidden, weight, target, bias=None, row_weight=None, ignore_index=-100,
                      reduction="sum", chunk_rows=None) -> torch.Tensor:
        """The fused linear cross-entropy (kernels/cross_entropy.py): the fp32 loss of logits = hidden @
        weight.T + bias against target, never storing the [N, V] logits, differentiable for "sum" and
        "mean"; "none" gives the per-row losses (evaluation)."""
        from .kernels import cross_entropy as ce

        if self.cross_entropy_backend == "triton":
            fn = ce.linear_cross_entropy_triton
        elif self.cross_entropy_backend == "torch":
            fn = ce.linear_cross_entropy_torch
        else:
            raise self._missing("cross_entropy")
        return fn(hidden, weight, target, bias=bias, row_weight=row_weight, ignore_index=ignore_index,
                  reduction=reduction, chunk_rows=chunk_rows)


def sample(logits: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor]:
    """One call of the sampler on the backend `Ops.select` would choose (for callers outside a runner)."""
    return Ops.select(logits.device, logits.dtype, only=("sample",)).sample(logits, params)


def cross_entropy(hidden, weight, target, **kw) -> torch.Tensor:
    """One call of the fused linear cross-entropy on the backend `Ops.select` would choose (for one-off
    callers; a training loop selects once and keeps its Ops)."""
    return Ops.select(hidden.device, hidden.dtype, only=("cross_entropy",)).cross_entropy(hidden, weight, target, **kw)


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
            out[f"sampler on {dev}"] = ops.sample_backend
            out[f"fused head on {dev}"] = ops.head_backend or "no (runs with the Triton sampler only)"
            out[f"unmask on {dev}"] = ops.unmask_backend
            out[f"attention on {dev} ({str(dtype).split('.')[-1]})"] = ops.attention_backend
            out[f"cross-entropy on {dev}"] = ops.cross_entropy_backend
        except DiffutronError as exc:  # a forced backend this device cannot run (or an invalid name)
            out[f"ops on {dev}"] = str(exc)
    if not cuda:
        out["on cuda"] = "no CUDA device"
    return out
