"""Bad inputs of the command line, each run as a real process (`python -m diffutron_engine ...`, offline):
exactly one line on stderr ("diffutron-engine: error: ..." naming the problem), exit code 2, no
traceback, nothing on stdout, no output file (nor a temporary one) where --output was given, and
nothing destroyed: the files a row names as intact (an input given as the output, a read-only file, a
device node, a FIFO, a hard link) are afterwards what they were, byte for byte, the same inode of the
same type. A standard output closed by its reader is the one quiet exit: code 141 and nothing on stderr.

The checks are a table: one Case per row, one parametrized test over all tables. GENERATE_CASES are
the rows of `generate`, TRAIN_CASES those of `train` (whose output folder must stay empty), BENCH_CASES
those of `bench --save` and `bench eval --save`. A row that fails before a model is loaded takes a fraction of a second
(the command line refuses it before it imports torch); rows that load a model run the command line's
main() in this process (a second instead of eight: no interpreter, torch and transformers start-up per
row), except those about standard output and the interpreter's exit, which need a real process and are
marked slow.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import pytest

from diffutron_engine.loading import BUNDLED_MODELS
from files_util import make_files
from where import ROOT

TINY_TR = BUNDLED_MODELS["tiny-tr"]
QUICK = ("--model", "tiny-tr", "--max-new-tokens", "4", "--steps", "4", "--block-size", "4")


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # after the program's name; "{tmp}" in an argument is the case's own folder
    message: str | None  # a part of the one stderr line; None: a quiet exit (closed stdout)
    stdin: bytes | str | None = None  # bytes, or a file to read standard input from ("{tmp}" as in argv)
    env: dict[str, str] | None = None
    files: dict[str, str | bytes | Callable] | None = None  # name -> content, or a function(path) making it
    output: bool = True  # also pass --output {tmp}/out.txt and check that it never appears
    stdout: str = "pipe"  # "pipe", "closed" (its reader went away before the first byte) or "full" (/dev/full)
    code: int = 2
    slow: bool = False  # loads the model: seconds per row
    run_dir: str | None = None  # a folder under {tmp} (train's --output-dir) that must stay empty
    in_process: bool = False  # run the command line's main() in this process (seconds saved per row that
    # loads a model); stderr is still read at the file descriptor, and an exception escaping main() fails
    needs: tuple[str, ...] = ()  # optional packages the row reaches (pytest.mark.needs: skipped without them)
    intact: tuple[str, ...] = ()  # names under {tmp} that must be unchanged afterwards (content, inode, type)
    root: bool = False  # makes a device node: only as root (skipped otherwise)


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


def _read_only(content: bytes) -> Callable:
    def make(path: str) -> None:
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, 0o444)

    return make


def _hard_link_to(name: str) -> Callable:
    return lambda path: os.link(os.path.join(os.path.dirname(path), name), path)


def _null_device(path: str) -> None:
    """A copy of /dev/null's node (character device 1:3): what `--output /dev/null` reaches as root."""
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))


NOT_UTF8 = os.fsdecode(b"ab\xff\xfe")  # bytes that are not UTF-8, as Python hands such an argument over
DEEP = '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
DEEP_MESSAGES = '{"messages": [{"role": "user", "content": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}]}\n"
PROMPTS = {"in.jsonl": '{"prompt": "Merhaba"}\n'}
IN = ("--input", "{tmp}/in.jsonl")
NO_BACKEND = {"DIFFUTRON_BACKEND": "nonsense"}  # a run that fails after --output was checked, before any model

