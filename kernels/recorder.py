"""Every Triton launch a process makes, written down so that the GPU compile check compiles what really
runs, not only what the launchers' plans say.

Why: the compile check (bench/gpu_compile_check.py) compiles each kernel file's `compile_plans()`, which
call the launchers' own plan functions on meta tensors. A plan can still drift from the calls: a
stand-in argument of another dtype, a feature the plans never switch off, a launch made outside a plan.
The interpreter never compiles, so such a launch passes every CPU test and fails on the first GPU. The
recorder hooks Triton's launch path (`JITFunction.run` and the interpreter's `InterpretedFunction.run`:
every `kernel[grid](...)` ends there) and appends one JSON line per distinct launch: the kernel, each
argument as Triton specializes it (a tensor's dtype and 16-byte alignment, scalars as given) and the
compile options. `load()` turns the lines back into `Launch`es whose stand-in tensors specialize exactly
as the recorded ones did, for the compile check to compile beside the plans.

Recording is switched on for a whole process (and its children) by the environment variable
DIFFUTRON_RECORD_LAUNCHES=FILE, read when kernels/launch.py (which every kernel file imports) is
imported, or in code with `recording()`. Lines are appended: a file from an earlier run keeps that run's
launches (bench/record_launches.py starts each recording afresh).
With execute=False the launches are recorded and not run: the GPU suite's benchmarks at the real shapes,
on meta tensors, record what they would launch without a GPU. Lines are appended with one write each (a
line never interleaves with another process's), so a test run and its subprocesses share one file.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import math
import os

ENV = "DIFFUTRON_RECORD_LAUNCHES"

_state: dict = {"path": None, "execute": True, "seen": {}, "originals": {}}  # seen: lines written, per file


def describe(value):
    """One argument as Triton's specialization sees it, as JSON: tensors by dtype and alignment (the
    data pointer divisible by 16), None, bools, ints, strings and finite floats as they are."""
    if hasattr(value, "data_ptr") and hasattr(value, "dtype"):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    # anything else is written down by type, never raised in the launch path: replaying it is an error
    # the compile check reports
    return {"other": type(value).__name__}


def _python_fn(kernel):
    """The @triton.jit function's Python source function (JITFunction and InterpretedFunction keep it)."""
    return getattr(kernel, "fn", kernel)


