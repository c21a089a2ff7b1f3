#!/usr/bin/env python3
"""Probe the `diffutron-engine` command line and Python API the way a demanding or careless user would,
and print what held.

    python bench/cli_probe.py --repo DIR [--python PY] [--only CATEGORY[,CATEGORY]] [--jobs N] [--save FILE.json]

Runs every case against the checkout DIR (PYTHONPATH=DIR, HF_HUB_OFFLINE=1, the bundled tiny-tr), so two
checkouts can be compared case for case. Each case runs in a temporary folder of its own, with a working
directory holding a file of its own, under an address-space limit, and is judged on:
- the exit code (2 for bad input, or the code the case names: 0 where doing the work is right);
- on an error exit, stderr is exactly one "diffutron-engine: error:" line ("diffutron-engine: warning:"
  lines allowed besides); on success, no error line; never a "Traceback" in either stream;
- nothing destroyed: every path the case names as precious (the input, the folder, the device node, the
  adapter, a read-only file, the current folder's files) has the same type, bytes, mode and inode
  afterwards (a device node or FIFO stays one: never a regular file renamed over it);
- the case's own check where it has one (a hard link written through, a fallback to the older checkpoint).

Categories (the table's rows): generate-output, generate-input, train-merge, train-config, checkpoints,
api. Output: a markdown table, one line per case that did not hold, then one JSON summary line. Exit 0
unless the probe itself breaks (a checkout that cannot even set up its fixtures is a result).

Stdlib only: the fixtures that need torch (a checkpoint without a tensor, a tokenizer whose mask id lies
past the vocabulary, corrupted trainer states) are made by the checkout's own interpreter.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback

from probe_util import finish

GIB = 1 << 30
ERR, WARN = "diffutron-engine: error:", "diffutron-engine: warning:"
# a usage error from a subcommand's parser names it: "diffutron-engine generate: error: ..." (one line too)
ERROR_LINE = re.compile(r"^diffutron-engine(?: [\w-]+)*: error: ")
TINY = ["--model", "tiny-tr", "--max-new-tokens", "4", "--steps", "4", "--block-size", "4", "--seed", "0"]
TURKISH = "Türkiye'nin başkenti neresidir? Çok güzel bir şiir yaz."
# one run, with two checkpoints and a final adapter: the LoRA adapter of the merge cases and the
# checkpoints of the resume cases
RUN_ARGS = ["--model", "tiny-tr", "--max-steps", "2", "--batch-size", "2", "--max-length", "32", "--lr", "1e-3",
            "--save-every", "1", "--keep-last", "3", "--lora-r", "4", "--lora-alpha", "8", "--objective", "mdlm",
            "--log-every", "1", "--seed", "3"]
TRAIN_SMALL = ["--model", "tiny-tr", "--max-steps", "1", "--batch-size", "2", "--max-length", "32", "--lora-r", "4",
               "--lora-alpha", "8", "--log-every", "1"]


def log(msg: str) -> None:
    print(f"[cli-probe] {msg}", file=sys.stderr, flush=True)


class Skip(Exception):
    """A case that cannot be tried here (no root for mknod, no lm_eval): left out of the counts."""


# ------------------------------------------------------------------------------------------ snapshots
def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def snap(path: str):
    """What a path is: its type and, by type, its inode, mode, bytes, device number, link target or
    entries (folders recursively). Compared before and after a case."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return ("missing",)
    m = st.st_mode
    if stat.S_ISLNK(m):
        return ("link", os.readlink(path))
    if stat.S_ISREG(m):
        return ("file", st.st_ino, stat.S_IMODE(m), st.st_size, sha256(path))
    if stat.S_ISDIR(m):
        return ("dir", st.st_ino, {n: snap(os.path.join(path, n)) for n in sorted(os.listdir(path))})
    if stat.S_ISCHR(m) or stat.S_ISBLK(m):
        return ("device", st.st_ino, stat.S_ISCHR(m), st.st_rdev)
    if stat.S_ISFIFO(m):
        return ("fifo", st.st_ino)
    return ("other", st.st_ino, stat.S_IFMT(m))


def describe_change(path: str, a, b) -> str | None:
    """The first difference between two snapshots of `path`, in words; None when equal."""
    if a == b:
        return None
    if a[0] != b[0]:
        return f"{path}: was a {a[0]}, now {'missing' if b[0] == 'missing' else 'a ' + b[0]}"
    kind = a[0]
    if kind == "dir":  # what was there and changed or went first, then what was added
        for name in sorted(a[2]):
            why = describe_change(os.path.join(path, name), a[2][name], b[2].get(name, ("missing",)))
            if why:
                return why
        added = sorted(set(b[2]) - set(a[2]))
        if added:
            return f"{path}: {len(added)} entr{'y' if len(added) == 1 else 'ies'} added ({', '.join(added[:3])})"
        return f"{path}: the folder was replaced (inode changed)"
    if kind == "file":
        if a[4] != b[4]:
            return f"{path}: bytes changed ({a[3]} -> {b[3]} bytes)"
        if a[1] != b[1]:
            return f"{path}: renamed over (inode changed)"
        return f"{path}: mode changed ({oct(a[2])} -> {oct(b[2])})"
    if kind == "link":
        return f"{path}: link now leads to {b[1]!r} (was {a[1]!r})"
    return f"{path}: {kind} replaced (inode or device changed)"


# ------------------------------------------------------------------------------------------ running
class Spec:
    """How to run one case. args: the CLI's arguments (after `diffutron_engine.cli.main`); code: a Python
    program instead (the API cases). precious: paths that must come out unchanged. check(res, d) ->
    (ok, why) for what the generic rules cannot see. fifo: a FIFO the probe reads while the case runs.
    pre: CLI argument lists run first (setup that needs the checkout). log_ok: progress lines on stderr
    are fine on success (training)."""

    def __init__(self, args=None, code=None, cwd=None, stdin=b"", env=None, precious=(), check=None, timeout=150,
                 mem_gib=8, fifo=None, pre=()):
        self.args, self.code, self.cwd, self.stdin, self.env = args, code, cwd, stdin, env or {}
        self.precious, self.check, self.timeout, self.mem_gib = list(precious), check, timeout, mem_gib
        self.fifo, self.pre = fifo, list(pre)


