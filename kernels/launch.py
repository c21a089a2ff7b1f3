"""A kernel launch as data: the @triton.jit function, its grid, its arguments and its options.

Every Triton launcher in this package builds its launches with a `plan_*` function and runs them, and
every kernel file has a `compile_plans()` that calls those same plan functions on meta tensors (shapes
and dtypes, no memory) over the configurations its launcher can choose at the real model's shapes. The
GPU compile check (`make gpu-compile-check`, bench/gpu_compile_check.py) compiles exactly those plans
for named GPUs without needing one; so what is checked is what the launchers launch, not a second list
kept by hand. See docs/kernels.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# CUDA's grid limits: x up to 2**31 - 1 blocks, y and z up to 65,535 (the same on every target we build for).
GRID_LIMITS = (2**31 - 1, 65535, 65535)


@dataclass
class Launch:
    kernel: object  # a triton JITFunction (or the interpreter's stand-in under TRITON_INTERPRET=1)
    grid: tuple[int, ...]
    args: tuple  # positional arguments: tensors (real or meta) and scalars
    options: dict = field(default_factory=dict)  # constexpr values and compile options (num_warps, ...)
    label: str = ""  # the shape it was planned for, in reports

    def __post_init__(self):
        self.grid = tuple(int(g) for g in self.grid)
        for axis, (g, limit) in enumerate(zip(self.grid, GRID_LIMITS)):
            if g > limit:
                raise ValueError(f"{self.name}: grid axis {axis} has {g} programs, over CUDA's limit of {limit}; "
                                 "this shape is too large for the kernel (split the call)")

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))

    def run(self) -> None:
        if all(self.grid):
            self.kernel[self.grid](*self.args, **self.options)

    def labelled(self, label: str) -> "Launch":
        self.label = label
        return self

    def describe(self) -> str:
        """The launch's configuration in one line: the shape's label, constexprs and options."""
        opts = ",".join(f"{k}={v}" for k, v in self.options.items() if k != "enable_fp_fusion")
        return f"{self.label} {opts}".strip()


# DIFFUTRON_RECORD_LAUNCHES=FILE records every launch of the process (kernels/recorder.py); every kernel
# file imports this module, so the switch is read before any kernel can launch
from . import recorder  # noqa: E402

recorder.install_from_environment()
