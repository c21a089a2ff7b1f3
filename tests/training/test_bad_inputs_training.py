"""Bad inputs of the training side (`train cpt|sft|merge`, `eval lm-eval`), as a table: one Case per row,
each run as a real process (`python -m diffutron_engine ...`, offline) or through the command line's main()
in this process. Every row checks: exactly one line on stderr ("diffutron-engine: error: ..." naming the
problem), exit code 2, no traceback, nothing on stdout, and nothing destroyed: every file, folder and link
that was in the row's folder before the command is there after it, byte for byte, and nothing was added.

Rows that need a trained checkpoint copy one run made once per session (LoRA on the bundled tiny-tr, two
steps) and change it. A few positive checks of the merge's output rules follow the table.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable

import pytest
from files_util import make_files

from diffutron_engine.loading import BUNDLED_MODELS
from where import ROOT

TINY_TR = BUNDLED_MODELS["tiny-tr"]
TEXT = os.path.join(ROOT, "training", "data", "tr",
                    "heldout.txt")
CPT = ("train", "cpt", "--model", "tiny-tr", "--output-dir", "{tmp}/out")
SFT = ("train", "sft", "--model", "tiny-tr", "--output-dir", "{tmp}/out")
DATA = ("--data", TEXT)
SMALL = ("--max-steps", "2", "--batch-size", "4", "--max-length", "32", "--lora-r", "2")


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # after the program's name; "{tmp}" in an argument is the case's own folder
    message: str  # a part of the one stderr line
    files: dict[str, str | bytes | Callable] | None = None  # name -> content, or a function(path) making it
    in_process: bool = True  # main() in this process (no interpreter and torch start-up per row)
    env: dict[str, str] | None = None
    slow: bool = False
    needs: tuple[str, ...] = ()  # optional packages the row reaches (pytest.mark.needs: skipped without them)
    cwd: str | None = None  # the folder under {tmp} the command runs in (default: {tmp})


# ------------------------------------------------------------------------------------------ file makers
def _folder(**content: bytes) -> Callable:
    def make(path: str) -> None:
        os.makedirs(path)
        for name, data in content.items():
            with open(os.path.join(path, name), "wb") as f:
                f.write(data)

    return make


def _user_folder(path: str) -> None:
    """A folder of the user's own that a command pointed at must leave as it is."""
    _folder(**{"notes.txt": b"my notes\n", "data.bin": bytes(range(256))})(path)


def _long_line(path: str) -> None:
    """A JSONL file whose first line is longer than the reader's bound (64 Mi characters)."""
    with open(path, "wb") as f:
        f.write(b'{"text": "')
        chunk = b"a" * (1 << 20)
        for _ in range(65):
            f.write(chunk)
        f.write(b'"}\n')