class Result:
    def __init__(self, rc=None, out=b"", err=b"", seconds=0.0, timed_out=False, fifo_data=b"", peak_mb=None):
        self.rc, self.out, self.err, self.seconds, self.timed_out = rc, out, err, seconds, timed_out
        self.fifo_data, self.peak_mb = fifo_data, peak_mb

    @property
    def err_text(self) -> str:
        return self.err.decode("utf-8", "replace")

    @property
    def out_text(self) -> str:
        return self.out.decode("utf-8", "replace")


# The case runs as the child of this small launcher: the child under the address-space limit, the
# launcher waiting for it with wait4 to write down its peak RSS, then exiting with its code (a signal
# as 128 + its number, as a shell reports it). The probe kills both (one process group) at a timeout.
LIMITED = r"""
import os, resource, sys
limit, rss_file, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
pid = os.fork()
if pid == 0:
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        os.execv(argv[0], argv)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(rss_file, "w") as f:
    f.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


class Ctx:
    def __init__(self, repo: str, python: str, root: str):
        self.repo, self.python, self.root = repo, python, root
        self.fx = os.path.join(root, "fixtures")
        os.makedirs(self.fx)
        self.tiny = os.path.join(repo, "diffutron_engine", "models", "tiny-tr")
        self.data = os.path.join(self.fx, "data.txt")
        self.run_dir = os.path.join(self.fx, "run")
        self.adapter = os.path.join(self.run_dir, "final")
        self.errors: dict[str, str] = {}  # fixture -> why it could not be made
        self.lm_eval = False

    def env(self, extra=None) -> dict:
        drop = ("PYTHONPATH", "PYTHONIOENCODING", "DIFFUTRON_BACKEND", "TRITON_INTERPRET", "PYTHONHOME",
                "PYTHONSTARTUP")
        env = {k: v for k, v in os.environ.items() if k not in drop}
        env.update(PYTHONPATH=self.repo, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
                   MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONDONTWRITEBYTECODE="1")
        env.update(extra or {})
        return env

    def command(self, spec: Spec, rss_file: str) -> list[str]:
        if spec.code is not None:
            inner = [self.python, "-c", spec.code]
        else:
            inner = [self.python, "-m", "diffutron_engine.cli.main", *spec.args]
        return [sys.executable, "-c", LIMITED, str(int(spec.mem_gib * GIB)), rss_file, *inner]

    def execute(self, spec: Spec, cwd: str) -> Result:
        rfd, got, halt, reader = None, bytearray(), threading.Event(), None
        if spec.fifo:  # a reader is there before the case starts, so that opening it to write never blocks
            rfd = os.open(spec.fifo, os.O_RDONLY | os.O_NONBLOCK)

            def drain():
                while True:
                    ready, _, _ = select.select([rfd], [], [], 0.2)
                    if ready:
                        try:
                            chunk = os.read(rfd, 65536)
                        except BlockingIOError:
                            chunk = None
                        if chunk:
                            got.extend(chunk)
                            continue
                    if halt.is_set():
                        return
                    if ready:  # EOF (no writer right now): do not spin
                        time.sleep(0.05)

            reader = threading.Thread(target=drain, daemon=True)
            reader.start()
        fd, rss_file = tempfile.mkstemp(prefix=".rss-", dir=self.root)
        os.close(fd)
        t0 = time.monotonic()
        proc = subprocess.Popen(self.command(spec, rss_file), cwd=cwd, env=self.env(spec.env), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = proc.communicate(spec.stdin, timeout=spec.timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            out, err = proc.communicate()
            timed_out = True
        seconds = time.monotonic() - t0
        if reader is not None:
            halt.set()
            reader.join(5)
            os.close(rfd)
        try:
            with open(rss_file) as f:
                peak_mb = round(int(f.read()) / 1024, 1)  # ru_maxrss is in KiB on Linux
        except (OSError, ValueError):
            peak_mb = None
        os.unlink(rss_file)
        return Result(proc.returncode, out, err, seconds, timed_out, bytes(got), peak_mb)


def judge(expected: tuple, spec: Spec, res: Result, changes: list[str], d: str) -> list[str]:
    """Why a case did not hold (empty: it held)."""
    why = []
    if res.timed_out:
        why.append(f"still running after {spec.timeout} s (killed)")
    elif res.rc not in expected:
        why.append(f"exit {res.rc}")
    text = res.err_text + res.out_text
    if "Traceback" in text:
        last = [line for line in res.err_text.splitlines() if line.strip()][-1:] or ["?"]
        why.append(f"traceback ({last[0].strip()[:100]})")
    lines = [line for line in res.err_text.splitlines() if line.strip()]
    errors = [line for line in lines if ERROR_LINE.match(line)]
    if not res.timed_out and res.rc not in (0, None) and spec.code is None:
        others = [line for line in lines if not (ERROR_LINE.match(line) or line.startswith(WARN))]
        if len(errors) != 1:
            why.append(f"{len(errors)} error lines")
        if others and "Traceback" not in text:
            why.append(f"{len(others)} other stderr line(s): {others[0].strip()[:60]!r}")
    elif res.rc == 0 and errors:
        why.append(f"an error line on success: {errors[0][:60]!r}")
    why += changes
    if spec.check is not None and not res.timed_out:
        try:
            ok, note = spec.check(res, d)
        except Exception as exc:  # a check that cannot even look is a failed check, with the reason
            ok, note = False, f"check failed: {type(exc).__name__}: {exc}"
        if not ok:
            why.append(note)
    return why


def run_case(ctx: Ctx, case: dict) -> dict:
    row = {"id": case["id"], "category": case["cat"], "expected": "/".join(map(str, case["expect"]))}
    missing = [n for n in case.get("needs", ()) if n in ctx.errors]
    if missing:
        return {**row, "held": False, "why": f"fixture {missing[0]} could not be made: {ctx.errors[missing[0]]}",
                "rc": None, "seconds": 0.0, "stderr": ""}
    d = tempfile.mkdtemp(prefix=case["id"].replace("/", "-") + "-", dir=ctx.root)
    cwd = os.path.join(d, "cwd")  # the current folder: a file of its own that no case may touch
    os.makedirs(cwd)
    with open(os.path.join(cwd, "notes.txt"), "w") as f:
        f.write("the user's own file in the current folder\n")
    try:
        spec = case["build"](ctx, d)
    except Skip as exc:
        return {**row, "skipped": str(exc)}
    spec.cwd = spec.cwd or cwd
    for pre in spec.pre:
        r = ctx.execute(Spec(args=pre, timeout=150), spec.cwd)
        if r.rc != 0:
            return {**row, "held": False, "why": f"setup command failed (exit {r.rc}): "
                    f"{r.err_text.strip().splitlines()[-1:] or ''}", "rc": None, "seconds": 0.0, "stderr": ""}
    precious = list(dict.fromkeys([*spec.precious, cwd]))
    before = {p: snap(p) for p in precious}
    res = ctx.execute(spec, spec.cwd)
    changes = [c for p in precious if (c := describe_change(p, before[p], snap(p)))]
    why = "; ".join(judge(case["expect"], spec, res, changes, d)).replace(d + os.sep, "").replace(d, "CASE")
    return {**row, "held": not why, "why": why, "rc": res.rc if not res.timed_out else "timeout",
            "seconds": round(res.seconds, 2), "peak_rss_mb": res.peak_mb, "stderr": res.err_text.strip()[:400]}


# ------------------------------------------------------------------------------------------ fixtures
FIXTURE_CODE = r'''
import json, os, shutil, sys
import torch
from safetensors.torch import load_file, save_file
fx, repo, run = sys.argv[1], sys.argv[2], sys.argv[3]
tiny = os.path.join(repo, "diffutron_engine", "models", "tiny-tr")
import transformers
transformers.utils.logging.disable_progress_bar()
transformers.logging.set_verbosity_error()
done = {}

def step(name, fn):
    try:
        fn()
        done[name] = "ok"
    except Exception as exc:
        done[name] = f"{type(exc).__name__}: {str(exc)[:200]}"

def other_vocab():  # a base model of another vocabulary (1000 ids)
    from diffutron_engine.models.random_weights import build_random_checkpoint
    build_random_checkpoint(os.path.join(fx, "other-vocab"), size="tiny", seed=0)

def no_final_norm():  # tiny-tr without model.final_norm.weight
    d = os.path.join(fx, "no-final-norm")
    shutil.copytree(tiny, d)
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.final_norm.weight"]
    save_file(tensors, path, metadata={"format": "pt"})

def mask_past_vocab():  # a tokenizer whose mask token has the first id past the model's vocabulary
    d = os.path.join(fx, "mask-past-vocab")
    shutil.copytree(tiny, d)
    with open(os.path.join(d, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    with open(os.path.join(d, "tokenizer.json")) as f:
        tj = json.load(f)
    new = max(vocab, max(t["id"] for t in tj["added_tokens"]) + 1, max(tj["model"]["vocab"].values()) + 1)
    tj["added_tokens"].append({"id": new, "content": "<probe-mask>", "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": True})
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tj, f)
    with open(os.path.join(d, "tokenizer_config.json")) as f:
        tc = json.load(f)
    tc["mask_token"] = "<probe-mask>"
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(tc, f)
    from transformers import AutoTokenizer
    got = AutoTokenizer.from_pretrained(d).mask_token_id
    if got is None or got < vocab:
        raise RuntimeError(f"mask id {got} is not past the vocabulary {vocab}")

def states():  # corrupted trainer states, from the run's real one
    real = torch.load(os.path.join(run, "checkpoint-2", "trainer_state.pt"), map_location="cpu", weights_only=True)
    s = os.path.join(fx, "states")
    os.makedirs(s, exist_ok=True)
    torch.save([1, 2, 3], os.path.join(s, "list.pt"))
    torch.save(torch.arange(6), os.path.join(s, "tensor.pt"))
    torch.save({**real, "step": "abc"}, os.path.join(s, "step-abc.pt"))
    torch.save({**real, "step": -5}, os.path.join(s, "step-negative.pt"))
    torch.save({**real, "optimizer": {"state": {0: "garbage"}, "param_groups": [{"params": "x", "lr": "y"}]}},
               os.path.join(s, "garbage-optimizer.pt"))
    open(os.path.join(s, "empty.pt"), "wb").close()

step("other-vocab", other_vocab)
step("no-final-norm", no_final_norm)
step("mask-past-vocab", mask_past_vocab)
if run:
    step("states", states)
try:
    import importlib.util
    done["lm_eval"] = "ok" if importlib.util.find_spec("lm_eval") else "not installed"
except Exception as exc:
    done["lm_eval"] = f"{type(exc).__name__}"
print("FIXTURES " + json.dumps(done))
'''


def package_origin(ctx: Ctx, cwd: str) -> tuple[str, str]:
    """Where a case's interpreter imports diffutron_engine (and its training subpackage) from."""
    code = ("import diffutron_engine as d, diffutron_engine.training.checkpoints as c; "
            "print(d.__file__); print(c.__file__)")
    r = subprocess.run([ctx.python, "-c", code], cwd=cwd, env=ctx.env(), capture_output=True, text=True, timeout=120)
    lines = r.stdout.split()
    return (lines[0], lines[1]) if r.returncode == 0 and len(lines) == 2 else ("", r.stderr.strip()[-200:])


def inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def build_fixtures(ctx: Ctx, needs: set) -> None:
    text = os.path.join(ctx.repo, "training", "data", "tr", "heldout.txt")
    try:
        with open(text, "rb") as f:
            body = f.read(6000)
        body = body[: body.rfind(b"\n") + 1]
    except OSError:  # any Turkish text does: the runs only need some examples
        body = ("Bu işlev, seçili hücrelerin içeriğini siler ve biçimlendirmeyi korur.\n" * 80).encode()
    with open(ctx.data, "wb") as f:
        f.write(body)
    if "run" in needs:
        t0 = time.monotonic()
        r = ctx.execute(Spec(args=["train", "cpt", "--data", ctx.data, "--output-dir", ctx.run_dir, *RUN_ARGS],
                             timeout=300), ctx.fx)
        ok = r.rc == 0 and all(os.path.isdir(os.path.join(ctx.run_dir, n)) for n in
                                ("checkpoint-1", "checkpoint-2", "final"))
        if not ok:
            tail = (r.err_text.strip().splitlines() or ["no output"])[-1][:200]
            ctx.errors["run"] = f"the 2-step LoRA run failed (exit {r.rc}): {tail}"
            ctx.errors["states"] = ctx.errors["run"]
        log(f"fixture run (2 checkpoints + final adapter): {'ok' if ok else ctx.errors['run']} "
            f"({time.monotonic() - t0:.0f} s)")
    if needs & {"other-vocab", "no-final-norm", "mask-past-vocab", "states", "lm_eval"}:
        t0 = time.monotonic()
        run = ctx.run_dir if "run" in needs and "run" not in ctx.errors else ""
        proc = subprocess.run([ctx.python, "-c", FIXTURE_CODE, ctx.fx, ctx.repo, run], cwd=ctx.fx, env=ctx.env(),
                              capture_output=True, text=True, timeout=300)
        line = [x for x in proc.stdout.splitlines() if x.startswith("FIXTURES ")]
        done = json.loads(line[-1][len("FIXTURES "):]) if line else {}
        for name in ("other-vocab", "no-final-norm", "mask-past-vocab", "states"):
            if done.get(name, "") != "ok" and name not in ctx.errors:
                ctx.errors[name] = done.get(name) or f"fixture script failed: {proc.stderr.strip()[-200:]}"
        ctx.lm_eval = done.get("lm_eval") == "ok"
        log(f"fixtures {done} ({time.monotonic() - t0:.0f} s)")


