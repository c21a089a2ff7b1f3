"""diffutron-engine: a fast, exact engine for masked diffusion language models of the Diffutron family.

Import cost is kept low: heavy modules (transformers, triton, the C++ extension) load on first use.
"""

import os as _os

__version__ = "0.1.0"

# Running from a source checkout (PYTHONPATH=<repo>, as on machines without pip): the top-level
# `kernels/` and `training/` folders are this package's `kernels` and `training` subpackages. An
# installed copy has them inside the package already and skips this.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) and _os.path.isfile(
    _os.path.join(_root, "kernels", "__init__.py")
):
    __path__.append(_root)  # noqa: F821  (package __path__)

from .config import FAST_PRESET, PRESETS, SamplerConfig, SamplingConfig  # noqa: E402
from .errors import DiffutronError  # noqa: E402

__all__ = ["DiffutronError", "Engine", "FAST_PRESET", "PRESETS", "SamplerConfig", "SamplingConfig", "ReferenceSampler",
           "load_model", "__version__"]


def __getattr__(name):
    # Lazy: importing the package must not import transformers.
    if name == "ReferenceSampler":
        from .reference import ReferenceSampler

        return ReferenceSampler
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "load_model":
        from .loading import load_model

        return load_model
    raise AttributeError(f"module 'diffutron_engine' has no attribute {name!r}")