def _adapter(path: str) -> None:
    """A LoRA adapter of the bundled tiny-tr (untrained: B is zero), with its tokenizer, as training saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForMaskedLM

    from diffutron_engine.loading import load_tokenizer

    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_pretrained(TINY_TR, dtype=torch.float32)
    get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["Wqkv"])).save_pretrained(path)
    load_tokenizer(TINY_TR).save_pretrained(path)


def _in(folder_maker: Callable, name: str, make: Callable) -> Callable:
    """folder_maker(path), then make(path/name)."""
    def both(path: str) -> None:
        folder_maker(path)
        make(os.path.join(path, name))

    return both


@functools.lru_cache(maxsize=None)
def _trained_run() -> str:
    """One LoRA run of two steps on tiny-tr, checkpoints 1 and 2 (made once, copied by the rows)."""
    from diffutron_engine.training.config import TrainConfig
    from diffutron_engine.training.trainer import Trainer

    root = tempfile.mkdtemp(prefix="diffutron-run-")
    _trained_run.keep = root  # removed at exit (below)
    cfg = TrainConfig(model="tiny-tr", output_dir=os.path.join(root, "out"), train_files=[TEXT], max_length=32,
                      batch_size=4, max_steps=2, lora_r=2, lora_alpha=4, save_every=1, keep_last=2, seed=3)
    Trainer(cfg, log=lambda s: None).train()
    return os.path.join(root, "out")


def _run_with(edit: Callable) -> Callable:
    """A files entry: a copy of the trained run, changed by edit(checkpoint-2 folder)."""
    def make(path: str) -> None:
        shutil.copytree(_trained_run(), path, symlinks=True)
        edit(os.path.join(path, "checkpoint-2"))

    return make


def _state(value) -> Callable:
    """Checkpoint-2's trainer state replaced by `value` (bytes: the file's content), its manifest made
    to match again, as any tool can."""
    def edit(folder: str) -> None:
        import torch

        from diffutron_engine.training import checkpoints as ck

        file = os.path.join(folder, ck.STATE)
        if isinstance(value, bytes):
            with open(file, "wb") as f:
                f.write(value)
        else:
            torch.save(value(torch.load(file, weights_only=True)) if callable(value) else value, file)
        os.remove(os.path.join(folder, ck.MANIFEST))
        ck.write_manifest(folder, 2)

    return edit


def _manifest_naming(name: str) -> Callable:
    def edit(folder: str) -> None:
        with open(os.path.join(folder, "manifest.json")) as f:
            manifest = json.load(f)
        manifest["files"][name] = {"size": 4, "sha256": hashlib.sha256(b"x\n\n\n").hexdigest()}
        with open(os.path.join(folder, "manifest.json"), "w") as f:
            json.dump(manifest, f)

    return edit


def _task(path: str) -> None:
    """An lm-eval task folder: a multiple-choice task with an empty choice."""
    os.makedirs(path)
    with open(os.path.join(path, "empty_choice.yaml"), "w") as f:
        f.write("task: empty_choice\ndataset_path: json\ncustom_dataset: !function utils.load\ntest_split: test\n"
                "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
                "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n"
                "    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    with open(os.path.join(path, "utils.py"), "w") as f:
        f.write("import datasets\n\n\ndef load(**kwargs):\n    return datasets.DatasetDict({'test': datasets.Dataset."
                "from_list([{'question': 'Bir?', 'choices': ['bir', ''], 'answer': 0}])})\n")


DEEP_YAML = b"lr: " + b"[" * 50_000 + b"]" * 50_000 + b"\n"
DIGITS = "1" * 5000
LATIN1 = "lr: 0.001\n# café\n".encode("latin-1")
BINARY = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00"
SFT_OK = b'{"instruction": "Merhaba", "output": "Selam"}\n'
RESUME = ("train", "cpt", "--output-dir", "{tmp}/out", "--resume", "{tmp}/out/checkpoint-2")
MERGE = ("train", "merge", "--adapter", "{tmp}/adapter")
LM_EVAL = ("eval", "lm-eval", "--model_args", "pretrained=tiny-tr,mc_num=4,batch_size=2")
QUIET_LM_EVAL = {"LMEVAL_LOG_LEVEL": "ERROR", "HF_DATASETS_CACHE": "{tmp}/ds"}  # lm-eval's progress lines off

CASES = [
    # --config: whatever the file holds
    Case("config binary", (*CPT, *DATA, "--config", "{tmp}/c.yaml"), "c.yaml is not UTF-8 text (byte 0x89 at offset 0)",
         files={"c.yaml": BINARY}, in_process=False),
    Case("config Latin-1", (*CPT, *DATA, "--config", "{tmp}/c.yaml"), "is not UTF-8 text (byte 0xe9 at offset 15)",
         files={"c.yaml": LATIN1}),
    Case("config a folder", (*CPT, *DATA, "--config", "{tmp}/c"), "config file {tmp}/c is a folder",
         files={"c": _user_folder}),
    Case("config nested 50k deep", (*CPT, *DATA, "--config", "{tmp}/c.yaml"), "c.yaml is nested too deeply to read",
         files={"c.yaml": DEEP_YAML}),
    Case("config a scalar", (*CPT, *DATA, "--config", "{tmp}/c.yaml"), "must hold a mapping of settings, not a str",
         files={"c.yaml": b"just words\n"}),
    Case("config 5000 digits", (*CPT, *DATA, "--config", "{tmp}/c.yaml"),
         "is not valid YAML: a number longer than 4,300 digits", files={"c.yaml": f"max_steps: {DIGITS}\n".encode()}),
    Case("config bad date", (*CPT, *DATA, "--config", "{tmp}/c.yaml"), "is not valid YAML: month must be in 1..12",
         files={"c.yaml": b"model: 2020-99-99\n"}),
    # numbers beyond their bounds or of the wrong kind
    Case("max_steps 1e20", (*CPT, *DATA, "--set", "max_steps=1e20"),
         "max_steps must be an integer in [1, 1000000000] (or null: epochs decide), got 100000000000000000000",
         in_process=False),
    Case("max_steps flag beyond", (*CPT, *DATA, "--max-steps", "99999999999"), "max_steps must be an integer in [1, "),
    Case("max_steps 5000 digits", (*CPT, *DATA, "--set", f"max_steps={DIGITS}"),
         "11111... (5,002 characters) is not a valid value (a number longer than 4,300 digits)"),
    Case("batch_size 1e9", (*CPT, *DATA, "--set", "batch_size=1e9"), "batch_size must be an integer in [1, 1048576]"),
    Case("save_every 0.5", (*CPT, *DATA, "--set", "save_every=0.5"), "save_every must be an integer, got 0.5"),
    Case("keep_last 1e12", (*CPT, *DATA, "--set", "keep_last=1e12"), "keep_last must be an integer in [1, 1000000000]"),
    Case("lr infinite", (*CPT, *DATA, "--set", "lr=1e999"), "lr must be a number (finite), got '1e999'"),
    Case("lr zero", (*CPT, *DATA, "--lr", "0"), "lr must be a number > 0, e.g. 2e-4, got 0.0"),
    # data files
    Case("parquet of random bytes", (*CPT, "--data", "{tmp}/x.parquet"), "x.parquet' is not a readable parquet file",
         files={"x.parquet": bytes(range(256)) * 8}, needs=("pyarrow",)),
    Case("sft instruction a number", (*SFT, "--data", "{tmp}/x.jsonl"),
         "SFT row 2: instruction must be a string, got 5",
         files={"x.jsonl": SFT_OK + b'{"instruction": 5, "output": "x"}\n'}, needs=("peft",)),
    Case("sft messages a string", (*SFT, "--data", "{tmp}/x.jsonl"), "SFT row 1: messages must be a list",
         files={"x.jsonl": b'{"messages": "x"}\n'}, needs=("peft",)),
    Case("sft output a list", (*SFT, "--data", "{tmp}/x.jsonl"), "SFT row 1: the answer (output, or the last "
         "message's content) must be a string, got [1]", files={"x.jsonl": b'{"instruction": "a", "output": [1]}\n'},
         needs=("peft",)),
    Case("sft message role unknown", (*SFT, "--data", "{tmp}/x.jsonl"), "SFT row 1: message 0 has unknown role 'bot'",
         files={"x.jsonl": b'{"messages": [{"role": "bot", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'},
         needs=("peft",)),
    Case("jsonl line beyond 64 Mi", (*CPT, "--data", "{tmp}/x.jsonl"), "x.jsonl' line 1 is longer than 64 MiB; split it",
         files={"x.jsonl": _long_line}),
    Case("jsonl 5000-digit integer", (*CPT, "--data", "{tmp}/x.jsonl"), "x.jsonl:2: JSON with an integer of more than "
         "4,300 digits", files={"x.jsonl": b'{"text": "a"}\n{"text": "b", "n": ' + DIGITS.encode() + b"}\n"}),
    Case("jsonl nested too deeply", (*CPT, "--data", "{tmp}/x.jsonl"), "x.jsonl:1: JSON nested too deeply to read",
         files={"x.jsonl": b"[" * 100_000 + b"]" * 100_000 + b"\n"}),
    Case("jsonl lone surrogate", (*CPT, "--data", "{tmp}/x.jsonl"), "data row 2 field 'text' holds a lone surrogate "
         "\\ud800", files={"x.jsonl": b'{"text": "a"}\n{"text": "b\\ud800"}\n'}, needs=("peft",)),
    Case("text line 3 not UTF-8", (*CPT, "--data", "{tmp}/x.txt"),
         "x.txt' line 3 is not UTF-8 text (byte 0xfc at offset 0)",
         files={"x.txt": b"bir\niki\n\xfc\xe7\n"}),
    # where the run writes
    Case("output-dir a file", (*CPT, *DATA),
         "output_dir '{tmp}/out' is an existing file, so it is not a writable folder",
         files={"out": b"precious\n"}, in_process=False),
    Case("final not ours", (*CPT, *DATA), "out/final is in the way of this run's final model: no manifest.json says "
         "this package wrote it", files={"out": _in(_user_folder, "final", _user_folder)}),
    Case("final with an empty manifest", (*CPT, *DATA, *SMALL), "out/final is in the way of this run's final model: "
         "its manifest.json is not one this package writes",
         files={"out": _in(_user_folder, "final", _folder(**{"manifest.json": b"{}", "notes.txt": b"mine\n"}))},
         needs=("peft",)),
    Case("an earlier run's checkpoints", (*CPT, *DATA, *SMALL), "out holds checkpoints of an earlier run "
         "(checkpoint-2 and 1 more); resume it with --resume latest, or choose another --output-dir",
         files={"out": _run_with(lambda folder: None)}, needs=("peft",)),
    Case("loss plot a folder", (*CPT, *DATA), "the loss plot '{tmp}/out/loss.png' is a folder",
         files={"out": _in(_user_folder, "loss.png", _user_folder)}),
    Case("metrics file is the data", (*CPT, "--data", "{tmp}/out/metrics.jsonl"),
         "the metrics file '{tmp}/out/metrics.jsonl' is also an input",
         files={"out": _folder(**{"metrics.jsonl": b'{"text": "Merhaba"}\n'})}),
    Case("checkpoint name taken", (*CPT, *DATA, *SMALL, "--save-every", "2"), "out/checkpoint-2 is in the way of this "
         "run's save at step 2: no manifest.json says this package wrote it",
         files={"out": _in(_user_folder, "checkpoint-2", _folder(**{"optimizer.pt": b"x", "state.json": b"{}"}))},
         needs=("peft",)),
    # train merge
    Case("merge into the current folder", (*MERGE, "--out", "."), "--out '.' is a folder with other content "
         "(no merged.json of an earlier output)", files={"adapter": _adapter, "work": _user_folder}, cwd="work",
         needs=("peft",)),
    Case("merge into the adapter's folder", ("train", "merge", "--adapter", "final", "--out", "."),
         "--out '.' holds the input 'final'", files={"final": _adapter, "notes.txt": b"mine\n"}, needs=("peft",)),
    Case("merge forced onto the adapter's weights", (*MERGE, "--out", "{tmp}/adapter/adapter_model.safetensors",
                                                     "--force"),
         "--out '{tmp}/adapter/adapter_model.safetensors' is inside the input '{tmp}/adapter'",
         files={"adapter": _adapter}, needs=("peft",)),
    Case("merge onto a file", (*MERGE, "--out", "{tmp}/file.txt"), "is an existing file; give a new folder (or --force",
         files={"adapter": _adapter, "file.txt": b"mine\n"}, needs=("peft",)),
    Case("merge onto a user folder", (*MERGE, "--out", "{tmp}/mine"), "is a folder with other content",
         files={"adapter": _adapter, "mine": _user_folder}, needs=("peft",)),
    Case("merge forced onto the adapter's folder", ("train", "merge", "--adapter", "{tmp}/run/adapter", "--out",
                                                    "{tmp}/run", "--force"), "holds the input '{tmp}/run/adapter'",
         files={"run": _in(_user_folder, "adapter", _adapter)}, needs=("peft",)),
    Case("merge forced onto the base", (*MERGE, "--base", "{tmp}/base", "--out", "{tmp}/base", "--force"),
         "--out '{tmp}/base' holds the input '{tmp}/base'", files={"adapter": _adapter,
                                                                  "base": lambda p: shutil.copytree(TINY_TR, p)},
         needs=("peft",)),
    Case("merge base of another vocabulary", (*MERGE, "--base", "{tmp}/base", "--out", "{tmp}/merged"),
         "--base '{tmp}/base' has a vocabulary of 664 tokens, the adapter's base", files={
             "adapter": _adapter, "base": lambda p: __import__("diffutron_engine.models.random_weights")
             .models.random_weights.build_random_checkpoint(p, size="tiny")}, needs=("peft",)),
    Case("merge adapter config broken", (*MERGE, "--out", "{tmp}/merged"), "adapter_config.json is not readable JSON",
         files={"adapter": _folder(**{"adapter_config.json": b"[" * 100_000})}, needs=("peft",)),
    # train --resume FOLDER: a trainer state that verifies but is not one
    Case("resume state a list", RESUME, "checkpoint-2 cannot be resumed: its trainer_state.pt holds a list, not a "
         "trainer state", files={"out": _run_with(_state([1, 2, 3]))}, needs=("peft",)),
    Case("resume state a tensor", RESUME, "its trainer_state.pt holds a tensor of shape (3,), not a trainer state",
         files={"out": _run_with(_state(lambda s: __import__("torch").zeros(3)))}, needs=("peft",)),
    Case("resume step abc", RESUME, "its trainer_state.pt has step 'abc', not a non-negative integer",
         files={"out": _run_with(_state(lambda s: {**s, "step": "abc"}))}, needs=("peft",)),
    Case("resume step -5", RESUME, "its trainer_state.pt has step -5, not a non-negative integer",
         files={"out": _run_with(_state(lambda s: {**s, "step": -5}))}, needs=("peft",)),
    Case("resume state empty", RESUME, "checkpoint-2 cannot be resumed: cannot read {tmp}/out/checkpoint-2/"
         "trainer_state.pt", files={"out": _run_with(_state(b""))}, needs=("peft",)),
    Case("resume optimizer garbage", RESUME, "its optimizer state is not a mapping of state and param_groups",
         files={"out": _run_with(_state(lambda s: {**s, "optimizer": {"x": 1}}))}, needs=("peft",)),
    Case("resume manifest names ../", RESUME, "checkpoint-2 fails verification: unreadable manifest.json (it names "
         "'../notes.txt', which is not a file name inside the checkpoint)",
         files={"out": _run_with(_manifest_naming("../notes.txt"))}, needs=("peft",)),
    Case("resume manifest names /etc", RESUME, "(it names '/etc/hostname', which is not a file name inside",
         files={"out": _run_with(_manifest_naming("/etc/hostname"))}, needs=("peft",)),
    # eval lm-eval: lm-eval's own errors, one line naming the task (real processes: lm-eval sets up logging)
    Case("lm-eval unknown task", (*LM_EVAL, "--tasks", "nosuchtask"),
         "lm-eval failed on --tasks nosuchtask: ValueError: "
         "Tasks not found: nosuchtask", in_process=False, env=QUIET_LM_EVAL, slow=True, needs=("lm_eval",)),
    Case("lm-eval empty choice", (*LM_EVAL, "--tasks", "empty_choice", "--include_path", "{tmp}/tasks"),
         "lm-eval failed on --tasks empty_choice: IndexError: string index out of range (at lm_eval/api/task.py:",
         files={"tasks": _task}, in_process=False, env=QUIET_LM_EVAL, slow=True, needs=("lm_eval", "datasets")),
]


# ------------------------------------------------------------------------------------------ the runner
def _param(case: Case):
    marks = [pytest.mark.slow] if case.slow else []
    if case.needs:
        marks.append(pytest.mark.needs(*case.needs))
    return pytest.param(case, id=case.id, marks=marks)


def snapshot(root: str) -> dict[str, tuple]:
    """Every entry under `root` (relative path -> what it is: a link's target, a file's SHA-256 and mode,
    or a folder), without following links."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                seen[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                seen[rel] = ("folder",)
            else:
                digest = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(1 << 20):
                        digest.update(block)
                seen[rel] = ("file", digest.hexdigest(), os.stat(path).st_mode)
    return seen