# ------------------------------------------------------------------------------------------ helpers
def write(path: str, data, mode=None) -> str:
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    if mode is not None:
        os.chmod(path, mode)
    return path


def mknod(path: str, major: int, minor: int) -> str:
    if os.geteuid() != 0:
        raise Skip("making a device node needs root")
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    return path


def prompts_file(d: str, name="in.jsonl") -> str:
    return write(os.path.join(d, name), '{"prompt": "Merhaba"}\n{"prompt": "Bu işlev ne yapar?"}\n')


def check_all(*checks):
    def check(res, d):
        for c in checks:
            ok, why = c(res, d)
            if not ok:
                return ok, why
        return True, ""
    return check


def stderr_has(*needles, what=""):
    def check(res, d):
        err = res.err_text
        missing = [n for n in needles if n not in err]
        return not missing, f"stderr does not name {missing[0]!r}{what}" if missing else ""
    return check


def bounded(mb=1536, seconds=30):
    def check(res, d):
        if res.peak_mb is not None and res.peak_mb > mb:
            return False, f"peak RSS {res.peak_mb:.0f} MB (bound {mb} MB)"
        return res.seconds <= seconds, f"took {res.seconds:.0f} s (bound {seconds} s)"
    return check


def content_replaced(path: str, old: bytes):
    def check(res, d):
        with open(path, "rb") as f:
            new = f.read()
        return (new != old and new.strip() != b"",
                f"{os.path.basename(path)} holds {'the old content' if new == old else repr(new[:40])}")
    return check


# ------------------------------------------------------------------------------------------ cases
def gen(*args) -> list[str]:
    return ["generate", *TINY, *args]


