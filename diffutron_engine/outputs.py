"""Writing what a command was asked to write, and nothing else: one rule for every output path.

A file output (`generate --output`, reports, plots) is checked before any work, then written whole:
- a regular file (or a new one) is written to a temporary file beside it and renamed onto it, so a run
  that fails leaves the old content; its permissions are kept;
- a character device, a FIFO or a socket (`/dev/null`, `/dev/stdout`, a named pipe) is written in place:
  renaming onto it would replace the device node itself (as root, the system's /dev/null);
- a regular file with other hard links is written in place too (after the run succeeded): renaming would
  leave the other names with the old content (a write that fails midway, e.g. a full disk, can then
  leave it partial: the price of keeping the links);
- a symbolic link is followed (the link stays, as a shell's `>` leaves it);
- refused with one line: an empty name, a folder, a missing parent folder, a read-only file, a loop of
  links, and a file that is also one of the command's inputs (it would overwrite the prompts).

A folder output (`train merge --out`) is written into a temporary folder beside it and renamed into place;
an existing folder or file there is replaced only when it is an earlier output of the same command (its
marker file says so) or the caller passes force, and never when it is, holds or lies inside one of the
command's inputs; it is checked again just before it is moved aside.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass

from .errors import DiffutronError


@dataclass(frozen=True)
class FileTarget:
    """Where a file output goes, resolved and checked: `path` (links followed) and how it is written."""

    given: str
    path: str
    in_place: bool  # a device, FIFO, socket or hard-linked file: written through, never renamed onto
    append: bool = False  # /dev/stdout leading to a regular file: written at its end, as the shell's fd 1 is


def check_file_output(path: str | None, what: str = "--output", inputs: tuple = ()) -> FileTarget | None:
    """Resolve and check a file output before any work (a temporary file is made and removed beside a
    regular target, so a folder without write permission fails now, not after an hour of work)."""
    if path is None:
        return None
    if not path:
        raise DiffutronError(f"{what} is empty: give a file name")
    try:
        st = os.stat(path)  # through links: what a write would reach
    except FileNotFoundError:
        st = None
    except OSError as exc:  # a loop of links, a component that is not a folder, no permission
        if exc.errno == errno.ELOOP:
            raise DiffutronError(f"cannot write {what} {path!r}: its symbolic links form a loop") from None
        raise DiffutronError(f"cannot write {what} {path!r}: {exc.strerror or exc}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise DiffutronError(f"{what} {path!r} is a folder; give a file name")
    for name in inputs:
        if name and st is not None and _same_file(st, name):
            raise DiffutronError(f"{what} {path!r} is also an input ({name!r}): writing it would destroy what "
                                 "the command reads; give another file")
    if st is not None and (not stat.S_ISREG(st.st_mode) or _is_stream_name(path)):
        # a device, FIFO or socket, or /dev/stdout and its kin whatever they lead to (a shell's `> file`
        # included): written through the name as given, never renamed onto
        return FileTarget(given=path, path=path, in_place=True, append=stat.S_ISREG(st.st_mode))
    target = os.path.realpath(path)
    if st is None and os.path.islink(target):  # realpath stops at a link it cannot follow
        raise DiffutronError(f"cannot write {what} {path!r}: its symbolic links form a loop")
    # the mode bits, not access(): root may write anything, and a file made read-only must stay as it is
    if st is not None and (not st.st_mode & 0o222 or not os.access(target, os.W_OK)):
        raise DiffutronError(f"cannot write {what} {path!r}: it is read-only (change its mode or give another file)")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise DiffutronError(f"cannot write {what} {path!r}: {parent!r} is not an existing folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".diffutron-", suffix=".tmp", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise DiffutronError(f"cannot write {what} {path!r}: {exc.strerror or exc}") from None
    linked = st is not None and st.st_nlink > 1
    return FileTarget(given=path, path=target, in_place=linked)


def _is_stream_name(path: str) -> bool:
    """/dev/stdout, /dev/stderr, /dev/fd/N, /proc/self/fd/N: names of this process's open streams."""
    name = os.path.abspath(path)
    return name in ("/dev/stdout", "/dev/stderr") or name.startswith(("/dev/fd/", "/proc/self/fd/"))


def _same_file(st: os.stat_result, other: str) -> bool:
    try:
        o = os.stat(other)
    except OSError:
        return False
    return (o.st_dev, o.st_ino) == (st.st_dev, st.st_ino) and stat.S_ISREG(o.st_mode)