def _env(case: Case, tmp: str) -> dict[str, str]:
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            **{k: v.replace("{tmp}", tmp) for k, v in (case.env or {}).items()}}


def _run(case: Case, tmp: str, capfd, monkeypatch) -> tuple[int, str, str]:
    argv = [a.replace("{tmp}", tmp) for a in case.argv]
    if not case.in_process:
        env = {**os.environ, **_env(case, tmp)}
        env.pop("TRITON_INTERPRET", None)
        proc = subprocess.run([sys.executable, "-m", "diffutron_engine", *argv], capture_output=True, env=env,
                              cwd=os.path.join(tmp, case.cwd or ""), timeout=300)
        return proc.returncode, proc.stdout.decode(), proc.stderr.decode("utf-8", "backslashreplace")
    from diffutron_engine.cli.main import main

    monkeypatch.chdir(os.path.join(tmp, case.cwd or ""))
    for key, value in _env(case, tmp).items():
        monkeypatch.setenv(key, value)
    capfd.readouterr()
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    out, err = capfd.readouterr()
    return code, out, err


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case: Case, tmp_path, capfd, monkeypatch):
    tmp = str(tmp_path)
    make_files(case.files, tmp)
    before = snapshot(tmp)
    code, out, err = _run(case, tmp, capfd, monkeypatch)
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-3000:]
    lines = err.splitlines()
    assert len(lines) == 1 and re.match(r"diffutron-engine( [a-z-]+)*: error: ", lines[0]), err[-3000:]
    assert case.message.replace("{tmp}", tmp) in lines[0], lines[0]
    assert out == ""
    after = snapshot(tmp)
    changed = sorted(k for k in before if after.get(k) != before[k])
    added = sorted(k for k in after if k not in before and not k.startswith("ds"))  # lm-eval's dataset cache
    assert not changed and not added, (changed, added)