def cases() -> list[dict]:
    out = []

    def add(cat, name, expect, build, needs=()):
        out.append({"cat": cat, "id": f"{cat}/{name}", "expect": tuple(expect), "build": build, "needs": tuple(needs)})

    # ---------------------------------------------------------------- generate: where the answers go
    G = "generate-output"

    def device_null(ctx, d):
        node = mknod(os.path.join(d, "null"), 1, 3)
        return Spec(args=gen("--output", node, "Merhaba"), precious=[node])
    add(G, "char-device-null", (0, 2), device_null)

    def device_full(ctx, d):  # writes fail with ENOSPC: one line, and the node stays a node
        node = mknod(os.path.join(d, "full"), 1, 7)
        return Spec(args=gen("--output", node, "Merhaba"), precious=[node])
    add(G, "char-device-full", (2,), device_full)

    def link_to_device(ctx, d):
        node = mknod(os.path.join(d, "null"), 1, 3)
        link = os.path.join(d, "out")
        os.symlink(node, link)
        return Spec(args=gen("--output", link, "Merhaba"), precious=[node, link])
    add(G, "symlink-to-char-device", (0, 2), link_to_device)

    def fifo(ctx, d):
        path = os.path.join(d, "pipe")
        os.mkfifo(path)

        def went_through(res, d):
            return res.rc != 0 or bool(res.fifo_data.strip()), "exit 0 but nothing came through the FIFO"
        return Spec(args=gen("--output", path, "Merhaba"), precious=[path], fifo=path, check=went_through)
    add(G, "fifo", (0, 2), fifo)

    def read_only(ctx, d):
        path = write(os.path.join(d, "answers.txt"), "earlier answers, kept read-only\n", 0o444)
        return Spec(args=gen("--output", path, "Merhaba"), precious=[path])
    add(G, "read-only-file", (2,), read_only)

    def hard_link(ctx, d):
        old = b"earlier answers\n"
        path = write(os.path.join(d, "answers.txt"), old)
        other = os.path.join(d, "answers-link.txt")
        os.link(path, other)
        ino = os.stat(path).st_ino

        def through(res, d):
            a, b = os.stat(path), os.stat(other)
            if a.st_ino != ino or b.st_ino != ino:
                return False, f"hard link broken: inodes {a.st_ino}/{b.st_ino}, was {ino}"
            with open(other, "rb") as f:
                seen = f.read()
            return seen != old and seen.strip() != b"", "the other name still sees the old content"
        return Spec(args=gen("--output", path, "Merhaba"), check=through)
    add(G, "hard-link", (0,), hard_link)

    def regular(ctx, d):  # the control: an existing file is replaced by the answers
        path = write(os.path.join(d, "answers.txt"), "earlier answers\n")
        return Spec(args=gen("--output", path, "Merhaba"), check=content_replaced(path, b"earlier answers\n"))
    add(G, "existing-file (control)", (0,), regular)

    def same_as_input(ctx, d):
        path = prompts_file(d)
        return Spec(args=gen("--input", path, "--output", path), precious=[path])
    add(G, "output-is-input", (2,), same_as_input)

    def same_as_input_spelled(ctx, d):
        path = prompts_file(d)
        return Spec(args=gen("--input", path, "--output", os.path.join(d, ".", "..", os.path.basename(d), "in.jsonl")),
                    precious=[path])
    add(G, "output-is-input-other-spelling", (2,), same_as_input_spelled)

    def link_to_input(ctx, d):
        path = prompts_file(d)
        link = os.path.join(d, "out.jsonl")
        os.symlink(path, link)
        return Spec(args=gen("--input", path, "--output", link), precious=[path, link])
    add(G, "output-symlink-to-input", (2,), link_to_input)

    def hardlink_of_input(ctx, d):
        path = prompts_file(d)
        other = os.path.join(d, "out.jsonl")
        os.link(path, other)
        return Spec(args=gen("--input", path, "--output", other), precious=[path])
    add(G, "output-hardlink-of-input", (2,), hardlink_of_input)

    def folder(ctx, d):
        path = os.path.join(d, "answers")
        os.makedirs(path)
        write(os.path.join(path, "keep.txt"), "mine\n")
        return Spec(args=gen("--output", path, "Merhaba"), precious=[path])
    add(G, "folder", (2,), folder)

    add(G, "empty-name", (2,), lambda ctx, d: Spec(args=gen("--output", "", "Merhaba")))

    def link_loop(ctx, d):
        a, b = os.path.join(d, "a"), os.path.join(d, "b")
        os.symlink(b, a)
        os.symlink(a, b)
        return Spec(args=gen("--output", a, "Merhaba"), precious=[a, b])
    add(G, "symlink-loop", (2,), link_loop)

    # ---------------------------------------------------------------- generate: what comes in
    I = "generate-input"
    add(I, "batch-size-1e12", (0, 2), lambda ctx, d: Spec(args=gen("--batch-size", "1000000000000", "Merhaba")))
    add(I, "batch-size-0", (2,), lambda ctx, d: Spec(args=gen("--batch-size", "0", "Merhaba")))
    add(I, "steps-1e30", (2,), lambda ctx, d: Spec(args=["generate", "--model", "tiny-tr", "--steps", "1" + "0" * 30,
                                                          "Merhaba"]))
    add(I, "temperature-nan", (2,), lambda ctx, d: Spec(args=gen("--temperature", "nan", "Merhaba")))

    def jsonl(body, name="in.jsonl"):
        def build(ctx, d):
            path = write(os.path.join(d, name), body)
            return Spec(args=gen("--input", path), precious=[path])
        return build
    add(I, "jsonl-int-5000-digits", (2,), jsonl('{"prompt": ' + "7" * 5000 + "}\n"))
    add(I, "jsonl-float-1e999", (2,), jsonl('{"prompt": 1e999}\n'))
    add(I, "jsonl-nested-100k", (2,), jsonl("[" * 100_000 + "]" * 100_000 + "\n"))
    add(I, "jsonl-nested-100k-in-prompt", (2,), jsonl('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n"))
    add(I, "jsonl-lone-surrogate", (2,), jsonl('{"prompt": "\\ud800 Merhaba"}\n'))
    add(I, "jsonl-invalid-utf8", (2,), jsonl(b'{"prompt": "Merhaba"}\n{"prompt": "\xfd\xfe\xff"}\n'))
    add(I, "jsonl-bom", (0, 2), jsonl('\ufeff{"prompt": "Merhaba"}\n'))
    add(I, "jsonl-empty-file", (2,), jsonl(b""))

    def input_folder(ctx, d):
        path = os.path.join(d, "prompts")
        os.makedirs(path)
        return Spec(args=gen("--input", path), precious=[path])
    add(I, "input-is-folder", (2,), input_folder)
    # /dev/zero: one endless line; must fail in bounded time and memory, by itself (the 4 GiB address-space
    # limit only keeps the machine safe: a command stopped by it did not bound its memory)
    add(I, "input-dev-zero", (2,), lambda ctx, d: Spec(args=gen("--input", "/dev/zero"), timeout=60, mem_gib=4,
                                                        check=bounded()))
    add(I, "stdin-invalid-utf8", (2,), lambda ctx, d: Spec(args=gen(), stdin=b"Merhaba \xfd\xfe\n"))

    def ascii_io(ctx, d):
        def readable(res, d):
            if res.rc != 0:
                return True, ""
            try:
                lines = [json.loads(x) for x in res.out.decode("utf-8").splitlines() if x.strip()]
            except (UnicodeDecodeError, ValueError) as exc:
                return False, f"stdout is not UTF-8 JSON lines: {exc}"
            return (len(lines) == 1 and lines[0].get("prompt") == TURKISH,
                    f"the prompt came back as {lines[0].get('prompt') if lines else None!r}")
        return Spec(args=gen("--json", TURKISH), env={"PYTHONIOENCODING": "ascii"}, check=readable)
    add(I, "pythonioencoding-ascii", (0, 2), ascii_io)

    # ---------------------------------------------------------------- train merge: where the model goes
    M = "train-merge"

    def adapter_copy(ctx, d) -> str:
        a = os.path.join(d, "adapter")
        shutil.copytree(ctx.adapter, a)
        return a

    def merge(*extra):
        return ["train", "merge", *extra]

    def out_dot(ctx, d):
        a = adapter_copy(ctx, d)
        work = os.path.join(d, "work")
        os.makedirs(os.path.join(work, "sub"))
        for n in ("thesis.tex", "data.csv", os.path.join("sub", "notes.md")):
            write(os.path.join(work, n), f"the user's {n}\n")
        return Spec(args=merge("--adapter", a, "--out", "."), cwd=work, precious=[work, a])
    add(M, "out-current-folder", (2,), out_dot, needs=("run",))

    def out_empty(ctx, d):
        a = adapter_copy(ctx, d)
        work = os.path.join(d, "work")
        os.makedirs(work)
        write(os.path.join(work, "thesis.tex"), "the user's thesis\n")
        return Spec(args=merge("--adapter", a, "--out", ""), cwd=work, precious=[work, a])
    add(M, "out-empty-name", (2,), out_empty, needs=("run",))

    def out_file(ctx, d):
        a = adapter_copy(ctx, d)
        f = write(os.path.join(d, "existing_file.txt"), "the user's file\n")

        def no_trash(res, d):
            trash = [n for n in os.listdir(d) if n.startswith((".trash-", ".tmp-"))]
            return not trash, f"left {trash}"
        return Spec(args=merge("--adapter", a, "--out", f), precious=[f, a], check=no_trash)
    add(M, "out-existing-file", (2,), out_file, needs=("run",))

    def photos(d):
        """A folder of the user's own, unrelated to the run."""
        o = os.path.join(d, "photos")
        os.makedirs(o)
        write(os.path.join(o, "holiday.jpg"), os.urandom(2048))
        return o

    def out_unrelated(ctx, d):
        a = adapter_copy(ctx, d)
        o = photos(d)
        return Spec(args=merge("--adapter", a, "--out", o), precious=[o, a])
    add(M, "out-unrelated-folder", (2,), out_unrelated, needs=("run",))

    def out_adapter(ctx, d):
        a = adapter_copy(ctx, d)
        return Spec(args=merge("--adapter", a, "--out", a), precious=[a])
    add(M, "out-is-adapter", (2,), out_adapter, needs=("run",))

    def out_holds_adapter(ctx, d):
        parent = os.path.join(d, "run")
        os.makedirs(parent)
        a = os.path.join(parent, "final")
        shutil.copytree(ctx.adapter, a)
        write(os.path.join(parent, "metrics.jsonl"), '{"step": 1}\n')
        return Spec(args=merge("--adapter", a, "--out", parent), precious=[parent])
    add(M, "out-holds-adapter", (2,), out_holds_adapter, needs=("run",))

    def out_link_folder(ctx, d):
        a = adapter_copy(ctx, d)
        o = photos(d)
        link = os.path.join(d, "merged")
        os.symlink(o, link)
        return Spec(args=merge("--adapter", a, "--out", link), precious=[o, link, a])
    add(M, "out-symlink-to-folder", (2,), out_link_folder, needs=("run",))

    def loads(o):
        def check(res, d):
            names = set(os.listdir(o)) if os.path.isdir(o) else set()
            need = {"config.json", "model.safetensors"}
            return need <= names, f"--out holds {sorted(names)[:6]}, not {sorted(need)}"
        return check

    def base_tiny(ctx, d):
        a = adapter_copy(ctx, d)
        o = os.path.join(d, "merged")
        return Spec(args=merge("--adapter", a, "--out", o, "--base", "tiny-tr"), precious=[a], check=loads(o))
    add(M, "base-tiny-tr", (0,), base_tiny, needs=("run",))

    def again(ctx, d):  # the control: an earlier merge's output is replaced by the next
        a = adapter_copy(ctx, d)
        o = os.path.join(d, "merged")
        return Spec(args=merge("--adapter", a, "--out", o), pre=[merge("--adapter", a, "--out", o)], precious=[a],
                    check=loads(o))
    add(M, "out-earlier-merge (control)", (0,), again, needs=("run",))

    def base_other(ctx, d):
        a = adapter_copy(ctx, d)
        o = os.path.join(d, "merged")

        def nothing(res, d):
            return not os.path.exists(o), "--out was written"
        return Spec(args=merge("--adapter", a, "--out", o, "--base", os.path.join(ctx.fx, "other-vocab")),
                    precious=[a], check=nothing)
    add(M, "base-other-vocabulary", (2,), base_other, needs=("run", "other-vocab"))


    def adapter_file(ctx, d):
        f = write(os.path.join(d, "adapter.bin"), os.urandom(512))
        return Spec(args=merge("--adapter", f, "--out", os.path.join(d, "m")), precious=[f])
    add(M, "adapter-is-file", (2,), adapter_file)

    # ---------------------------------------------------------------- train / eval: settings and data
    T = "train-config"

    def cpt(d, *extra, data=None):
        return ["train", "cpt", "--data", data or os.path.join(d, "data.txt"), "--output-dir", os.path.join(d, "out"),
                *TRAIN_SMALL, *extra]

    def with_data(build):
        def wrapped(ctx, d):
            shutil.copy(ctx.data, os.path.join(d, "data.txt"))
            return build(ctx, d)
        return wrapped

    def config(body):
        def build(ctx, d):
            path = os.path.join(d, "config.yaml")
            if body is None:
                os.makedirs(path)
            else:
                write(path, body)
            return Spec(args=cpt(d, "--config", path), precious=[path])
        return with_data(build)
    add(T, "config-binary", (2,), config(bytes(range(256)) * 4))
    add(T, "config-latin1", (2,), config("lr: 1e-3  # \xe7\xfc\xf0\n".encode("latin-1")))
    add(T, "config-folder", (2,), config(None))
    add(T, "config-nested-50k", (2,), config("[" * 50_000 + "]" * 50_000 + "\n"))
    add(T, "config-a-list", (2,), config("- lr\n- 1e-3\n"))
    add(T, "config-unknown-key", (2,), config("learning_rate: 1e-3\n"))

    def data(body, name, task="cpt"):
        def build(ctx, d):
            path = write(os.path.join(d, name), body)
            args = cpt(d, data=path) if task == "cpt" else ["train", "sft", "--data", path, "--output-dir",
                                                             os.path.join(d, "out"), *TRAIN_SMALL]
            return Spec(args=args, precious=[path])
        return build
    add(T, "data-parquet-random-bytes", (2,), data(os.urandom(4096), "rows.parquet"))
    add(T, "data-sft-instruction-int", (2,), data('{"instruction": 5}\n' * 8, "sft.jsonl", task="sft"))
    add(T, "data-invalid-utf8", (2,), data(b"Merhaba d\xfcnya\n" * 40, "latin.txt"))
    add(T, "data-empty", (2,), data(b"", "empty.txt"))
    add(T, "data-dev-zero", (2,), lambda ctx, d: Spec(args=cpt(d, data="/dev/zero"), timeout=60, mem_gib=4,
                                                       check=bounded()))
    add(T, "set-max-steps-1e20", (2,), with_data(lambda ctx, d: Spec(args=cpt(d, "--set", "max_steps=1e20"),
                                                                      timeout=25)))
    add(T, "set-lr-nan", (2,), with_data(lambda ctx, d: Spec(args=cpt(d, "--set", "lr=nan"))))

    def output_dir_file(ctx, d):
        shutil.copy(ctx.data, os.path.join(d, "data.txt"))
        f = write(os.path.join(d, "existing_file.txt"), "the user's file\n")
        args = cpt(d)
        args[args.index("--output-dir") + 1] = f
        return Spec(args=args, precious=[f])
    add(T, "output-dir-is-file", (2,), output_dir_file)

    def perplexity_bad(ctx, d):
        path = write(os.path.join(d, "held.txt"), b"\xfd\xfe\xff binary\n" * 10)
        return Spec(args=["eval", "perplexity", "--model", "tiny-tr", "--data", path], precious=[path])
    add(T, "eval-perplexity-invalid-utf8", (2,), perplexity_bad)

    def lm_eval_task(ctx, d):
        if not ctx.lm_eval:
            raise Skip("lm_eval is not installed in this interpreter")
        return Spec(args=["eval", "lm-eval", "--model", "diffutron", "--model_args", "pretrained=tiny-tr",
                          "--tasks", "nosuchtask", "--output_path", os.path.join(d, "res")],
                    timeout=150)
    add(T, "lm-eval-nosuchtask", (2,), lm_eval_task, needs=("lm_eval",))

    # ---------------------------------------------------------------- checkpoints: a corrupted newest one
    K = "checkpoints"
    corruptions = [("pickled-list", "list.pt"), ("tensor", "tensor.pt"), ("step-abc", "step-abc.pt"),
                   ("step-negative", "step-negative.pt"), ("garbage-optimizer", "garbage-optimizer.pt"),
                   ("empty-state", "empty.pt"), ("manifest-outside", None)]
    for name, state in corruptions:
        for mode in ("latest", "folder"):
            add(K, f"{name}/{mode}", (0,) if mode == "latest" else (2,), corrupted(name, state, mode),
                needs=("run", "states"))

    # ---------------------------------------------------------------- the Python API
    A = "api"
    add(A, "from-pretrained-tiny-tr", (0,), api(
        'e = E()\nr = e.generate(["Merhaba"], P)\n'
        'done(len(r) == 1 and r[0].finished and isinstance(r[0].text, str), f"{len(r)} output(s): {r[0].text!r}")'))
    add(A, "max-batch-0", (0,), api('refused(lambda: Engine.from_pretrained("tiny-tr", max_batch=0), "an engine")'))
    add(A, "cache-bogus", (0,), api('refused(lambda: Engine.from_pretrained("tiny-tr", cache="bogus"), "an engine")'))
    add(A, "request-id-int-then-abort", (0,), api(
        'e = E()\nlong = SamplingParams(max_new_tokens=64, steps=64, block_size=16, seed=0, early_stop=False)\n'
        'try:\n    rid = e.add_request("Merhaba", long, request_id=5)\n'
        'except DiffutronError as exc:\n    done(True, f"refused: {exc}")\n'
        'e.abort(5)\nouts = drive(e)\n'
        'fin = [o for o in outs if o.finished and o.request_id == rid]\n'
        'done(bool(fin) and fin[-1].finish_reason == "abort", f"id {rid!r} accepted; abort(5) -> finish_reason "\n'
        '     f"{fin[-1].finish_reason if fin else None!r} after {fin[-1].forward_passes if fin else 0} passes")'))
    add(A, "request-before-generate", (0,), api(
        'e = E()\npre = e.add_request("Merhaba", P)\nres = e.generate(["Nasılsın?"], P)\n'
        'mine = [o for o in res if o.request_id != pre]\n'
        'if len(mine) != 1 or not mine[0].finished:\n    done(False, f"generate returned {len(res)} outputs")\n'
        'got = [o for o in res if o.request_id == pre and o.finished]\n'
        'got += [o for o in drive(e) if o.request_id == pre and o.finished]\n'
        'ok = bool(got) and got[0].finish_reason not in ("abort", "error")\n'
        'where = "in generate\'s result" if got and got[0] in res else "from later step()s" if got else "nowhere"\n'
        'done(ok, f"the earlier request\'s final output: {where}" + (f" ({got[0].finish_reason})" if got else ""))'))
    add(A, "add-request-empty-list", (0,), api('e = E()\nrefused(lambda: e.add_request([], P), "a request id")'))
    add(A, "add-request-empty-string", (0,), api('e = E()\nrefused(lambda: e.add_request("", P), "a request id")'))
    add(A, "add-request-ids-past-vocab", (0,), api('e = E()\nrefused(lambda: e.add_request([10**12], P), "an id")'))

    def no_norm(ctx, d):
        return Spec(args=gen_model(os.path.join(ctx.fx, "no-final-norm")), check=stderr_has("final_norm"))
    add(A, "cli-missing-tensor", (2,), no_norm, needs=("no-final-norm",))

    def mask_past(ctx, d):
        return Spec(args=gen_model(os.path.join(ctx.fx, "mask-past-vocab")), check=stderr_has("mask"))
    add(A, "cli-mask-id-past-vocab", (2,), mask_past, needs=("mask-past-vocab",))

    def mask_past_api(ctx, d):
        path = os.path.join(ctx.fx, "mask-past-vocab")
        return api(f'refused(lambda: Engine.from_pretrained({path!r}, device="cpu"), "an engine")')(ctx, d)
    add(A, "engine-mask-id-past-vocab", (0,), mask_past_api, needs=("mask-past-vocab",))
    return out


def gen_model(model: str) -> list[str]:
    args = gen("Merhaba")
    args[args.index("--model") + 1] = model
    return args


API_PRELUDE = r'''
import json, sys, warnings
warnings.simplefilter("ignore")
from diffutron_engine import DiffutronError, Engine, SamplingParams
P = SamplingParams(max_new_tokens=4, steps=4, block_size=4, seed=0)

def done(held, detail):
    verdict = {"held": bool(held), "detail": str(detail)[:300]}
    print("PROBE-RESULT " + json.dumps(verdict, ensure_ascii=False), flush=True)
    sys.exit(0)

def refused(fn, what):
    try:
        r = fn()
    except DiffutronError as exc:
        done(True, f"DiffutronError: {exc}")
    except Exception as exc:
        done(False, f"{type(exc).__name__}, not a DiffutronError: {str(exc)[:150]}")
    done(False, f"accepted, returned {what}: {str(r)[:80]}")

def drive(e, limit=400):
    outs = []
    for _ in range(limit):
        outs += e.step()
        if not e.has_unfinished():
            break
    return outs

def E():
    return Engine.from_pretrained("tiny-tr", device="cpu")
'''


def api(body: str):
    def build(ctx, d):
        def verdict(res, d):
            lines = [x for x in res.out_text.splitlines() if x.startswith("PROBE-RESULT ")]
            if not lines:
                tail = (res.err_text.strip().splitlines() or ["no output"])[-1]
                return False, f"no verdict (the script died: {tail[:120]})"
            v = json.loads(lines[-1][len("PROBE-RESULT "):])
            return v["held"], v["detail"]
        return Spec(code=API_PRELUDE + "\n" + body + "\n", check=verdict)
    return build


def regen_manifest(folder: str, extra: dict | None = None) -> None:
    """Rewrite the manifest so that it verifies (training/checkpoints.py write_manifest's format: each
    other file's size and SHA-256), keeping its step; `extra` entries are added as given."""
    path = os.path.join(folder, "manifest.json")
    with open(path) as f:
        old = json.load(f)
    files = {}
    for name in sorted(os.listdir(folder)):
        p = os.path.join(folder, name)
        if name != "manifest.json" and os.path.isfile(p):
            files[name] = {"size": os.path.getsize(p), "sha256": sha256(p)}
    files.update(extra or {})
    with open(path, "w") as f:
        json.dump({"format": old.get("format", 1), "step": old.get("step"), "files": files}, f, indent=1)


def corrupted(name: str, state: str | None, mode: str):
    """A copy of the fixture run whose newest checkpoint (2) holds a bad trainer state (or a manifest
    naming a file outside the folder), its manifest regenerated so that it verifies; then `--resume
    latest` (held: a warning naming checkpoint-2, the run resumed from checkpoint-1, exit 0) or `--resume
    <checkpoint-2>` (held: exit 2, one line, the folder left as it was)."""
    def build(ctx, d):
        run = os.path.join(d, "run")
        shutil.copytree(ctx.run_dir, run, symlinks=True)
        bad = os.path.join(run, "checkpoint-2")
        if state is not None:
            shutil.copy(os.path.join(ctx.fx, "states", state), os.path.join(bad, "trainer_state.pt"))
            regen_manifest(bad)
        else:
            outside = write(os.path.join(run, "outside"), "a file beside the checkpoint, not in it\n")
            regen_manifest(bad, {"../outside": {"size": os.path.getsize(outside), "sha256": sha256(outside)}})
        args = ["train", "cpt", "--output-dir", run, "--resume", "latest" if mode == "latest" else bad]
        if mode == "folder":
            return Spec(args=args, precious=[bad, os.path.join(run, "checkpoint-1")])

        def fell_back(res, d):
            lines = res.err_text.splitlines()
            warned = [x for x in lines if "checkpoint-2" in x and "warning" in x.lower()]
            resumed = [x for x in lines if "resumed from" in x]
            if not warned:
                return False, "no warning naming checkpoint-2"
            if not resumed or "checkpoint-1" not in resumed[-1]:
                return False, f"did not resume from checkpoint-1 ({(resumed or ['no resumed line'])[-1][-60:]!r})"
            return True, ""
        return Spec(args=args, precious=[os.path.join(run, "checkpoint-1", "adapter_model.safetensors")],
                    check=fell_back)
    return build


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True, help="checkout whose command line and API to probe")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs the cases")
    ap.add_argument("--only", help="categories (comma-separated; a prefix such as 'generate' or 'train' selects "
                    "every category it starts)")
    ap.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folders (their path is printed)")
    ap.add_argument("--save", help="write the summary and every case's result as JSON here")
    args = ap.parse_args(argv)
    repo = os.path.abspath(args.repo)
    t0 = time.monotonic()

    all_cases = cases()
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        chosen = [c for c in all_cases if any(c["cat"] == w or c["cat"].startswith(w) for w in wanted)]
        if not chosen:
            cats = sorted({c["cat"] for c in all_cases})
            print(f"cli_probe: --only {args.only!r} matches no category; choose from {', '.join(cats)}",
                  file=sys.stderr)
            return 2
    else:
        chosen = all_cases

    root = tempfile.mkdtemp(prefix="cli-probe-")
    ctx = Ctx(repo, args.python, root)
    try:
        for where in (repo, root):  # the editable install must not answer for another checkout
            pkg, sub = package_origin(ctx, where)
            if not pkg or not inside(pkg, repo) or not inside(sub, repo):
                print(f"cli_probe: error: with PYTHONPATH={repo} and cwd {where}, {args.python} imports "
                      f"diffutron_engine from {pkg or 'nowhere'} ({sub}), not from inside {repo}", file=sys.stderr)
                return 1
        needs = {n for c in chosen for n in c["needs"]}
        log(f"{len(chosen)} cases against {repo}; fixtures: {', '.join(sorted(needs)) or 'none'} (in {root})")
        build_fixtures(ctx, needs)

        results: dict[str, dict] = {}
        # the long ones first, so that two workers finish together
        heavy = {"checkpoints": 0, "train-merge": 1, "api": 2}
        order = sorted(chosen, key=lambda c: heavy.get(c["cat"], 3))

        def one(case):
            try:
                r = run_case(ctx, case)
            except Exception as exc:  # a case the probe could not even set up: a result with its reason
                traceback.print_exc()
                r = {"id": case["id"], "category": case["cat"], "expected": "/".join(map(str, case["expect"])),
                     "held": False, "why": f"probe error: {type(exc).__name__}: {exc}", "rc": None, "seconds": 0.0,
                     "stderr": ""}
            status = "skipped" if "skipped" in r else ("held" if r["held"] else f"NOT HELD: {r['why'][:100]}")
            log(f"{r['id']}: {status} ({r.get('seconds', 0):.1f} s)")
            return r

        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            for r in pool.map(one, order):
                results[r["id"]] = r
    finally:
        if args.keep:
            log(f"kept {root}")
        else:
            # the cases' own folders may hold read-only files and device nodes: remove what can be
            for dirpath, dirnames, _ in os.walk(root):
                for n in dirnames:
                    try:
                        os.chmod(os.path.join(dirpath, n), 0o755)
                    except OSError:
                        pass
            shutil.rmtree(root, ignore_errors=True)
    seconds = time.monotonic() - t0

    ordered = [results[c["id"]] for c in chosen if c["id"] in results]
    tried = [r for r in ordered if "skipped" not in r]
    tally: dict[str, dict] = {}
    for r in tried:
        t = tally.setdefault(r["category"], {"tried": 0, "held": 0})
        t["tried"] += 1
        t["held"] += int(r["held"])
    print("| category | tried | held |\n|---|---|---|")
    for cat, t in tally.items():
        print(f"| {cat} | {t['tried']} | {t['held']} |")
    print(f"| **all** | {len(tried)} | {sum(r['held'] for r in tried)} |\n")
    failures = [r for r in tried if not r["held"]]
    if failures:
        print("Cases that did not hold:\n")
        for r in failures:
            head = " ".join(r["stderr"].split())[:120]
            print(f"- {r['id']}: expected {r['expected']}; got exit {r['rc']}: {head!r} ({r['why']})")
        print()
    skipped = [r for r in ordered if "skipped" in r]
    if skipped:
        print("Skipped: " + "; ".join(f"{r['id']} ({r['skipped']})" for r in skipped) + "\n")
    summary = {"repo": repo, "seconds": round(seconds, 1), "categories": tally,
               "held": sum(r["held"] for r in tried), "tried": len(tried),
               "not_held": [r["id"] for r in failures], "skipped": [r["id"] for r in skipped],
               "fixture_errors": ctx.errors}
    return finish(summary, {"cases": ordered}, args.save, seconds, log)


if __name__ == "__main__":
    sys.exit(main())