GENERATE_CASES = [
    # text that is not UTF-8, wherever it comes from
    Case("argument not UTF-8", ("generate", *QUICK, NOT_UTF8), "prompt 1 holds the byte 0xff, which is not UTF-8"),
    Case("stdin not UTF-8", ("generate", *QUICK), "standard input line 2 is not UTF-8 text (byte 0xff at offset 2)",
         stdin=b"Merhaba\nab\xff\xfe\n"),
    Case("stop string not UTF-8", ("generate", *QUICK, "--stop", NOT_UTF8, "x"),
         "--stop 1 holds the byte 0xff, which is not UTF-8", in_process=True),
    Case("jsonl not UTF-8", ("generate", *QUICK, "--input", "{tmp}/in.jsonl"),
         "in.jsonl' line 2 is not UTF-8 text (byte 0xff at offset 12)",
         files={"in.jsonl": b'{"prompt": "a"}\n{"prompt": "\xff"}\n'}, in_process=True),
    Case("jsonl lone surrogate", ("generate", *QUICK, "--input", "{tmp}/in.jsonl"),
         'in.jsonl:1: "prompt" holds a lone surrogate \\ud800, which is not a character',
         files={"in.jsonl": '{"prompt": "a\\ud800b"}\n'}),
    Case("jsonl message lone surrogate", ("generate", *QUICK, "--input", "{tmp}/in.jsonl"),
         "in.jsonl:1: message 0 content holds a lone surrogate \\udc80",
         files={"in.jsonl": '{"messages": [{"role": "user", "content": "a\\udc80"}]}\n'}, in_process=True),
    Case("jsonl nested too deeply", ("generate", *QUICK, "--input", "{tmp}/in.jsonl"),
         "in.jsonl:1: JSON nested too deeply to read", files={"in.jsonl": DEEP}),
    Case("jsonl message nested too deeply", ("generate", *QUICK, "--input", "{tmp}/in.jsonl"),
         "in.jsonl:1: JSON nested too deeply to read", files={"in.jsonl": DEEP_MESSAGES}, in_process=True),
    Case("jsonl integer of 5,000 digits", ("generate", *QUICK, "--input", "{tmp}/in.jsonl"),
         "in.jsonl:2: JSON with an integer of more than 4,300 digits",
         files={"in.jsonl": '{"prompt": "a"}\n{"prompt": ' + "9" * 5000 + "}\n"}),
    # what the prompts are read from: each line and the whole bounded
    Case("input an endless line", ("generate", *QUICK, "--input", "/dev/zero"),
         "--input '/dev/zero' line 1 is longer than 64 MiB"),
    Case("stdin an endless line", ("generate", *QUICK), "standard input line 1 is longer than 64 MiB",
         stdin="/dev/zero"),
    Case("stdin endless lines", ("generate", *QUICK), "standard input holds more than 1,000,000 lines",
         stdin=b"y\n" * 1_000_001),
    # settings beyond their bounds
    Case("steps beyond the bound", ("generate", *QUICK, "--steps", "100000000", "x"),
         "steps must be <= 16,384, got 100,000,000"),
    Case("batch size beyond the bound", ("generate", *QUICK, "--batch-size", "1000000000000", "x"),
         "--batch-size must be <= 4,096, got 1,000,000,000,000"),
    Case("batch size 1e12", ("generate", *QUICK, "--batch-size", "1e12", "x"),
         "argument --batch-size: invalid int value: '1e12'", in_process=True),
    Case("batch size 0", ("generate", *QUICK, "--batch-size", "0", "x"), "--batch-size must be >= 1, got 0",
         in_process=True),
    Case("batch size negative", ("generate", *QUICK, "--batch-size", "-5", "x"), "--batch-size must be >= 1, got -5",
         in_process=True),
    Case("temperature beyond the bound", ("generate", *QUICK, "--temperature", "1e308", "x"),
         "temperature must be <= 100, got 1e+308", in_process=True),
    Case("backend unknown", ("generate", *QUICK, "x"), "DIFFUTRON_BACKEND='nonsense' is not one of triton, cpp, torch",
         env={"DIFFUTRON_BACKEND": "nonsense"}, in_process=True),
    Case("backend upper case", ("generate", *QUICK, "x"), "names are lower case: 'torch'",
         env={"DIFFUTRON_BACKEND": "TORCH"}, in_process=True),
    # where the answers go
    Case("output empty", ("generate", *QUICK, "--output", "", "x"), "--output is empty", output=False),
    Case("output symlink loop", ("generate", *QUICK, "--output", "{tmp}/a", "x"),
         "cannot write --output '{tmp}/a': its symbolic links form a loop",
         files={"a": lambda p: os.symlink("b", p), "b": lambda p: os.symlink("a", p)}, output=False, in_process=True),
    Case("output is the input", ("generate", *QUICK, *IN, "--output", "{tmp}/in.jsonl"),
         "in.jsonl' is also an input (", files=PROMPTS, output=False, intact=("in.jsonl",)),
    Case("output a hard link of the input", ("generate", *QUICK, *IN, "--output", "{tmp}/link"),
         "link' is also an input (", files={**PROMPTS, "link": _hard_link_to("in.jsonl")}, output=False,
         intact=("in.jsonl", "link"), in_process=True),
    Case("output a symlink to the input", ("generate", *QUICK, *IN, "--output", "{tmp}/sym"),
         "sym' is also an input (", files={**PROMPTS, "sym": lambda p: os.symlink("in.jsonl", p)}, output=False,
         intact=("in.jsonl", "sym"), in_process=True),
    Case("output the file on stdin", ("generate", *QUICK, "--output", "{tmp}/in.txt"),
         "in.txt' is also an input ('/dev/stdin')", stdin="{tmp}/in.txt", files={"in.txt": "Merhaba\n"},
         output=False, intact=("in.txt",)),
    Case("output read-only", ("generate", *QUICK, "--output", "{tmp}/ro.txt", "x"), "ro.txt': it is read-only",
         files={"ro.txt": _read_only(b"earlier answers\n")}, output=False, intact=("ro.txt",)),
    Case("output a folder", ("generate", *QUICK, "--output", "{tmp}/d", "x"), "d' is a folder; give a file name",
         files={"d": os.mkdir}, output=False, intact=("d",), in_process=True),
    Case("output a device, the run failed", ("generate", *QUICK, "--output", "{tmp}/null", "x"),
         "DIFFUTRON_BACKEND='nonsense'", env=NO_BACKEND, files={"null": _null_device}, output=False,
         intact=("null",), root=True),
    Case("output a FIFO, the run failed", ("generate", *QUICK, "--output", "{tmp}/fifo", "x"),
         "DIFFUTRON_BACKEND='nonsense'", env=NO_BACKEND, files={"fifo": os.mkfifo}, output=False,
         intact=("fifo",), in_process=True),
    Case("output hard-linked, the run failed", ("generate", *QUICK, "--output", "{tmp}/a", "x"),
         "DIFFUTRON_BACKEND='nonsense'", env=NO_BACKEND, files={"a": b"earlier answers\n", "b": _hard_link_to("a")},
         output=False, intact=("a", "b"), in_process=True),
    Case("model empty", ("generate", "--model", "", "x"), "model must be a hub id or a local directory, got ''", in_process=True),
    # the model folder
    Case("config field a string", ("generate", *QUICK[2:], "--model", "{tmp}/m", "x"),
         "Field 'hidden_size' expected int, got str (value: 'abc')", files={"m": _config_field("hidden_size", "abc")},
         in_process=True),
    Case("config field a list", ("generate", *QUICK[2:], "--model", "{tmp}/m", "x"),
         "Field 'vocab_size' expected int, got list", files={"m": _config_field("vocab_size", [1, 2])}, in_process=True),
    Case("config size not positive", ("generate", *QUICK[2:], "--model", "{tmp}/m", "x"),
         "broken config.json: num_attention_heads must be a positive integer, got 0",
         files={"m": _config_field("num_attention_heads", 0)}, in_process=True),
    Case("weights with NaN and inf", ("generate", *QUICK[2:], "--model", "{tmp}/m", "x"),
         "has broken weights: model.layers.0.mlp.Wo.weight holds 2 NaN or infinite value(s)",
         files={"m": _checkpoint_with(_nan_weight)}, in_process=True),
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

# `train`: every setting, data file, model and resume target it is given. {tmp}/out is the run's output
# folder; no checkpoint, metrics or final model may appear in it. A few rows of each kind run as real
# processes (settings are refused before torch is imported: 0.2 s); the rest run in process.
TEXT = os.path.join(ROOT, "training", "data", "tr",
                    "heldout.txt")
CPT = ("train", "cpt", "--model", "tiny-tr", "--output-dir", "{tmp}/out")
DATA = ("--data", TEXT)


def _train(id, argv, message, files=None, in_process=False, needs=()):
    return Case(id, argv, message, files=files, output=False, run_dir="out", in_process=in_process, needs=needs)


def _folder_with(name: str, content: bytes) -> Callable:
    def make(path: str) -> None:
        os.makedirs(path)
        with open(os.path.join(path, name), "wb") as f:
            f.write(content)

    return make


TRAIN_CASES = [
    # settings, from --set, YAML files and flags
    _train("set not a number", (*CPT, *DATA, "--set", "lr=fast"), "lr must be a number, got 'fast'"),
    _train("set without =", (*CPT, *DATA, "--set", "lr"), "--set expects KEY=VALUE"),
    _train("set empty name", (*CPT, *DATA, "--set", "=3"), "a setting name before '='", in_process=True),
    _train("set bad YAML", (*CPT, *DATA, "--set", "lr=["), "--set lr: '[' is not a valid value", in_process=True),
    _train("set NaN", (*CPT, *DATA, "--set", "lr=.nan"), "lr must be a number (finite)", in_process=True),
    _train("set unknown name", (*CPT, *DATA, "--set", "seeds=1"), "unknown setting(s): seeds (did you mean seed?)"),
    _train("yaml batch 2.5", (*CPT, *DATA, "--config", "{tmp}/c.yaml"), "batch_size must be an integer, got 2.5",
           files={"c.yaml": b"batch_size: 2.5\n"}),
    _train("yaml grad_accum 1.5", (*CPT, *DATA, "--config", "{tmp}/c.yaml"), "grad_accum must be an integer, got 1.5",
           files={"c.yaml": b"grad_accum: 1.5\n"}, in_process=True),
    _train("yaml lora_r 4.5", (*CPT, *DATA, "--config", "{tmp}/c.yaml"), "lora_r must be an integer, got 4.5",
           files={"c.yaml": b"lora_r: 4.5\n"}, in_process=True),
    _train("yaml max_steps 2.5", (*CPT, *DATA, "--config", "{tmp}/c.yaml"), "max_steps must be an integer, got 2.5",
           files={"c.yaml": b"max_steps: 2.5\n"}, in_process=True),
    _train("yaml targets a mapping", (*CPT, *DATA, "--config", "{tmp}/c.yaml"), "lora_targets must be a list of strings",
           files={"c.yaml": b"lora_targets: {a: 1}\n"}, in_process=True),
    _train("yaml output_dir a list", ("train", "cpt", "--model", "tiny-tr", *DATA, "--config", "{tmp}/c.yaml"),
           "output_dir must be a string", files={"c.yaml": b"output_dir: [a, b]\n"}, in_process=True),
    _train("yaml warmup 1", (*CPT, *DATA, "--config", "{tmp}/c.yaml"), "warmup_ratio must be a number in [0, 1)",
           files={"c.yaml": b"warmup_ratio: 1\n"}, in_process=True),
    _train("yaml not YAML", (*CPT, *DATA, "--config", "{tmp}/c.yaml"), "is not valid YAML",
           files={"c.yaml": b"lr: [1, 2\n"}, in_process=True),
    _train("yaml a list", (*CPT, *DATA, "--config", "{tmp}/c.yaml"), "must hold a mapping of settings",
           files={"c.yaml": b"- a\n- b\n"}, in_process=True),
    _train("yaml missing", (*CPT, *DATA, "--config", "{tmp}/none.yaml"), "config file not found", in_process=True),
    _train("preset unknown", (*CPT, *DATA, "--preset", "gpt"), "unknown preset 'gpt'", in_process=True),
    _train("objective unknown", (*CPT, *DATA, "--objective", "gpt"), "objective must be one of mlm, mdlm", in_process=True),
    _train("epochs 0", (*CPT, *DATA, "--epochs", "0"), "epochs must be a number in (0, 1e6]", in_process=True),
    _train("lr negative", (*CPT, *DATA, "--lr", "-1"), "lr must be a number > 0", in_process=True),
    _train("seed negative", (*CPT, *DATA, "--seed", "-1"), "seed must be an integer in [0, 2**63)", in_process=True),
    _train("fsdp resume", (*CPT, *DATA, "--strategy", "fsdp", "--resume", "latest"), "resuming an FSDP run", in_process=True),
    _train("flag not an int", (*CPT, *DATA, "--max-steps", "abc"), "invalid int value: 'abc'"),
    _train("no data", CPT, "no training data", in_process=True),
    # data files
    _train("data missing", (*CPT, "--data", "{tmp}/none.txt"), "none.txt' does not exist"),
    _train("data a folder", (*CPT, "--data", "{tmp}"), "is a folder, not a file", in_process=True),
    _train("data not UTF-8", (*CPT, "--data", "{tmp}/x.txt"), "is not UTF-8 text",
           files={"x.txt": b"\xff\xfe caf\xe9\n"}, in_process=True),
    _train("data broken JSONL", (*CPT, "--data", "{tmp}/x.jsonl"), "not valid JSON",
           files={"x.jsonl": b'{"text": "Mer'}, in_process=True),
    _train("data empty", (*CPT, "--data", "{tmp}/x.txt"), "the data holds no text", files={"x.txt": b"\n\n"},
           in_process=True),
    _train("data without its text field", (*CPT, "--data", "{tmp}/x.jsonl"), "has no string field 'text'",
           files={"x.jsonl": b'{"body": "Merhaba"}\n'}, in_process=True, needs=("peft",)),
    _train("sft rows without columns", ("train", "sft", "--model", "tiny-tr", "--output-dir", "{tmp}/out", "--data",
                                        "{tmp}/x.jsonl"), "an SFT row needs instruction/input/output",
           files={"x.jsonl": b'{"text": "Merhaba"}\n'}, in_process=True, needs=("peft",)),
    _train("eval data missing", (*CPT, *DATA, "--eval-data", "{tmp}/none.txt"), "none.txt' does not exist", in_process=True),
    _train("hub dataset offline", (*CPT, "--dataset", "nobody/nothing"), "could not load the hub dataset", in_process=True,
           needs=("datasets",)),
    # the model, the output folder, the resume target
    _train("model missing", ("train", "cpt", "--model", "{tmp}/none", "--output-dir", "{tmp}/out", *DATA),
           "none' does not exist", in_process=True),
    _train("model without config", ("train", "cpt", "--model", "{tmp}/m", "--output-dir", "{tmp}/out", *DATA),
           "has no config.json", files={"m": _folder_with("x", b"")}, in_process=True),
    _train("model weights NaN", ("train", "cpt", "--model", "{tmp}/m", "--output-dir", "{tmp}/out", *DATA),
           "has broken weights: model.layers.0.mlp.Wo.weight", files={"m": _checkpoint_with(_nan_weight)}, in_process=True),
    _train("output a file", ("train", "cpt", "--model", "tiny-tr", "--output-dir", "{tmp}/f", *DATA),
           "is not a writable folder", files={"f": b"x"}, in_process=True, needs=("peft",)),
    _train("lora target unknown", (*CPT, *DATA, "--set", "lora_targets=attn"), "do not name modules of this model",
           in_process=True, needs=("peft",)),
    _train("length beyond the context", (*CPT, *DATA, "--max-length", "4096"), "exceeds the model's context of 512",
           in_process=True, needs=("peft",)),
    _train("batch beyond the data", (*CPT, *DATA, "--batch-size", "100000"), "fewer than one global batch", in_process=True,
           needs=("peft",)),
    _train("resume without checkpoints", (*CPT, *DATA, "--resume", "latest"), "--resume latest: no checkpoint in",
           in_process=True, needs=("peft",)),
    _train("resume folder missing", (*CPT, *DATA, "--resume", "{tmp}/none"), "no such checkpoint folder", in_process=True,
           needs=("peft",)),
    _train("merge not an adapter", ("train", "merge", "--adapter", "{tmp}", "--out", "{tmp}/merged"),
           "is not a LoRA adapter", in_process=True, needs=("peft",)),
]

# `bench eval --save`: refused before the benchmark runs (minutes), what is there left as it was
BENCH_CASES = [
    Case("bench eval save a file", ("bench", "eval", "--save", "{tmp}/f"),
         "cannot write --save '{tmp}/f': '{tmp}/f' is not a folder", files={"f": b"keep"}, output=False,
         intact=("f",), in_process=True),
    Case("bench eval save empty", ("bench", "eval", "--save", ""), "--save is empty: give a folder", output=False,
         in_process=True),
    Case("bench eval report read-only", ("bench", "eval", "--save", "{tmp}", "--tag", "t"), "-t.json': it is read-only",
         files={f"{time.strftime('%Y-%m-%d')}-t.json": _read_only(b"{}")}, output=False,
         intact=(f"{time.strftime('%Y-%m-%d')}-t.json",), in_process=True),
    # checked before the measuring, not after it
    Case("bench save a file", ("bench", "--layers", "1", "--new-tokens", "2", "--steps", "2", "--save", "{tmp}/f"),
         "cannot write --save '{tmp}/f': '{tmp}/f' is not a folder", files={"f": b"keep"}, output=False,
         intact=("f",), in_process=True),
    Case("bench overhead save a file", ("bench", "--overhead", "--save", "{tmp}/f"),
         "cannot write --save '{tmp}/f': '{tmp}/f' is not a folder", files={"f": b"keep"}, output=False,
         intact=("f",), in_process=True),
]

ALL_CASES = GENERATE_CASES + TRAIN_CASES + BENCH_CASES


def _param(case: Case):
    marks = [pytest.mark.slow] if case.slow else []
    if case.needs:
        marks.append(pytest.mark.needs(*case.needs))
    if case.stdout == "full" and not os.path.exists("/dev/full"):
        marks.append(pytest.mark.skip(reason="needs /dev/full"))
    if case.root and os.geteuid() != 0:
        marks.append(pytest.mark.skip(reason="makes a device node: root only"))
    if "triton" in (case.env or {}).values():
        import torch

        if torch.cuda.is_available():
            marks.append(pytest.mark.skip(reason="triton runs here: nothing to refuse"))
    return pytest.param(case, id=case.id, marks=marks)


def _argv(case: Case, tmp) -> list[str]:
    argv = [a.replace("{tmp}", str(tmp)) for a in case.argv]
    return argv + (["--output", os.path.join(tmp, "out.txt")] if case.output else [])


def _state(path: str) -> tuple:
    """What must not change about a file the command did not create: its inode, type and mode, and its
    bytes (a regular file) or where it leads (a symbolic link); a device or FIFO is not opened."""
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            content = f.read()
    elif stat.S_ISLNK(st.st_mode):
        content = os.readlink(path)
    else:
        content = None
    return st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode), st.st_mode, st.st_rdev, st.st_nlink, content


