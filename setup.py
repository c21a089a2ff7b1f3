"""Build script: package layout and the optional C++ extension.

`kernels/` and `training/` live at the top of the repository but are installed as
`diffutron_engine.kernels` and `diffutron_engine.training` (a top-level `kernels` would clash with the
PyPI package of that name, which transformers imports).

The C++ extension (`diffutron_engine._C`, sources in `csrc/`) is built against pybind11 only, never
against torch headers. When no C++ compiler is available, or the build fails, installation goes on
without it and the engine uses its torch fallback.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    """Build extensions when possible; never fail the install because of them."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler, missing headers, ...
            self._warn(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            self._warn(exc)

    @staticmethod
    def _warn(exc):
        print(
            f"WARNING: the C++ extension diffutron_engine._C was not built ({exc}); "
            "the engine will use its torch fallback on CPU.",
            file=sys.stderr,
        )


def _extensions():
    if os.environ.get("DIFFUTRON_NO_EXT") == "1":
        return []
    try:
        from pybind11.setup_helpers import Pybind11Extension
    except ImportError:
        print("WARNING: pybind11 not found; skipping the C++ extension.", file=sys.stderr)
        return []
    compile_args, link_args = ["-O3"], []
    if sys.platform.startswith("linux"):
        compile_args += ["-fopenmp"]
        link_args += ["-fopenmp"]
    # The extension is compiled on the machine that runs it, so tune for its CPU (AVX2 lanes for
    # the vocabulary sweeps) unless asked not to, e.g. when building a wheel for other machines.
    if os.environ.get("DIFFUTRON_PORTABLE") != "1" and not sys.platform.startswith("darwin"):
        compile_args += ["-march=native"]
    return [
        Pybind11Extension(
            "diffutron_engine._C",
            sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")),
            cxx_std=17,
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    ]


setup(
    packages=[
        "diffutron_engine",
        "diffutron_engine.cli",
        "diffutron_engine.model",
        "diffutron_engine.engine",
        "diffutron_engine.integrations",
        "diffutron_engine.server",
        "diffutron_engine.server.static",  # the playground's page (data only)
        "diffutron_engine.bench",
        "diffutron_engine.models",  # the bundled demo model (data) and the random-weight model builder
        "diffutron_engine.kernels",
        "diffutron_engine.training",
        "diffutron_engine.training.data",
    ],
    package_dir={
        "diffutron_engine": "diffutron_engine",
        "diffutron_engine.kernels": "kernels",
        "diffutron_engine.training": "training",
    },
    # the bundled demo model (trained by `make tiny-tr`, committed: ~16 MB) and the server's playground page
    package_data={"diffutron_engine.models": ["tiny-tr/*"],
                  "diffutron_engine.server.static": ["*.html", "*.js", "*.css"]},
    ext_modules=_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
)
