"""Checkpoint folders that are either complete and verified, or not used: manifests, verification,
cleanup of what killed runs leave behind, atomic pruning, and line-atomic metrics.

A checkpoint is written into a temporary folder `.tmp-checkpoint-N-PID`; its last file is
`manifest.json` (each other file's size and SHA-256); then the folder is renamed to `checkpoint-N`.
So a `checkpoint-N` folder with a manifest that verifies is complete and unchanged since it was
written. Old checkpoints are pruned by renaming them to `.trash-checkpoint-N` (atomic) before deleting,
so a kill during pruning never leaves a half-deleted `checkpoint-N`; a checkpoint that is rewritten is
renamed away the same way before its new copy is renamed into place.

A folder is ours (`ours_why_not`) when its manifest reads as one this package writes (format 1, a step,
each file's size and SHA-256) and the folder holds nothing the manifest does not list: a file that merely
is named manifest.json does not make a user's folder ours. Without a manifest, two kinds of folder that
older versions wrote are ours too: a `checkpoint-N` holding its trainer state and only files a save
names, and a `final` holding only files a final model has (older versions wrote final/ without a
manifest).

At the next start (clean): a `.tmp-checkpoint-N-PID` whose manifest verifies while `checkpoint-N` is
missing is a save killed between its two renames, and is renamed into place; other folders named as
this package names its temporary and trash folders (`.tmp-checkpoint-N-PID`, `.tmp-final-PID`,
`.trash-checkpoint-N`, `.trash-final`) and holding no folder are removed. Nothing else in the output
folder is ever deleted: a `checkpoint-N` without a manifest of ours (another trainer's, a user's
save_pretrained export) is neither touched nor counted by pruning, and a save refuses to replace a
`checkpoint-N` or `final` that is not ours (`replaceable`).

A manifest names plain file names inside its folder only: it is a file anyone may write, and
verification must never read, and vouch for, a file elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

from ..errors import DiffutronError
from ..outputs import write_text_file

MANIFEST = "manifest.json"
STATE = "trainer_state.pt"
CONFIG = "train_config.json"  # the run's settings, read by `train --resume` as the base of the new ones
MAX_MANIFEST_BYTES = 2**24  # a manifest, a config or a metrics line is kilobytes: a bound, not a limit
_CKPT = re.compile(r"^checkpoint-(\d+)$")
_TMP = re.compile(r"^\.tmp-(checkpoint-\d+|final)-\d+$")
_TRASH = re.compile(r"^\.trash-(checkpoint-\d+|final)(-\d+)?$")
# what a save of this package writes into final/ (model or adapter, tokenizer), and into a checkpoint
# folder (the same, its trainer state, its settings and its manifest)
_MODEL_FILES = (r"model.*\.safetensors|model\.safetensors\.index\.json|adapter_model\.safetensors|"
                r"adapter_config\.json|config\.json|generation_config\.json|tokenizer.*|special_tokens_map\.json|"
                r"chat_template\.jinja|README\.md")
_FINAL_FILES = re.compile(rf"^({_MODEL_FILES})$")
_OUR_FILES = re.compile(rf"^({_MODEL_FILES}|trainer_state\.pt|train_config\.json|manifest\.json(\.tmp)?)$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str, step: int) -> None:
    """The manifest of every other file in `folder` (written last, fsynced, before the rename)."""
    files = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name != MANIFEST and os.path.isfile(path):
            files[name] = {"size": os.path.getsize(path), "sha256": sha256_file(path)}
    tmp = os.path.join(folder, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"format": 1, "step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, MANIFEST))


def read_manifest(folder: str) -> dict:
    """The manifest of `folder`, checked for shape: {"files": {name: {size, sha256}}, "step": ...}, every
    name a plain file name inside the folder. Raises ValueError (or OSError) saying what is wrong."""
    with open(os.path.join(folder, MANIFEST), "rb") as f:
        raw = f.read(MAX_MANIFEST_BYTES + 1)
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ValueError(f"larger than {MAX_MANIFEST_BYTES // 2**20} MiB")
    try:
        manifest = json.loads(raw)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(m, dict) for m in files.values()):
        raise ValueError("its files are not a mapping of name -> {size, sha256}")
    for name in files:
        # names come from the manifest, a file anyone may write: "../x" or "/etc/x" would make the
        # check read (and vouch for) files outside the checkpoint
        if not _plain_name(name):
            raise ValueError(f"it names {name[:80]!r}, which is not a file name inside the checkpoint")
    return manifest


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in ("/", "\\", "\0")) and \
        name == os.path.basename(name)


def manifest_step(folder: str) -> int | None:
    """The step the manifest of `folder` records, or None (no manifest, or no readable step)."""
    try:
        step = read_manifest(folder).get("step")
    except (OSError, ValueError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def verify(folder: str) -> str | None:
    """None if `folder` is a complete checkpoint whose files match its manifest, else why not."""
    if not os.path.isfile(os.path.join(folder, MANIFEST)):
        return "no manifest.json (the save did not complete, or an older version wrote it)"
    try:
        files = read_manifest(folder)["files"]
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return f"unreadable manifest.json ({str(exc)[:200] or type(exc).__name__})"
    if STATE not in files:
        return f"the manifest lists no {STATE}"
    for name, meta in files.items():
        p = os.path.join(folder, name)
        if os.path.islink(p):  # this package never writes links: one would lead outside the checkpoint
            return f"{name} is a symbolic link"
        if not os.path.isfile(p):
            return f"{name} is missing"
        if os.path.getsize(p) != meta.get("size"):
            return f"{name} has {os.path.getsize(p)} bytes, the manifest says {str(meta.get('size'))[:40]} (truncated?)"
        if sha256_file(p) != meta.get("sha256"):
            return f"{name} does not match its SHA-256 in the manifest (changed or corrupted)"
    return None


def ours_why_not(folder: str) -> str | None:
    """None if the manifest of `folder` is one this package writes and lists everything the folder holds
    (see the module docstring), else why the folder is not ours by its manifest."""
    if os.path.islink(folder) or not os.path.isdir(folder):
        return "it is not a folder"
    try:
        manifest = read_manifest(folder)
    except FileNotFoundError:
        return "no manifest.json says this package wrote it"
    except (OSError, ValueError) as exc:
        return f"its manifest.json is not one this package writes ({str(exc)[:200] or type(exc).__name__})"
    step = manifest.get("step")
    if manifest.get("format") != 1 or not isinstance(step, int) or isinstance(step, bool) or step < 0 or not all(
            isinstance(m.get("size"), int) and isinstance(m.get("sha256"), str) and _SHA256.match(m["sha256"])
            for m in manifest["files"].values()):
        return "its manifest.json is not one this package writes (no format 1, step, sizes and SHA-256s)"
    listed = manifest["files"]
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name != MANIFEST and (name not in listed or (os.path.isdir(path) and not os.path.islink(path))):
            return f"it holds {name[:80]!r}, which its manifest.json does not list"
    return None


def replaceable(folder: str) -> str | None:
    """None if `folder` may be replaced by a new save of the same name (absent, or ours: see
    `ours_why_not` and `older_final`), else why not: what a run replaces must be its own."""
    if not os.path.lexists(folder):
        return None
    if os.path.islink(folder) or not os.path.isdir(folder):
        return "it is not a folder"
    if os.path.lexists(os.path.join(folder, MANIFEST)):
        return ours_why_not(folder)
    if _CKPT.match(os.path.basename(folder)) and os.path.isfile(os.path.join(folder, STATE)) and \
            _only_files(folder, _OUR_FILES):
        return None  # an older version's checkpoint: its trainer state and only files a save names
    if older_final(folder):
        return None
    return "no manifest.json says this package wrote it"


def older_final(folder: str) -> bool:
    """True for a `final` folder without a manifest that holds only files a final model has: written by
    an older version (before final/ had a manifest), or empty."""
    return os.path.basename(folder) == "final" and not os.path.islink(folder) and os.path.isdir(folder) and \
        not os.path.lexists(os.path.join(folder, MANIFEST)) and _only_files(folder, _FINAL_FILES)


def _only_files(folder: str, names: re.Pattern) -> bool:
    """Every entry of `folder` a regular file named as `names` allows."""
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if not names.match(name) or os.path.islink(path) or not os.path.isfile(path):
            return False
    return True


def occupied(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every entry named checkpoint-N in `output_dir`, whatever it is (a file too)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted((int(m.group(1)), os.path.join(output_dir, n)) for n in os.listdir(output_dir)
                  if (m := _CKPT.match(n)))


def step_of(folder: str) -> int:
    return int(_CKPT.match(os.path.basename(folder)).group(1))


def name_step(folder: str) -> int | None:
    """N for a folder named checkpoint-N (a trailing separator allowed), else None."""
    m = _CKPT.match(os.path.basename(os.path.normpath(folder)))
    return int(m.group(1)) if m else None


def checkpoint_folders(output_dir: str) -> list[str]:
    """`checkpoint-N` folders in `output_dir`, oldest first (complete or not, ours or not)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(output_dir) if (m := _CKPT.match(n))
             and os.path.isdir(os.path.join(output_dir, n))]
    return [os.path.join(output_dir, n) for _, n in sorted(found)]


