"""Workarounds for known bugs of Triton's CPU interpreter (TRITON_INTERPRET=1), applied once per process by
`apply()` from kernels/__init__.py, so before any kernel module is imported: the tests, the GPU suite's
child processes and a script that runs the engine all get them. Each is guarded by the versions that have
the bug and does nothing anywhere else; none of them touches the GPU path (the interpreter is not used there).

Scalar tensors used as Python integers, triton 3.0 to 3.6 with numpy >= 2.4
---------------------------------------------------------------------------
In the interpreter every scalar of a kernel (a program id, an argument, `lo + BLOCK`) is a
`triton.language.tensor` whose `handle.data` is a numpy array of shape (1,). When a kernel uses such a
scalar where Python wants an integer, e.g. `for start in range(lo, hi, BLOCK)` with `lo` computed in the
kernel, Python calls `tensor.__index__`, which `triton/runtime/interpreter.py:_patch_lang_tensor` sets (for
the duration of each launch) to `lambda self: int(self.handle.data)`. `int()` of a 1-element array of
one dimension was deprecated in numpy 1.25 and is a TypeError from numpy 2.4 on ("only 0-dimensional
arrays can be converted to Python scalars"), so every such launch fails. Triton 3.7.0 changed that one
line to `int(self.handle.data.squeeze())`; 3.6.0 and earlier have the old one.

The workaround wraps `_patch_lang_tensor`: it runs Triton's function unchanged, then sets `__index__`
again, the same way Triton does (through the launch's patch scope from 3.6 on, which restores the class
after the launch; a plain attribute before), to `int(self.handle.data.squeeze())`: the 3.7.0 expression.
It is safe: squeezing a 1-element array gives the same single value as a 0-dimensional array, so the
result is the integer numpy < 2.4 returned; an array of more than one element still raises TypeError, as
it always did (a block is not an integer). `_patch_lang` looks `_patch_lang_tensor` up in the module on
every launch, so replacing the module attribute reaches every launch that follows, whenever triton was
imported. Nothing else of the interpreter changes.
"""

from __future__ import annotations

import functools
import os
import re

_APPLIED_MARK = "_diffutron_squeezed_index"


def _version(dist: str) -> tuple[int, int] | None:
    """(major, minor) of an installed distribution, without importing it; None when it is not installed."""
    from importlib import metadata

    try:
        found = re.match(r"(\d+)\.(\d+)", metadata.version(dist))
    except metadata.PackageNotFoundError:
        return None
    return (int(found[1]), int(found[2])) if found else None


def _interpreting() -> bool:
    # the values Triton reads as true, and "yes": a fix applied while the interpreter is off changes nothing
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")


def index_fix_needed() -> bool:
    """True where the scalar-index bug bites: the interpreter on, triton 3.0 to 3.6, numpy >= 2.4."""
    if not _interpreting():
        return False
    triton, numpy = _version("triton"), _version("numpy")
    return triton is not None and (3, 0) <= triton < (3, 7) and numpy is not None and numpy >= (2, 4)


def _squeezed_index(self):
    return int(self.handle.data.squeeze())


def _fix_index(interpreter) -> bool:
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, _APPLIED_MARK, False):
        return False

    @functools.wraps(original)
    def patch_lang_tensor(tensor, *scope):
        original(tensor, *scope)
        if scope:  # triton 3.6: the launch's _LangPatchScope, which restores the attribute afterwards
            scope[0].set_attr(tensor, "__index__", _squeezed_index)
        else:
            tensor.__index__ = _squeezed_index

    setattr(patch_lang_tensor, _APPLIED_MARK, True)
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True


def apply() -> list[str]:
    """Apply the workarounds this process needs (idempotent); returns the names of those applied now."""
    applied = []
    if index_fix_needed():
        from triton.runtime import interpreter

        if _fix_index(interpreter):
            applied.append("squeezed-index")
    return applied
