"""The package's layers, as docs/architecture.md draws them, checked on the source: what each module may
import (read with ast, imports inside functions included), so that a shortcut across layers fails here
instead of growing unseen."""

import ast
import os

import pytest
from where import ROOT

PKG = os.path.join(ROOT, "diffutron_engine")
# the source checkout's kernels/ and training/ are the package's subpackages of those names
FOLDERS = {"diffutron_engine": PKG, "diffutron_engine.kernels": os.path.join(ROOT, "kernels"),
           "diffutron_engine.training": os.path.join(ROOT, "training")}


def _modules() -> dict[str, str]:
    """module name -> file, for every module of the package."""
    found = {}
    for prefix, folder in FOLDERS.items():
        for here, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            rel = os.path.relpath(here, folder)
            parts = [] if rel == "." else rel.split(os.sep)
            if prefix == "diffutron_engine" and parts[:1] in (["kernels"], ["training"]):
                continue
            for name in files:
                if name.endswith(".py"):
                    mod = ".".join([prefix, *parts, *([] if name == "__init__.py" else [name[:-3]])])
                    found[mod] = os.path.join(here, name)
    return found


MODULES = _modules()


def _imports(module: str, *, top_level_only: bool = False) -> set[str]:
    """Absolute names of what `module` imports (`from . import x` gives package.x when x is a module)."""
    path = MODULES[module]
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            out.add(name)
            out.update(f"{name}.{a.name}" for a in node.names if f"{name}.{a.name}" in MODULES)
    return out


def _under(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_walk_sees_the_layers():
    for mod in ("diffutron_engine.config", "diffutron_engine.engine.engine", "diffutron_engine.server.app",
                "diffutron_engine.kernels.sampling", "diffutron_engine.training.trainer",
                "diffutron_engine.cli.main", "diffutron_engine.inputs"):
        assert mod in MODULES, mod


# Modules the command line imports before it knows the input is good: no torch, no transformers at their
# top level (heavy imports wait inside the functions that need them).
LIGHT = ["diffutron_engine", "diffutron_engine.config", "diffutron_engine.errors", "diffutron_engine.inputs",
         "diffutron_engine.outputs", "diffutron_engine.bounded", "diffutron_engine.jsonio",
         "diffutron_engine.bench.modes", "diffutron_engine.loading", "diffutron_engine.engine.scheduler",
         "diffutron_engine.server.config", "diffutron_engine.server.protocol"] + \
        [m for m in MODULES if m.startswith("diffutron_engine.cli.")]


@pytest.mark.parametrize("module", LIGHT)
def test_light_modules_import_no_torch_at_their_top(module):
    heavy = {n for n in _imports(module, top_level_only=True) if _under(n, "torch", "transformers", "triton", "numpy")}
    assert not heavy, f"{module} imports {sorted(heavy)} at its top level"


def test_the_scheduler_touches_no_tensor():
    names = _imports("diffutron_engine.engine.scheduler")
    assert not {n for n in names if _under(n, "torch", "numpy")}, names


# The engine's inside: only the engine package (and its measuring hook, probe) reaches it; everything
# else goes through Engine's public methods.
INSIDE = ["diffutron_engine.engine.runner", "diffutron_engine.engine.scheduler", "diffutron_engine.engine.batch",
          "diffutron_engine.engine.graphs", "diffutron_engine.engine.request", "diffutron_engine.engine.text"]


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith("diffutron_engine.engine")))
def test_nothing_outside_the_engine_reaches_inside_it(module):
    bad = {n for n in _imports(module) if _under(n, *INSIDE)}
    assert not bad, f"{module} imports the engine's inside: {sorted(bad)}"


# Which layers each layer may import (besides the standard library, torch and third-party packages).
BASE = ("diffutron_engine.config", "diffutron_engine.errors", "diffutron_engine.bounded", "diffutron_engine.jsonio")
ALLOWED = {
    "diffutron_engine.kernels": BASE + ("diffutron_engine.kernels",),
    "diffutron_engine.model": BASE + ("diffutron_engine.model", "diffutron_engine.kernels", "diffutron_engine.backends"),
    "diffutron_engine.engine": None,  # the engine may use every layer below the interfaces
    "diffutron_engine.server": BASE + ("diffutron_engine.server", "diffutron_engine.engine", "diffutron_engine.inputs",
                                       "diffutron_engine.loading"),
    "diffutron_engine.integrations": None,
    "diffutron_engine.training": None,
}
# no layer below the interfaces imports the interfaces (the server, the command line, the benchmarks)
INTERFACES = ("diffutron_engine.server", "diffutron_engine.cli", "diffutron_engine.bench")
BELOW = ("diffutron_engine.config", "diffutron_engine.errors", "diffutron_engine.inputs", "diffutron_engine.outputs",
         "diffutron_engine.bounded", "diffutron_engine.jsonio",
         "diffutron_engine.loading", "diffutron_engine.backends", "diffutron_engine.reference",
         "diffutron_engine.commit_schedule", "diffutron_engine.stopping", "diffutron_engine.kernels",
         "diffutron_engine.model", "diffutron_engine.engine")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _under(m, *BELOW)))
def test_no_layer_below_the_interfaces_imports_them(module):
    bad = {n for n in _imports(module) if _under(n, *INTERFACES)}
    assert not bad, f"{module} imports an interface: {sorted(bad)}"


@pytest.mark.parametrize("layer", [k for k, v in ALLOWED.items() if v is not None])
def test_each_layer_imports_only_what_it_may(layer):
    allowed = ALLOWED[layer]
    for module in (m for m in MODULES if _under(m, layer)):
        ours = {n for n in _imports(module) if _under(n, "diffutron_engine")}
        bad = {n for n in ours if n != "diffutron_engine" and not _under(n, *allowed)}
        assert not bad, f"{module} ({layer}) imports {sorted(bad)}; it may import {', '.join(allowed)}"


def test_the_benchmarks_are_their_own_subpackage():
    assert not any(m in MODULES for m in ("diffutron_engine.benchmark", "diffutron_engine.bench_eval",
                                          "diffutron_engine.bench_serve", "diffutron_engine.overhead",
                                          "diffutron_engine.random_model"))
    assert any(m.startswith("diffutron_engine.bench.") for m in MODULES)


def test_the_command_line_modules_import_no_cycle():
    """cli/main.py dispatches to one module per command; none of them imports main (or another command
    that imports it back), lazily or not."""
    cli = [m for m in MODULES if m.startswith("diffutron_engine.cli.")]
    graph = {m: {n for n in _imports(m) if n in cli and n != m} for m in cli}

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return path + [nxt]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = [c for c in map(cycle_from, cli) if c]
    assert not cycles, " -> ".join(cycles[0])
