"""diffutron-engine: a fast, exact engine for masked diffusion language models of the Diffutron family.

Import cost is kept low: heavy modules (transformers, triton, the C++ extension) load on first use.
"""

import os as _os

__version__ = "0.1.0"

# Running from a source checkout (PYTHONPATH=<repo>, as on machines without pip): the top-level
# `kernels/` and `training/` folders are this package's `kernels` and `training` subpackages. An
# installed copy has them inside the package already and skips this. Only those two are mapped.
def _map_source_subpackages() -> None:
    import importlib.util
    import sys

    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    for name in ("kernels", "training"):
        init = _os.path.join(root, name, "__init__.py")
        if _os.path.isdir(_os.path.join(here, name)) or not _os.path.isfile(init):
            continue
        full = f"{__name__}.{name}"
        spec = importlib.util.spec_from_file_location(full, init, submodule_search_locations=[_os.path.dirname(init)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
        globals()[name] = module


_map_source_subpackages()

from .config import FAST, PRESETS, EngineConfig, Preset, ReferenceParams, SamplingParams  # noqa: E402
from .errors import DiffutronError, PromptError  # noqa: E402
from .inputs import ChatPrompt, TextPrompt, TokensPrompt  # noqa: E402

__all__ = ["ChatPrompt", "DiffutronError", "Engine", "EngineConfig", "FAST", "PRESETS", "Preset", "PromptError", "ReferenceParams",
           "ReferenceSampler", "RequestOutput", "SamplingParams", "StepFailed", "StepTrace", "TextPrompt", "TokensPrompt",
           "load_model", "__version__"]


def __getattr__(name):
    # Lazy: importing the package must not import transformers.
    if name == "ReferenceSampler":
        from .reference import ReferenceSampler

        return ReferenceSampler
    if name in ("Engine", "RequestOutput", "StepFailed", "StepTrace"):
        from . import engine

        return getattr(engine, name)
    if name == "load_model":
        from .loading import load_model

        return load_model
    raise AttributeError(f"module 'diffutron_engine' has no attribute {name!r}")
