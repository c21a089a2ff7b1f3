"""Bad inputs of the command line, each run as a real process (`python -m diffutron_engine ...`, offline):
exactly one line on stderr ("diffutron-engine: error: ..." naming the problem), exit code 2, no
traceback, nothing on stdout, and no output file (nor a temporary one) where --output was given. A
standard output closed by its reader is the one quiet exit: code 141 and nothing on stderr.

The checks are a table: one Case per row, one parametrized test over all tables. GENERATE_CASES are
the rows of `generate`; another command's rows go in a table of their own, added to ALL_CASES. A row
that fails before a model is loaded takes a fraction of a second (the command line refuses it before
it imports torch); a handful of those, one per kind of input, run in the fast tier, and every other
row (those that load the model take seconds) is marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import pytest

from diffutron_engine.loading import BUNDLED_MODELS

TINY_TR = BUNDLED_MODELS["tiny-tr"]
QUICK = ("--model", "tiny-tr", "--max-new-tokens", "4", "--steps", "4", "--block-size", "4")


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # after the program's name; "{tmp}" in an argument is the case's own folder
    message: str | None  # a part of the one stderr line; None: a quiet exit (closed stdout)
    stdin: bytes | None = None
    env: dict[str, str] | None = None
    files: dict[str, str | bytes | Callable] | None = None  # name -> content, or a function(path) making it
    output: bool = True  # also pass --output {tmp}/out.txt and check that it never appears
    stdout: str = "pipe"  # "pipe", "closed" (its reader went away before the first byte) or "full" (/dev/full)
    code: int = 2
    slow: bool = False  # loads the model: seconds per row


def _checkpoint_with(edit: Callable) -> Callable:
    """A files entry: a copy of the bundled model, changed by edit(folder)."""

    def make(path: str) -> None:
        shutil.copytree(TINY_TR, path)
        edit(path)

    return make


def _config_field(name: str, value) -> Callable:
    def edit(path: str) -> None:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        config[name] = value
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)

    return _checkpoint_with(edit)


def _nan_weight(path: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    weights = load_file(file)
    name = next(k for k in sorted(weights) if k.endswith("mlp.Wo.weight"))
    weights[name][0, 0] = float("nan")
    weights[name][1, 1] = torch.inf
    save_file(weights, file, metadata={"format": "pt"})


NOT_UTF8 = os.fsdecode(b"ab\xff\xfe")  # bytes that are not UTF-8, as Python hands such an argument over
DEEP = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n"

GENERATE_CASES = [
    # text that is not UTF-8, wherever it comes from
    Case("argument not UTF-8", ("generate", *QUICK, NOT_UTF8), "prompt 1 holds the byte 0xff, which is not UTF-8"),
    Case("stdin not UTF-8", ("generate", *QUICK), "standard input line 2 is not UTF-8 text (byte 0xff at offset 2)",
         stdin=b"Merhaba\nab\xff\xfe\n"),
    Case("stop string not UTF-8", ("generate", *QUICK, "--stop", NOT_UTF8, "x"),
         "--stop 1 holds the byte 0xff, which is not UTF-8", slow=True),
    Case("jsonl not UTF-8", ("generate", *QUICK, "--input", "{tmp}/in.jsonl"),
         "in.jsonl' line 2 is not UTF-8 text (byte 0xff at offset 12)",
         files={"in.jsonl": b'{"prompt": "a"}\n{"prompt": "\xff"}\n'}, slow=True),
    Case("jsonl lone surrogate", ("generate", *QUICK, "--input", "{tmp}/in.jsonl"),
         'in.jsonl:1: "prompt" holds a lone surrogate \\ud800, which is not a character',
         files={"in.jsonl": '{"prompt": "a\\ud800b"}\n'}),
    Case("jsonl message lone surrogate", ("generate", *QUICK, "--input", "{tmp}/in.jsonl"),
         "in.jsonl:1: message 0 content holds a lone surrogate \\udc80",
         files={"in.jsonl": '{"messages": [{"role": "user", "content": "a\\udc80"}]}\n'}, slow=True),
    Case("jsonl nested too deeply", ("generate", *QUICK, "--input", "{tmp}/in.jsonl"),
         "in.jsonl:1: JSON nested too deeply to read", files={"in.jsonl": DEEP}),
    # settings beyond their bounds
    Case("steps beyond the bound", ("generate", *QUICK, "--steps", "100000000", "x"),
         "steps must be <= 16,384, got 100,000,000"),
    Case("temperature beyond the bound", ("generate", *QUICK, "--temperature", "1e308", "x"),
         "temperature must be <= 100, got 1e+308", slow=True),
    Case("backend unknown", ("generate", *QUICK, "x"), "DIFFUTRON_BACKEND='nonsense' is not one of triton, cpp, torch",
         env={"DIFFUTRON_BACKEND": "nonsense"}, slow=True),
    Case("backend upper case", ("generate", *QUICK, "x"), "names are lower case: 'torch'",
         env={"DIFFUTRON_BACKEND": "TORCH"}, slow=True),
    # where the answers go
    Case("output empty", ("generate", *QUICK, "--output", "", "x"), "--output is empty", output=False),
    Case("output symlink loop", ("generate", *QUICK, "--output", "{tmp}/a", "x"), "its symbolic links form a loop",
         files={"a": lambda p: os.symlink("b", p), "b": lambda p: os.symlink("a", p)}, output=False, slow=True),
    Case("model empty", ("generate", "--model", "", "x"), "model must be a hub id or a local directory, got ''", slow=True),
    # the model folder
    Case("config field a string", ("generate", *QUICK[2:], "--model", "{tmp}/m", "x"),
         "Field 'hidden_size' expected int, got str (value: 'abc')", files={"m": _config_field("hidden_size", "abc")},
         slow=True),
    Case("config field a list", ("generate", *QUICK[2:], "--model", "{tmp}/m", "x"),
         "Field 'vocab_size' expected int, got list", files={"m": _config_field("vocab_size", [1, 2])}, slow=True),
    Case("config size not positive", ("generate", *QUICK[2:], "--model", "{tmp}/m", "x"),
         "broken config.json: num_attention_heads must be a positive integer, got 0",
         files={"m": _config_field("num_attention_heads", 0)}, slow=True),
    Case("weights with NaN and inf", ("generate", *QUICK[2:], "--model", "{tmp}/m", "x"),
         "has broken weights: model.layers.0.mlp.Wo.weight holds 2 NaN or infinite value(s)",
         files={"m": _checkpoint_with(_nan_weight)}, slow=True),
    Case("backend triton without CUDA", ("generate", *QUICK, "x"),
         "DIFFUTRON_BACKEND=triton was forced but is not available", env={"DIFFUTRON_BACKEND": "triton"}, slow=True),
    # standard output
    Case("stdout closed", ("generate", *QUICK, "--json", "x", "y"), None, output=False, stdout="closed",
         code=141, slow=True),
    Case("stdout closed while streaming", ("generate", *QUICK, "--stream", "x", "y"), None, output=False,
         stdout="closed", code=141, slow=True),
    Case("stdout full", ("generate", *QUICK, "x"), "cannot write to standard output: No space left on device",
         output=False, stdout="full", slow=True),
]

ALL_CASES = GENERATE_CASES


def _param(case: Case):
    marks = [pytest.mark.slow] if case.slow else []
    if case.stdout == "full" and not os.path.exists("/dev/full"):
        marks.append(pytest.mark.skip(reason="needs /dev/full"))
    if "triton" in (case.env or {}).values():
        import torch

        if torch.cuda.is_available():
            marks.append(pytest.mark.skip(reason="triton runs here: nothing to refuse"))
    return pytest.param(case, id=case.id, marks=marks)


def run_case(case: Case, tmp) -> subprocess.CompletedProcess:
    for name, content in (case.files or {}).items():
        path = os.path.join(tmp, name)
        if callable(content):
            content(path)
        else:
            with open(path, "wb") as f:
                f.write(content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content)
    argv = [a.replace("{tmp}", str(tmp)) for a in case.argv]
    if case.output:
        argv += ["--output", os.path.join(tmp, "out.txt")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(case.env or {})}
    env.pop("TRITON_INTERPRET", None)  # the test session's interpreter would make triton run on CPU
    if "DIFFUTRON_BACKEND" not in (case.env or {}):
        env.pop("DIFFUTRON_BACKEND", None)
    cmd = [sys.executable, "-m", "diffutron_engine", *argv]
    kwargs = dict(input=case.stdin or b"", stderr=subprocess.PIPE, env=env, cwd=tmp, timeout=300)
    if case.stdout == "closed":
        read, write = os.pipe()
        os.close(read)  # the reader is gone before the command writes anything
        try:
            return subprocess.run(cmd, stdout=write, **kwargs)
        finally:
            os.close(write)
    if case.stdout == "full":
        with open("/dev/full", "wb") as full:
            return subprocess.run(cmd, stdout=full, **kwargs)
    return subprocess.run(cmd, stdout=subprocess.PIPE, **kwargs)


@pytest.mark.parametrize("case", [_param(c) for c in ALL_CASES])
def test_bad_input(case: Case, tmp_path):
    proc = run_case(case, tmp_path)
    err = proc.stderr.decode("utf-8", "backslashreplace")
    assert proc.returncode == case.code, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    if case.message is None:
        assert err == ""
    else:
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("diffutron-engine: error: "), err
        assert case.message in lines[0], err
    if case.stdout == "pipe":
        assert proc.stdout == b""  # no partial answers
    if case.output:
        assert not (tmp_path / "out.txt").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".diffutron-")]  # no temporary file left