def write_file(target: FileTarget, data: str | bytes, what: str = "--output") -> None:
    """Write a checked target whole (rename) or through (in place), as check_file_output decided."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    try:
        if target.in_place:
            with open(target.path, "ab" if target.append else "wb") as f:
                f.write(raw)
            return
        _replace(target.path, raw)
    except OSError as exc:
        raise DiffutronError(f"cannot write {what} {target.given!r}: {exc.strerror or exc}") from None


def _replace(path: str, raw: bytes) -> None:
    """A temporary file in the target's folder, renamed onto it; an existing file keeps its permissions,
    a new one gets the usual (0666 & ~umask)."""
    parent = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".diffutron-", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        try:
            st = os.stat(path)
            mode = st.st_mode & 0o7777
            if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (0, 0):  # root rewriting a user's file
                os.chown(tmp, st.st_uid, st.st_gid)
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_file(path: str, text: str, what: str = "--output", inputs: tuple = ()) -> None:
    """check_file_output then write_file, for outputs that are known only at the end (reports, plots)."""
    write_file(check_file_output(path, what, inputs), text, what)


# ----------------------------------------------------------------------------------------- folders
class FolderTarget(str):
    """The absolute path check_folder_output accepted, remembering what it was checked against, so that
    replace_folder checks it again, the same way, just before it moves what is there aside."""

    given: str
    what: str
    force: bool
    inputs: tuple

    def __new__(cls, target: str, given: str, what: str, force: bool, inputs: tuple):
        self = super().__new__(cls, target)
        self.given, self.what, self.force, self.inputs = given, what, force, tuple(inputs)
        return self


def check_folder_output(path: str, what: str, marker: str, *, force: bool = False, inputs: tuple = ()) -> FolderTarget:
    """Resolve and check a folder output before any work; returns its absolute path. Refused: an empty
    name, a path that is, holds or lies inside one of `inputs`, and an existing file or non-empty folder
    that is not an earlier output of this kind (no `marker` file in it) unless `force`."""
    if not path:
        raise DiffutronError(f"{what} is empty: give a folder name")
    target = os.path.realpath(path)
    _check_target(target, path, what, marker, force, inputs)
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise DiffutronError(f"cannot write {what} {path!r}: {parent!r} is not an existing folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DiffutronError(f"cannot write {what} {path!r}: its folder {parent!r} is not writable")
    return FolderTarget(target, path, what, force, inputs)


def _check_target(target: str, path: str, what: str, marker: str, force: bool, inputs: tuple) -> None:
    """What may be replaced at `target` (the resolved `path`): see check_folder_output."""
    for name in inputs:
        if not name or not os.path.exists(name):
            continue
        held = os.path.realpath(name)
        if held == target and not os.path.isdir(held):
            raise DiffutronError(f"{what} {path!r} is the input file {name!r}: replacing it would destroy it; "
                                 "give a new folder")
        if held == target or held.startswith(target.rstrip(os.sep) + os.sep):
            raise DiffutronError(f"{what} {path!r} holds the input {name!r}: replacing it would destroy it; "
                                 "give a new folder")
        # force replaces what is at the target, never an input: an output inside an input folder (or in
        # place of an input file) would rewrite what the command reads
        if target.startswith(held.rstrip(os.sep) + os.sep):
            raise DiffutronError(f"{what} {path!r} is inside the input {name!r}: writing there would change it; "
                                 "give a folder outside it")
    if os.path.lexists(target):
        if not os.path.isdir(target):
            if not force:
                raise DiffutronError(f"{what} {path!r} is an existing file; give a new folder (or --force to "
                                     "replace it)")
        elif os.listdir(target) and not os.path.isfile(os.path.join(target, marker)) and not force:
            raise DiffutronError(f"{what} {path!r} is a folder with other content (no {marker} of an earlier "
                                 "output); give a new or empty folder (or --force to replace it)")


def replace_folder(target: str, write, marker: str, marker_content: dict) -> None:
    """write(tmp) into a temporary folder beside `target`, add the marker, then rename it into place. What
    was at `target` is checked again as check_folder_output checked it (with its force and inputs when
    `target` is what it returned; else neither) just before it is moved aside, since the writing may
    have taken an hour: it is moved aside first and deleted only once the new folder is in place."""
    parent, name = os.path.dirname(target), os.path.basename(target)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
    try:
        write(tmp)
        with open(os.path.join(tmp, marker), "w") as f:
            json.dump(marker_content, f, indent=1)
        if isinstance(target, FolderTarget):
            _check_target(str(target), target.given, target.what, marker, target.force, target.inputs)
        else:
            _check_target(target, target, "the output folder", marker, False, ())
        aside = None
        if os.path.lexists(target):
            aside = tempfile.mkdtemp(prefix=f".old-{name}-", dir=parent)
            os.replace(target, os.path.join(aside, name))
        try:
            os.replace(tmp, target)
        except BaseException:  # the old one goes back where it was
            if aside is not None:
                os.replace(os.path.join(aside, name), target)
                os.rmdir(aside)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------- reports
# A benchmark's JSON report: FOLDER/YYYY-MM-DD-TAG.json, checked before the measuring, written by the file rule.
def report_path(folder: str, tag: str) -> str:
    """Where save_report() writes a report today: FOLDER/YYYY-MM-DD-TAG.json."""
    return os.path.join(folder, f"{time.strftime('%Y-%m-%d')}-{tag}.json")


def check_report_folder(folder: str, tag: str | None = None, what: str = "--save") -> None:
    """Fail before the benchmark runs where its report could not be saved: `folder` must be a folder, or
    one that can be made (its nearest existing parent a writable folder), and, with `tag`, today's report
    file must be writable (not read-only, not a folder) by the rule of diffutron_engine.outputs."""
    if not folder:
        raise DiffutronError(f"{what} is empty: give a folder")
    probe = os.path.abspath(folder)
    while not os.path.lexists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise DiffutronError(f"cannot write {what} {folder!r}: {probe!r} is not a folder")
    if probe != os.path.abspath(folder):  # to be made: its parent must take it
        if not os.access(probe, os.W_OK | os.X_OK):
            raise DiffutronError(f"cannot write {what} {folder!r}: {probe!r} is not writable")
    elif tag is not None:
        check_file_output(report_path(folder, tag), what)


def save_report(report: dict, folder: str, tag: str, what: str = "--save") -> str:
    """Write the report as JSON into `folder` (made if missing) by the rule of diffutron_engine.outputs: a
    temporary file renamed onto today's report of the same tag, a read-only one refused; the path."""
    check_report_folder(folder, what=what)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise DiffutronError(f"cannot write {what} {folder!r}: {exc.strerror or exc}") from None
    path = report_path(folder, tag)
    write_text_file(path, json.dumps(report, indent=1), what)
    return path