def teardown_module(module):
    keep = getattr(_trained_run, "keep", None)
    if keep:
        shutil.rmtree(keep, ignore_errors=True)


# ------------------------------------------------------------------------------------------ merge outputs
@pytest.mark.needs("peft")
def test_merge_takes_the_bundled_base_and_replaces_only_its_own_outputs(tmp_path):
    """`--base tiny-tr` resolves the bundled model; a second merge replaces the first one's folder (its
    marker says what it is) without --force; --force replaces a user's folder, and the adapter survives."""
    from diffutron_engine.cli.main import main
    from diffutron_engine.loading import load_model

    _adapter(str(tmp_path / "adapter"))
    out = str(tmp_path / "merged")
    assert main(["train", "merge", "--adapter", str(tmp_path / "adapter"), "--base", "tiny-tr", "--out", out]) == 0
    marker = json.load(open(os.path.join(out, "merged.json")))
    assert marker["base"] == "tiny-tr" and marker["adapter"] == str(tmp_path / "adapter") and marker["time"]
    assert load_model(out, dtype="float32", device="cpu").model.config.vocab_size == 8192
    first = snapshot(out)
    assert main(["train", "merge", "--adapter", str(tmp_path / "adapter"), "--out", out]) == 0  # an earlier merge's
    assert set(snapshot(out)) == set(first)
    _user_folder(str(tmp_path / "mine"))
    adapter = snapshot(str(tmp_path / "adapter"))
    assert main(["train", "merge", "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "mine"),
                 "--force"]) == 0
    assert os.path.isfile(tmp_path / "mine" / "merged.json") and not os.path.exists(tmp_path / "mine" / "notes.txt")
    assert snapshot(str(tmp_path / "adapter")) == adapter
    assert sorted(os.listdir(tmp_path)) == ["adapter", "merged", "mine"]  # no temporary or set-aside folder left


# ------------------------------------------------------------------------------------------ data bounds
def test_a_json_data_file_beyond_its_bound_is_one_line(tmp_path, capfd, monkeypatch):
    """A .json data file is read whole: beyond the bound (1 GiB; lowered here) it is refused with one line
    naming the file and the bound, before it is read."""
    from diffutron_engine.cli.main import main
    from diffutron_engine.training import dataset

    data = tmp_path / "rows.json"
    data.write_text(json.dumps([{"text": "Merhaba dünya"}] * 20))
    monkeypatch.setattr(dataset, "MAX_JSON_BYTES", 100)
    capfd.readouterr()
    code = main(["train", "cpt", "--model", "tiny-tr", "--output-dir", str(tmp_path / "out"), "--data", str(data)])
    out, err = capfd.readouterr()
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err[-2000:]
    assert f"data file '{data}' is larger than 100 bytes, the bound for a .json file (read whole)" in err
    assert not (tmp_path / "out").exists()