def run_in_process(case: Case, tmp, capfd, monkeypatch) -> subprocess.CompletedProcess:
    from diffutron_engine.cli.main import main

    assert case.stdin is None, "a row with standard input runs as a process"
    monkeypatch.chdir(tmp)
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(case.env or {})}.items():
        monkeypatch.setenv(key, value)
    if "DIFFUTRON_BACKEND" not in (case.env or {}):
        monkeypatch.delenv("DIFFUTRON_BACKEND", raising=False)
    capfd.readouterr()
    try:
        code = main(_argv(case, tmp))
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(case.argv, code, out.encode(), err.encode())


def run_case(case: Case, tmp) -> subprocess.CompletedProcess:
    argv = _argv(case, tmp)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(case.env or {})}
    env.pop("TRITON_INTERPRET", None)  # the test session's interpreter would make triton run on CPU
    if "DIFFUTRON_BACKEND" not in (case.env or {}):
        env.pop("DIFFUTRON_BACKEND", None)
    cmd = [sys.executable, "-m", "diffutron_engine", *argv]
    if isinstance(case.stdin, str):
        with open(case.stdin.replace("{tmp}", str(tmp)), "rb") as stdin:
            return subprocess.run(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp,
                                  timeout=300)
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
def test_bad_input(case: Case, tmp_path, capfd, monkeypatch):
    make_files(case.files, tmp_path)
    before = {name: _state(os.path.join(tmp_path, name)) for name in case.intact}
    proc = run_in_process(case, tmp_path, capfd, monkeypatch) if case.in_process else run_case(case, tmp_path)
    err = proc.stderr.decode("utf-8", "backslashreplace")
    assert proc.returncode == case.code, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    if case.message is None:
        assert err == ""
    else:
        lines = err.splitlines()
        # "diffutron-engine: error: ...", or argparse's "diffutron-engine train cpt: error: ..."
        assert len(lines) == 1 and re.match(r"diffutron-engine( [a-z-]+)*: error: ", lines[0]), err
        assert case.message.replace("{tmp}", str(tmp_path)) in lines[0], err
    if case.stdout == "pipe":
        assert proc.stdout == b""  # no partial answers
    if case.output:
        assert not (tmp_path / "out.txt").exists()
    assert {name: _state(os.path.join(tmp_path, name)) for name in case.intact} == before  # nothing destroyed
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".diffutron-")]  # no temporary file left
    if case.run_dir:  # no checkpoint, metrics or final model of a run that never started
        run = tmp_path / case.run_dir
        assert not run.exists() or not list(run.iterdir()), sorted(p.name for p in run.iterdir())