def _record(kernel, grid, args, kwargs) -> None:
    fn = _python_fn(kernel)
    line = json.dumps({
        "kernel": f"{fn.__module__}:{fn.__name__}",
        "grid": [int(g) for g in grid] if isinstance(grid, (tuple, list)) else None,
        "positional": [describe(a) for a in args],
        "keywords": {k: describe(v) for k, v in sorted(kwargs.items())},
    }, sort_keys=True)
    seen = _state["seen"].setdefault(_state["path"], set())
    if line in seen:
        return
    seen.add(line)
    fd = os.open(_state["path"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def _hooked(original):
    def run(self, *args, grid, warmup, **kwargs):
        if not warmup and _state["path"] is not None:
            _record(self, grid, args, kwargs)
            if not _state["execute"]:
                return None
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    run.__wrapped__ = original
    return run


def _launch_classes():
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return JITFunction, InterpretedFunction


def install(path: str, execute: bool = True) -> None:
    """Record every launch of this process into `path` (appended); execute=False records without running."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{ENV}: the folder of {path!r} does not exist")
    _state.update(path=path, execute=execute)
    for cls in _launch_classes():
        if cls not in _state["originals"]:
            _state["originals"][cls] = cls.run
            cls.run = _hooked(cls.run)


def uninstall() -> None:
    for cls, original in _state["originals"].items():
        cls.run = original
    _state["originals"].clear()
    _state.update(path=None, execute=True)
    _state["seen"].clear()


@contextlib.contextmanager
def recording(path: str, execute: bool = True):
    """Record the launches made inside the block (restoring any recording already active after it)."""
    before = dict(path=_state["path"], execute=_state["execute"])
    install(path, execute)
    try:
        yield
    finally:
        if before["path"] is None:
            uninstall()
        else:
            _state.update(before)


def install_from_environment() -> None:
    """Honour DIFFUTRON_RECORD_LAUNCHES=FILE (called when the kernels package is imported)."""
    path = os.environ.get(ENV)
    if path and _state["path"] is None:
        try:
            import triton  # noqa: F401
        except ImportError:
            return  # nothing launches Triton kernels here, so there is nothing to record
        install(path)


# ------------------------------------------------------------------------------------------ replay
_STAND_INS: dict = {}


def _stand_in(spec: dict):
    """A small CPU tensor with the recorded dtype and alignment (Triton's binder reads only these)."""
    import torch

    key = (spec["tensor"], spec["aligned"])
    if key not in _STAND_INS:
        dtype = getattr(torch, spec["tensor"])
        base = torch.empty(64, dtype=dtype)
        assert base.data_ptr() % 16 == 0
        _STAND_INS[key] = base if spec["aligned"] else base[1:]  # one element in: 1 to 8 bytes off
    return _STAND_INS[key]


def _value(spec):
    if isinstance(spec, dict):
        if "other" in spec:
            raise ValueError(f"a recorded launch has an argument of type {spec['other']}, which the recorder "
                             "cannot replay (kernels/recorder.py describe)")
        return _stand_in(spec) if "tensor" in spec else float(spec["float"])
    return spec


def read(path: str) -> list[dict]:
    """The recorded lines of `path`. A cut-off last line (a process killed mid-write) is skipped; a bad
    line anywhere else means the file is not a recording, and raises."""
    with open(path) as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: a write that never finished
                continue
            raise ValueError(f"{path}, line {number}: not a recorded launch (kernels/recorder.py)") from None
    return records


def load(paths) -> list:
    """The recorded launches of one or more files as `Launch`es (kernels imported as compiled functions,
    tensors as stand-ins specializing like the recorded ones), distinct by their JSON."""
    from .launch import Launch

    out, seen = [], set()
    for path in [paths] if isinstance(paths, str) else paths:
        for rec in read(path):
            key = json.dumps({k: rec[k] for k in ("kernel", "positional", "keywords")}, sort_keys=True)
            if key in seen:
                continue
            seen.add(key)
            module, name = rec["kernel"].split(":")
            kernel = getattr(importlib.import_module(module), name)
            launch = Launch(kernel, tuple(rec["grid"] or (1,)), tuple(_value(a) for a in rec["positional"]),
                            {k: _value(v) for k, v in rec["keywords"].items()}, label="recorded")
            launch.recorded = rec
            out.append(launch)
    return out


def feature_key(launch) -> tuple:
    """What a launch's program depends on beyond sizes: its kernel, the type of every argument (a tensor's
    dtype, None, int or float) and the value of every bool and string (constexpr switches, compile
    flags). Ints (sizes, strides, tile sizes, warps) are left out: they vary with the shape, and the
    compile check compiles every recorded one anyway. A recorded launch whose key no plan has is drift:
    the plans do not describe what the launcher really launches."""
    fn = _python_fn(launch.kernel)
    params = list(inspect.signature(fn).parameters)
    named = dict(zip(params, launch.args))
    named.update(launch.options)

    def kind(v):
        spec = describe(v)
        if isinstance(spec, dict):
            return "*" + spec["tensor"] if "tensor" in spec else "float"
        if spec is None or isinstance(spec, (bool, str)):
            return repr(spec)
        return type(spec).__name__

    return (f"{fn.__module__}:{fn.__name__}",) + tuple(f"{k}={kind(v)}" for k, v in sorted(named.items()))


def closest_difference(key: tuple, candidates) -> str:
    """How `key` differs from the nearest of `candidates` (same kernel), for the drift message."""
    same = [c for c in candidates if c[0] == key[0]]
    if not same:
        return "no plan launches this kernel"
    best = min(same, key=lambda c: len(set(c) ^ set(key)))
    ours, theirs = set(key) - set(best), set(best) - set(key)
    return "; ".join([f"launched {', '.join(sorted(ours))}"] + ([f"planned {', '.join(sorted(theirs))}"] if theirs else []))
