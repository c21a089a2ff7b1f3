"""Checkpoint folders that are either complete and verified, or not used: manifests, verification,
cleanup of what killed runs leave behind, atomic pruning, and line-atomic metrics.

A checkpoint is written into a temporary folder `.tmp-checkpoint-N-PID`; its last file is
`manifest.json` (each other file's size and SHA-256); then the folder is renamed to `checkpoint-N`.
So a `checkpoint-N` folder with a manifest that verifies is complete and unchanged since it was
written. Old checkpoints are pruned by renaming them to `.trash-checkpoint-N` (atomic) before deleting,
so a kill during pruning never leaves a half-deleted `checkpoint-N`; a checkpoint that is rewritten is
renamed away the same way before its new copy is renamed into place.

At the next start (clean): a `.tmp-checkpoint-N-*` whose manifest verifies while `checkpoint-N` is missing
is a save killed between its two renames, and is renamed into place; other `.tmp-*` and `.trash-*`
folders are removed; so are `checkpoint-N` folders without a manifest that hold only files this package
writes and no trainer state (debris of an interrupted delete by an older version). Folders that are
not ours (another trainer's `checkpoint-N`, with files we never write) are never touched, nor counted
by pruning: only checkpoints with a manifest are ours.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

MANIFEST = "manifest.json"
STATE = "trainer_state.pt"
CONFIG = "train_config.json"  # the run's settings, read by `train --resume` as the base of the new ones
_CKPT = re.compile(r"^checkpoint-(\d+)$")
_TMP = re.compile(r"^\.tmp-(checkpoint-\d+|final)-\d+$")
_TRASH = re.compile(r"^\.trash-(checkpoint-\d+|final)(-\d+)?$")
# what a save of this package writes into a checkpoint folder (model or adapter, tokenizer, state)
_OUR_FILES = re.compile(r"^(model.*\.safetensors|model\.safetensors\.index\.json|adapter_model\.safetensors|"
                        r"adapter_config\.json|config\.json|generation_config\.json|tokenizer.*|special_tokens_map"
                        r"\.json|chat_template\.jinja|README\.md|trainer_state\.pt|train_config\.json|manifest\.json(\.tmp)?)$")


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


def verify(folder: str) -> str | None:
    """None if `folder` is a complete checkpoint whose files match its manifest, else why not."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return "no manifest.json (the save did not complete, or an older version wrote it)"
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(m, dict) for m in files.values()):
            raise TypeError("its files are not a mapping of name -> {size, sha256}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable manifest.json ({exc})"
    if STATE not in files:
        return f"the manifest lists no {STATE}"
    for name, meta in files.items():
        p = os.path.join(folder, name)
        if not os.path.isfile(p):
            return f"{name} is missing"
        if os.path.getsize(p) != meta.get("size"):
            return f"{name} has {os.path.getsize(p)} bytes, the manifest says {meta.get('size')} (truncated?)"
        if sha256_file(p) != meta.get("sha256"):
            return f"{name} does not match its SHA-256 in the manifest (changed or corrupted)"
    return None


def step_of(folder: str) -> int:
    return int(_CKPT.match(os.path.basename(folder)).group(1))


def checkpoint_folders(output_dir: str) -> list[str]:
    """`checkpoint-N` folders in `output_dir`, oldest first (complete or not, ours or not)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(output_dir) if (m := _CKPT.match(n))
             and os.path.isdir(os.path.join(output_dir, n))]
    return [os.path.join(output_dir, n) for _, n in sorted(found)]


def ours(output_dir: str) -> list[str]:
    """The checkpoints this package wrote (a manifest: completed saves), oldest first."""
    return [c for c in checkpoint_folders(output_dir) if os.path.isfile(os.path.join(c, MANIFEST))]


def clean(output_dir: str, log=print) -> list[str]:
    """Finish or remove what interrupted saves and prunes left behind (module docstring); returns the
    names acted on."""
    acted = []
    if not os.path.isdir(output_dir):
        return acted
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if not os.path.isdir(path):
            continue
        tmp = _TMP.match(name)
        if tmp and tmp.group(1).startswith("checkpoint-"):
            final = os.path.join(output_dir, tmp.group(1))
            if not os.path.exists(final) and verify(path) is None:
                os.replace(path, final)
                acted.append(f"{name} -> {tmp.group(1)} (a complete save killed before its rename)")
                continue
        if tmp or _TRASH.match(name):
            shutil.rmtree(path, ignore_errors=True)
            acted.append(name)
        elif _CKPT.match(name) and not os.path.exists(os.path.join(path, MANIFEST)) and \
                not os.path.exists(os.path.join(path, STATE)):
            names = os.listdir(path)
            if all(_OUR_FILES.match(n) for n in names):  # our own half-deleted debris, nothing foreign
                shutil.rmtree(path, ignore_errors=True)
                acted.append(name)
    if acted:
        log(f"cleaned up after interrupted saves in {output_dir}: {'; '.join(acted)}")
    return acted


def remove(folder: str) -> None:
    """Delete a checkpoint folder atomically: renamed away first, then deleted."""
    trash = os.path.join(os.path.dirname(folder), ".trash-" + os.path.basename(folder))
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
            with open(os.path.join(folder, CONFIG)) as f:
                config = json.load(f)
        except (OSError, ValueError):
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
        for raw in f:
            try:
                if not raw.endswith(b"\n"):
                    raise ValueError("partial line")
                rec = json.loads(raw)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
                records.append(rec)
            except ValueError:
                dropped += 1
    return records, dropped


def rewrite_jsonl(path: str, records: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)