@pytest.mark.parametrize("where", ["--input", "stdin"])
def test_what_prompts_are_read_from_is_bounded_as_a_whole(where, tmp_path, capfd, monkeypatch):
    """Besides each line, the whole of --input or standard input is bounded (1 GiB; 1,000 bytes here):
    one line and exit 2 once the bound is passed, before any model is loaded."""
    import io

    from diffutron_engine.cli import generate
    from diffutron_engine.cli.main import main

    monkeypatch.setattr(generate, "MAX_INPUT_BYTES", 1000)
    text = '{"prompt": "Merhaba"}\n' * 100  # 2,200 bytes, every line short
    if where == "stdin":
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
        argv, name = ["generate", *QUICK], "standard input"
    else:
        src = tmp_path / "in.jsonl"
        src.write_text(text)
        argv, name = ["generate", *QUICK, "--input", str(src)], f"--input {str(src)!r}"
    capfd.readouterr()
    code = main(argv)
    out, err = capfd.readouterr()
    assert code == 2 and out == ""
    assert err.splitlines() == [f"diffutron-engine: error: {name} holds more than 1,000 bytes; split the prompts "
                                "over several runs"]


def test_standard_output_gets_utf8_whatever_its_encoding(monkeypatch):
    """An answer goes out as UTF-8 bytes through a standard output that Python would encode as ASCII,
    after what print() wrote before it."""
    import io

    from diffutron_engine.cli.stdout import write_stdout

    raw = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(raw, encoding="ascii"))
    print("first")
    write_stdout("Türkçe şiir\n")
    assert raw.getvalue() == "first\nTürkçe şiir\n".encode("utf-8")


@pytest.mark.slow
def test_pythonioencoding_ascii_still_writes_the_answers_as_utf8(tmp_path):
    """PYTHONIOENCODING=ascii (or a locale without UTF-8) and Turkish text to print: the bytes go out as
    UTF-8, exit 0, nothing on stderr, as cat or sed would pass them through."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "ascii"}
    env.pop("TRITON_INTERPRET", None)
    env.pop("DIFFUTRON_BACKEND", None)
    proc = subprocess.run([sys.executable, "-m", "diffutron_engine", "generate", *QUICK, "--seed", "0", "--json",
                           "Türkçe şiir", "İstanbul"], capture_output=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr.decode("utf-8", "backslashreplace")
    rows = [json.loads(line) for line in proc.stdout.decode("utf-8").splitlines()]
    assert [r["prompt"] for r in rows] == ["Türkçe şiir", "İstanbul"]
