"""Packaging: every folder of Python code is a declared package (a forgotten one installs fine in
editable mode and is missing from a wheel), and the bundled model and the playground's page ship as
package data."""

import ast
import fnmatch
import os

from where import ROOT


def _setup_call() -> dict:
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {kw.arg: kw.value for kw in call.keywords}


def test_every_code_folder_is_a_declared_package():
    kw = _setup_call()
    packages = set(ast.literal_eval(kw["packages"]))
    package_dir = ast.literal_eval(kw["package_dir"])
    found = set()
    for name, folder in package_dir.items():
        for here, dirs, files in os.walk(os.path.join(ROOT, folder)):
            dirs[:] = [d for d in dirs if not d.startswith((".", "__"))]
            if any(f.endswith(".py") for f in files):
                rel = os.path.relpath(here, os.path.join(ROOT, folder))
                found.add(name if rel == "." else name + "." + rel.replace(os.sep, "."))
    missing = sorted(found - packages)
    assert not missing, f"folders of code not declared in setup.py's packages: {missing}"


def test_the_bundled_model_is_package_data():
    kw = _setup_call()
    data = ast.literal_eval(kw["package_data"])
    assert "tiny-tr/*" in data.get("diffutron_engine.models", [])
    assert "diffutron_engine.models" in ast.literal_eval(kw["packages"])
    assert os.path.isfile(os.path.join(ROOT, "diffutron_engine", "models", "tiny-tr", "config.json"))


def test_the_playground_files_are_package_data():
    """Every file of the page's folder matches a package_data pattern of its declared package."""
    kw = _setup_call()
    assert "diffutron_engine.server.static" in ast.literal_eval(kw["packages"])
    patterns = ast.literal_eval(kw["package_data"]).get("diffutron_engine.server.static", [])
    folder = os.path.join(ROOT, "diffutron_engine", "server", "static")
    files = [f for f in os.listdir(folder) if not f.startswith(".")]
    assert "index.html" in files
    unshipped = [f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert not unshipped, f"playground files no package_data pattern ships: {unshipped}"
