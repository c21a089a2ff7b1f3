"""Shared fixtures: locally built tiny checkpoints (no hub access), the golden model, and hardware
markers turned into skips in one place (no device probing at import time)."""

import os
import shutil

import pytest
import torch
from where import GOLDEN_MODEL

# Triton kernels run on CPU tensors in the interpreter when there is no GPU. The variable must be set
# before anything imports triton, so it is set here, once, for the whole session.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")



# Optional packages a test may need (`@pytest.mark.needs("fastapi", "uvicorn")`, by import name), each with
# the install that provides it. A test that needs a missing one is skipped with that install in its reason;
# `pip install -e '.[test]'` provides all of them except `datasets`.
OPTIONAL_PACKAGES = {
    "fastapi": "pip install -e '.[serve]'",
    "uvicorn": "pip install -e '.[serve]'",
    "openai": "pip install -e '.[test]'",
    "httpx": "pip install -e '.[test]'",
    "lm_eval": "pip install -e '.[eval]'",
    "peft": "pip install -e '.[train]'",
    "pyarrow": "pip install -e '.[train]'",
    "matplotlib": "pip install -e '.[train]'",
    "yaml": "pip install -e '.[train]'",
    "datasets": "pip install datasets",
    "playwright": "pip install -e '.[test]', with a browser: apt-get install chromium",
}


def chromium_binary() -> str | None:
    """The Chromium the browser tests drive through playwright (Debian's package: playwright's own browser
    download is never used): DIFFUTRON_CHROMIUM when set, else the first one installed."""
    given = os.environ.get("DIFFUTRON_CHROMIUM")
    candidates = [given] if given else ["/usr/lib/chromium/chromium", shutil.which("chromium"),
                                        shutil.which("chromium-browser")]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


CHROMIUM_REASON = ("needs a Chromium browser (apt-get install chromium, or DIFFUTRON_CHROMIUM=/path/to/chromium) "
                   "and playwright (pip install -e '.[test]')")


def _missing_packages(names) -> list[str]:
    import importlib.util

    unknown = [n for n in names if n not in OPTIONAL_PACKAGES]
    if unknown:  # a typo would skip the test everywhere
        raise pytest.UsageError(f"needs(): {', '.join(unknown)} not in tests/conftest.py's OPTIONAL_PACKAGES")
    return [n for n in names if importlib.util.find_spec(n) is None]


def pytest_collection_modifyitems(config, items):
    import importlib.util

    from diffutron_engine.backends import cpp_available

    needs = {
        "cuda": (torch.cuda.is_available(), "needs a CUDA GPU"),
        "triton": (importlib.util.find_spec("triton") is not None, "needs triton"),
        "cext": (cpp_available(), "needs the compiled C++ extension (diffutron_engine._C: pip install -e . "
                                  "with a C++ compiler, or python setup.py build_ext --inplace)"),
        "chromium": (chromium_binary() is not None, CHROMIUM_REASON),
    }
    for item in items:
        for marker, (ok, why) in needs.items():
            if marker in item.keywords and not ok:
                item.add_marker(pytest.mark.skip(reason=why))
        names = [name for mark in item.iter_markers("needs") for name in mark.args]
        missing = _missing_packages(dict.fromkeys(names))
        if missing:
            installs = dict.fromkeys(OPTIONAL_PACKAGES[n] for n in missing)
            item.add_marker(pytest.mark.skip(reason=f"needs {', '.join(missing)} (not installed: "
                                                    f"{'; '.join(installs)})"))


@pytest.fixture(scope="session")
def chromium():
    """The Chromium binary for tests marked `chromium` (they are skipped without one)."""
    path = chromium_binary()
    if path is None:
        pytest.skip(CHROMIUM_REASON)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random-weight tiny ModernBertForMaskedLM with a BPE tokenizer (mmBERT's special ids)."""
    from diffutron_engine.models.random_weights import build_random_checkpoint

    return build_random_checkpoint(str(tmp_path_factory.mktemp("tiny") / "model"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_checkpoint):
    from diffutron_engine.loading import load_model

    return load_model(tiny_checkpoint, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def golden():
    from diffutron_engine.loading import load_model

    return load_model(GOLDEN_MODEL, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def golden_triton():
    """The golden model where Triton runs: on the GPU when there is one, else on CPU (interpreter)."""
    from diffutron_engine.loading import load_model

    return load_model(GOLDEN_MODEL, dtype="float32", device="cuda" if torch.cuda.is_available() else "cpu")
