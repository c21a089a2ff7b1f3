"""Checkpoint folders that are either complete and verified, or not used: manifests, verification,
cleanup of what killed runs leave behind, atomic pruning, and line-atomic metrics.

A checkpoint is written into a temporary folder `.tmp-checkpoint-N-PID`; its last file is
`manifest.json` (each other file's size and SHA-256); then the folder is renamed to `checkpoint-N`.
So a `checkpoint-N` folder with a manifest that verifies is complete and unchanged since it was
written. Old checkpoints are pruned by renaming them to `.trash-checkpoint-N` (atomic) before deleting,
so a kill during pruning never leaves a half-deleted `checkpoint-N`. At the next start `.tmp-*` and
`.trash-*` folders are removed, and so are `checkpoint-N` folders that never got a manifest nor a
trainer state (debris of an interrupted delete by an older version).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil

MANIFEST = "manifest.json"
STATE = "trainer_state.pt"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


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


def checkpoint_folders(output_dir: str) -> list[str]:
    """`checkpoint-N` folders in `output_dir`, oldest first (complete or not)."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(output_dir) if (m := _CKPT.match(n))
             and os.path.isdir(os.path.join(output_dir, n))]
    return [os.path.join(output_dir, n) for _, n in sorted(found)]


def clean(output_dir: str, log=print) -> list[str]:
    """Remove what interrupted saves and prunes left behind; returns the removed names."""
    removed = []
    if not os.path.isdir(output_dir):
        return removed
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        debris = name.startswith((".tmp-", ".trash-"))
        if not debris and _CKPT.match(name) and os.path.isdir(path):
            debris = not os.path.exists(os.path.join(path, MANIFEST)) and not os.path.exists(os.path.join(path, STATE))
        if debris and os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    if removed:
        log(f"removed the leftovers of interrupted saves in {output_dir}: {', '.join(removed)}")
    return removed


def prune(output_dir: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints, each renamed away first (atomic)."""
    for old in checkpoint_folders(output_dir)[:-keep_last]:
        trash = os.path.join(output_dir, ".trash-" + os.path.basename(old))
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(old, trash)
        shutil.rmtree(trash, ignore_errors=True)


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