def ours(output_dir: str) -> list[str]:
    """The checkpoints this package wrote with a manifest (completed saves), oldest first."""
    return [c for c in checkpoint_folders(output_dir) if ours_why_not(c) is None]


def earlier_run(output_dir: str) -> list[str]:
    """The checkpoints of ours in `output_dir`, older versions' included (`replaceable`), oldest first."""
    return [c for c in checkpoint_folders(output_dir) if replaceable(c) is None]


def clean(output_dir: str, log=print) -> list[str]:
    """Finish or remove what interrupted saves and prunes left behind (module docstring); returns the
    names acted on. Only folders named as this package names its temporary and trash folders are
    touched: a `checkpoint-N`, whatever it holds, is never deleted here."""
    acted = []
    if not os.path.isdir(output_dir):
        return acted
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        tmp = _TMP.match(name)
        if not (tmp or _TRASH.match(name)) or os.path.islink(path) or not os.path.isdir(path):
            continue
        if tmp and tmp.group(1).startswith("checkpoint-"):
            final = os.path.join(output_dir, tmp.group(1))
            if not os.path.lexists(final) and verify(path) is None:
                os.replace(path, final)
                acted.append(f"{name} -> {tmp.group(1)} (a complete save killed before its rename)")
                continue
        # a save or a prune never makes a subfolder: one there means this is not what we left behind
        if any(os.path.isdir(os.path.join(path, n)) and not os.path.islink(os.path.join(path, n))
               for n in os.listdir(path)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        acted.append(name)
    if acted:
        log(f"cleaned up after interrupted saves in {output_dir}: {'; '.join(acted)}")
    return acted


def remove(folder: str) -> None:
    """Delete a checkpoint folder (checkpoint-N or final, written by this package) atomically: renamed
    away first, then deleted. Anything else is refused: the last guard before a delete."""
    name = os.path.basename(folder)
    why = replaceable(folder)
    if not (_CKPT.match(name) or name == "final") or why:
        raise DiffutronError(f"refusing to delete {folder}: {why or 'not a checkpoint name'}; move it away or "
                             "choose another --output-dir")
    trash = os.path.join(os.path.dirname(folder), ".trash-" + name)
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune(output_dir: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` of our checkpoints (module docstring)."""
    for old in ours(output_dir)[:-keep_last]:
        remove(old)


def saved_config(output_dir: str, resume: str) -> dict | None:
    """The settings a checkpoint was trained with (its train_config.json), for --resume DIR or latest
    (the newest checkpoint that has them); None when there are none (verification comes later)."""
    folders = [resume] if resume != "latest" else list(reversed(checkpoint_folders(output_dir)))
    for folder in folders:
        try:
            with open(os.path.join(folder, CONFIG), "rb") as f:
                config = json.loads(f.read(MAX_MANIFEST_BYTES + 1))
        except (OSError, ValueError, RecursionError):  # unreadable: the run's flags decide, resume checks later
            continue
        if isinstance(config, dict):
            return config
    return None


def append_jsonl(path: str, record: dict) -> None:
    """One JSON line appended with one write() on an O_APPEND descriptor: a kill leaves either the
    whole line or (at worst, on a full disk) a partial last line, which read_jsonl drops."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_jsonl(path: str) -> tuple[list[dict], int]:
    """The complete records of a JSONL file and how many broken lines were dropped."""
    records, dropped = [], 0
    with open(path, "rb") as f:
        while raw := f.readline(MAX_MANIFEST_BYTES + 1):  # bounded: a line is one step's numbers
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("partial line")
                rec = json.loads(raw)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
                records.append(rec)
            except (ValueError, RecursionError):
                dropped += 1
    return records, dropped


def rewrite_jsonl(path: str, records: list[dict]) -> None:
    write_text_file(path, "".join(json.dumps(r) + "\n" for r in records), "the metrics file")
