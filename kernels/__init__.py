"""Fused Triton kernels of the engine, installed as `diffutron_engine.kernels` (one file per op)."""

# Workarounds for bugs of Triton's CPU interpreter in some triton/numpy versions; before any kernel module
# is imported, in every process that uses the kernels. Without TRITON_INTERPRET=1 it reads one environment
# variable and imports nothing (importing this package stays cheap).
from . import interpreter_compat as _interpreter_compat

_interpreter_compat.apply()
