"""diffutron_engine.outputs: what an output path may be, and that writing it destroys nothing else.

File outputs: a regular file (new or existing) is replaced through a temporary file and keeps its mode;
a symbolic link is followed and stays; a hard-linked file, a FIFO and a device are written in place (a
rename would leave the other names with the old content, or replace the node itself: as root, the
system's /dev/null); refused before any work: an empty name, a folder, a read-only file, one of the
inputs, a loop of links, a missing parent folder; a write that fails leaves the old content. Folder
outputs: replaced only when empty, an earlier output (its marker) or forced, never when they hold an
input; replace_folder leaves no temporaries and, when the writing fails, the old folder as it was. Then
the same through `generate --output`.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import threading

import pytest

from diffutron_engine import outputs
from diffutron_engine.errors import DiffutronError
from diffutron_engine.outputs import (check_file_output, check_folder_output, replace_folder, write_file,
                                      write_text_file)

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="makes a device node: root only")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _null_device(path) -> None:
    """A copy of /dev/null's node (character device 1:3)."""
    os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))


def _no_temporaries(folder) -> None:
    left = [p.name for p in folder.iterdir() if p.name.startswith((".diffutron-", ".tmp-", ".old-"))]
    assert left == []


class _FifoReader:
    """Reads a FIFO to its end in a thread, so that a writer does not block; released if no writer came."""

    def __init__(self, path):
        self.path, self.data = str(path), None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        with open(self.path, "rb") as f:
            self.data = f.read()

    def join(self) -> bytes | None:
        self.thread.join(timeout=5)
        if self.thread.is_alive():  # nobody opened it for writing: let the reader see an empty FIFO
            os.close(os.open(self.path, os.O_WRONLY | os.O_NONBLOCK))
            self.thread.join(timeout=5)
        return self.data


# ----------------------------------------------------------------------------------------- file outputs
def test_a_new_file_gets_the_usual_mode(tmp_path):
    path = tmp_path / "new.txt"
    write_text_file(str(path), "Türkçe\n")
    assert path.read_text(encoding="utf-8") == "Türkçe\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()
    _no_temporaries(tmp_path)


def test_an_existing_file_is_replaced_and_keeps_its_mode(tmp_path):
    path = tmp_path / "old.txt"
    path.write_text("earlier answers\n")
    path.chmod(0o640)
    target = check_file_output(str(path))
    assert not target.in_place
    write_file(target, "new answers\n")
    assert path.read_text() == "new answers\n" and stat.S_IMODE(path.stat().st_mode) == 0o640
    _no_temporaries(tmp_path)


def test_a_symbolic_link_is_followed_and_kept(tmp_path):
    (tmp_path / "real.txt").write_text("old\n")
    (tmp_path / "chain").symlink_to("link")
    (tmp_path / "link").symlink_to("real.txt")
    write_text_file(str(tmp_path / "chain"), "new\n")
    assert (tmp_path / "chain").is_symlink() and os.readlink(tmp_path / "chain") == "link"
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == "real.txt"
    assert (tmp_path / "real.txt").read_text() == "new\n"


def test_a_dangling_symbolic_link_makes_its_target_and_stays(tmp_path):
    (tmp_path / "link").symlink_to("made.txt")
    write_text_file(str(tmp_path / "link"), "new\n")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "made.txt").read_text() == "new\n"


def test_a_hard_linked_file_is_written_in_place_so_every_name_sees_it(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("old\n")
    os.link(a, b)
    inode = a.stat().st_ino
    target = check_file_output(str(a))
    assert target.in_place
    write_file(target, "new\n")
    assert a.read_text() == b.read_text() == "new\n"
    assert a.stat().st_ino == b.stat().st_ino == inode and a.stat().st_nlink == 2


def test_a_fifo_is_written_in_place(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    inode = fifo.stat().st_ino
    target = check_file_output(str(fifo))  # the check does not open it (that would block)
    assert target.in_place
    reader = _FifoReader(fifo)
    write_file(target, "Türkçe\n")
    assert reader.join() == "Türkçe\n".encode()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and fifo.stat().st_ino == inode
    _no_temporaries(tmp_path)


@as_root
def test_a_device_node_stays_a_device(tmp_path):
    null = tmp_path / "null"
    _null_device(null)
    before = os.lstat(null)
    target = check_file_output(str(null))
    assert target.in_place
    write_file(target, "answers\n")
    after = os.lstat(null)
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)
    _no_temporaries(tmp_path)


def test_dev_stdout_leading_to_a_file_is_appended_to(tmp_path):
    """/dev/stdout is written through, never renamed onto; when the shell pointed it at a file, at its end
    (after what the process already wrote there), as the process's own standard output would be."""
    out = tmp_path / "out.txt"
    code = ("import sys; from diffutron_engine.outputs import check_file_output, write_file; "
            "print('before', flush=True); write_file(check_file_output('/dev/stdout'), 'after\\n')")
    with open(out, "wb") as f:
        subprocess.run([sys.executable, "-c", code], stdout=f, check=True, timeout=60)
    assert out.read_text() == "before\nafter\n"


@pytest.mark.parametrize("mode", [0o444, 0o400])
def test_a_read_only_file_is_refused_even_as_root(tmp_path, mode):
    path = tmp_path / "ro.txt"
    path.write_text("keep\n")
    path.chmod(mode)
    with pytest.raises(DiffutronError, match=r"ro.txt': it is read-only"):
        check_file_output(str(path))
    assert path.read_text() == "keep\n" and stat.S_IMODE(path.stat().st_mode) == mode


@pytest.mark.parametrize("name", ["in.jsonl", "hard", "soft"])
def test_an_input_is_refused_under_any_name(tmp_path, name):
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "x"}\n')
    os.link(src, tmp_path / "hard")
    (tmp_path / "soft").symlink_to("in.jsonl")
    with pytest.raises(DiffutronError, match="is also an input"):
        check_file_output(str(tmp_path / name), inputs=(None, str(src)))
    assert src.read_text() == '{"prompt": "x"}\n'


def test_an_input_that_does_not_exist_or_is_not_a_file_is_no_obstacle(tmp_path):
    out = tmp_path / "out.txt"
    out.write_text("an earlier answer")  # an existing output: the inputs are really compared with it
    assert check_file_output(str(out), inputs=(str(tmp_path / "none"), "/dev/null", str(tmp_path))) is not None


@pytest.mark.parametrize("case,message", [
    ("empty", "--output is empty"),
    ("folder", "is a folder; give a file name"),
    ("loop", "its symbolic links form a loop"),
    ("parent missing", "is not an existing folder"),
    ("parent a file", "Not a directory"),
])
def test_refused_before_any_work(tmp_path, case, message):
    (tmp_path / "a").symlink_to("b")
    (tmp_path / "b").symlink_to("a")
    (tmp_path / "file").write_text("x")
    path = {"empty": "", "folder": str(tmp_path), "loop": str(tmp_path / "a"),
            "parent missing": str(tmp_path / "no" / "f"), "parent a file": str(tmp_path / "file" / "f")}[case]
    with pytest.raises(DiffutronError, match=message):
        check_file_output(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "file"]


def test_no_output_asked_for_is_none():
    assert check_file_output(None) is None


def test_a_failed_write_leaves_the_old_content(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    path.write_text("earlier answers\n")
    target = check_file_output(str(path))

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outputs.os, "replace", full)
    with pytest.raises(DiffutronError, match="cannot write --output .*out.txt': No space left on device"):
        write_file(target, "new answers\n")
    assert path.read_text() == "earlier answers\n"
    _no_temporaries(tmp_path)


# --------------------------------------------------------------------------------------- folder outputs
MARKER = "diffutron-output.json"


def _folder(path, files: dict) -> None:
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)


def test_a_new_or_empty_folder_is_accepted(tmp_path):
    assert check_folder_output(str(tmp_path / "new"), "--out", MARKER) == str(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    assert check_folder_output(str(tmp_path / "empty"), "--out", MARKER) == str(tmp_path / "empty")


def test_a_folder_with_other_content_is_refused_unless_forced(tmp_path):
    _folder(tmp_path / "out", {"thesis.tex": "years of work"})
    with pytest.raises(DiffutronError, match=f"a folder with other content \\(no {MARKER}"):
        check_folder_output(str(tmp_path / "out"), "--out", MARKER)
    assert check_folder_output(str(tmp_path / "out"), "--out", MARKER, force=True) == str(tmp_path / "out")


def test_a_file_is_refused_unless_forced(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(DiffutronError, match="is an existing file"):
        check_folder_output(str(tmp_path / "out"), "--out", MARKER)
    assert check_folder_output(str(tmp_path / "out"), "--out", MARKER, force=True) == str(tmp_path / "out")


def test_an_earlier_output_with_its_marker_is_accepted(tmp_path):
    _folder(tmp_path / "out", {MARKER: "{}", "model.safetensors": "old"})
    assert check_folder_output(str(tmp_path / "out"), "--out", MARKER) == str(tmp_path / "out")


@pytest.mark.parametrize("input_name", ["out", "out/adapter", "out/adapter/weights.bin"])
def test_a_folder_holding_an_input_is_refused_even_forced(tmp_path, input_name):
    _folder(tmp_path / "out", {MARKER: "{}"})
    _folder(tmp_path / "out" / "adapter", {"weights.bin": "w"})
    with pytest.raises(DiffutronError, match="holds the input"):
        check_folder_output(str(tmp_path / "out"), "--out", MARKER, force=True, inputs=(str(tmp_path / input_name),))


@pytest.mark.parametrize("out, message", [
    ("adapter/adapter_model.safetensors", "is inside the input"),
    ("adapter/new", "is inside the input"),
    ("adapter/sub/deeper", "is inside the input"),
    ("weights.bin", "is the input file"),
])
def test_a_target_inside_an_input_or_an_input_file_is_refused_even_forced(tmp_path, out, message):
    """Force replaces what is at the target, never an input: not the adapter's weights file (by a folder),
    nor a new folder written inside the adapter's folder, nor an input file itself."""
    _folder(tmp_path / "adapter", {"adapter_model.safetensors": "weights"})
    (tmp_path / "adapter" / "sub").mkdir()
    (tmp_path / "weights.bin").write_text("w")
    inputs = (str(tmp_path / "adapter"), str(tmp_path / "weights.bin"))
    with pytest.raises(DiffutronError, match=message):
        check_folder_output(str(tmp_path / out), "--out", MARKER, force=True, inputs=inputs)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_text() == "weights"


def test_a_sibling_with_the_same_prefix_is_not_held(tmp_path):
    _folder(tmp_path / "out-adapter", {"w": "w"})
    check_folder_output(str(tmp_path / "out"), "--out", MARKER, inputs=(str(tmp_path / "out-adapter"),))


def test_the_folder_refusals_before_any_work(tmp_path):
    with pytest.raises(DiffutronError, match="--out is empty"):
        check_folder_output("", "--out", MARKER)
    with pytest.raises(DiffutronError, match="is not an existing folder"):
        check_folder_output(str(tmp_path / "no" / "out"), "--out", MARKER)


def _write(files: dict):
    def write(folder):
        for name, text in files.items():
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)

    return write


def test_replace_folder_puts_the_new_folder_in_place_with_its_marker(tmp_path):
    target = check_folder_output(str(tmp_path / "out"), "--out", MARKER)
    replace_folder(target, _write({"a.txt": "new"}), MARKER, {"command": "test"})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", MARKER]
    assert json.loads((tmp_path / "out" / MARKER).read_text()) == {"command": "test"}
    _no_temporaries(tmp_path)


@pytest.mark.parametrize("earlier", ["marked folder", "forced file"])
def test_replace_folder_replaces_an_earlier_output_and_leaves_no_temporaries(tmp_path, earlier):
    if earlier == "marked folder":
        _folder(tmp_path / "out", {MARKER: "{}", "old.txt": "old"})
    else:
        (tmp_path / "out").write_text("old")
    target = check_folder_output(str(tmp_path / "out"), "--out", MARKER, force=earlier == "forced file")
    replace_folder(target, _write({"a.txt": "new"}), MARKER, {})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", MARKER]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_folder_leaves_the_old_folder_when_writing_fails(tmp_path):
    _folder(tmp_path / "out", {MARKER: "{}", "old.txt": "old"})
    target = check_folder_output(str(tmp_path / "out"), "--out", MARKER)

    def fail(folder):
        _write({"half.txt": "half"})(folder)
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        replace_folder(target, fail, MARKER, {})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "old.txt"]
    assert (tmp_path / "out" / "old.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("put", ["a user's folder", "a user's file"])
def test_replace_folder_checks_the_target_again_before_moving_it_aside(tmp_path, put):
    """What was checked before the (long) writing is checked again just before the old target is moved
    aside: a folder or file put there meanwhile is not replaced without force, and stays as it was."""
    target = check_folder_output(str(tmp_path / "out"), "--out", MARKER)

    def write(folder):
        _write({"a.txt": "new"})(folder)
        if put == "a user's folder":
            _folder(tmp_path / "out", {"thesis.tex": "years of work"})
        else:
            (tmp_path / "out").write_text("years of work")

    with pytest.raises(DiffutronError, match="a folder with other content|is an existing file"):
        replace_folder(target, write, MARKER, {})
    kept = tmp_path / "out" / "thesis.tex" if put == "a user's folder" else tmp_path / "out"
    assert kept.read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_folder_keeps_what_the_check_accepted(tmp_path):
    """A forced target stays forced (the check's decision travels with the path it returns); a plain
    path is checked again without force."""
    _folder(tmp_path / "out", {"thesis.tex": "old"})
    target = check_folder_output(str(tmp_path / "out"), "--out", MARKER, force=True)
    replace_folder(target, _write({"a.txt": "new"}), MARKER, {})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.txt", MARKER]
    _folder(tmp_path / "mine", {"thesis.tex": "mine"})
    with pytest.raises(DiffutronError, match="a folder with other content"):
        replace_folder(str(tmp_path / "mine"), _write({"a.txt": "new"}), MARKER, {})
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "mine"


# ------------------------------------------------------------------------------ generate --output
QUICK = ["--model", "tiny-tr", "--max-new-tokens", "4", "--steps", "4", "--block-size", "4", "--seed", "0", "--json"]


def _generate(capfd, monkeypatch, *argv) -> tuple[int, str, str]:
    from diffutron_engine.cli.main import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("DIFFUTRON_BACKEND", raising=False)
    capfd.readouterr()
    code = main(["generate", *QUICK, *argv])
    out, err = capfd.readouterr()
    return code, out, err


def _prompts(text: str) -> list[str]:
    return [json.loads(line)["prompt"] for line in text.splitlines()]


def test_replace_folder_puts_the_old_folder_back_when_the_last_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "merged.json").write_text("{}")
    (target / "old").write_text("old")
    real = os.replace
    calls = []

    def failing(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder into place
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", failing)
    with pytest.raises(OSError):
        replace_folder(str(target), lambda tmp: open(os.path.join(tmp, "new"), "w").close(), "merged.json", {})
    monkeypatch.undo()
    assert sorted(os.listdir(target)) == ["merged.json", "old"] and (target / "old").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporaries, nothing aside


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can rewrite another user's file")
def test_root_rewriting_a_users_file_keeps_its_owner(tmp_path):
    path = tmp_path / "theirs.txt"
    path.write_text("old")
    os.chown(path, 1234, 2345)
    write_file(check_file_output(str(path)), "new")
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (1234, 2345) and path.read_text() == "new"


@as_root
def test_generate_to_a_device_node_keeps_the_node(tmp_path, capfd, monkeypatch):
    null = tmp_path / "null"
    _null_device(null)
    before = os.lstat(null)
    code, out, err = _generate(capfd, monkeypatch, "--output", str(null), "Merhaba")
    after = os.lstat(null)
    assert code == 0 and out == "" and err == "", err
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)
    _no_temporaries(tmp_path)


def test_generate_to_a_fifo_writes_through_it(tmp_path, capfd, monkeypatch):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    reader = _FifoReader(fifo)
    code, out, err = _generate(capfd, monkeypatch, "--output", str(fifo), "Merhaba", "Kitap")
    data = reader.join()
    assert code == 0 and out == "", err
    assert _prompts(data.decode("utf-8")) == ["Merhaba", "Kitap"]
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_generate_to_a_hard_linked_file_updates_every_name(tmp_path, capfd, monkeypatch):
    a, b = tmp_path / "answers.jsonl", tmp_path / "copy.jsonl"
    a.write_text("earlier answers\n")
    os.link(a, b)
    inode = a.stat().st_ino
    code, _, err = _generate(capfd, monkeypatch, "--output", str(b), "Merhaba")
    assert code == 0, err
    assert _prompts(a.read_text(encoding="utf-8")) == ["Merhaba"] and a.read_text() == b.read_text()
    assert a.stat().st_ino == b.stat().st_ino == inode


def test_generate_reading_its_prompts_from_a_file_writes_another(tmp_path, capfd, monkeypatch):
    """The check of --output against the input looks at the file, not at the name: another file is fine."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"prompt": "Merhaba"}\n')
    code, _, err = _generate(capfd, monkeypatch, "--input", str(src), "--output", str(dst))
    assert code == 0, err
    assert _prompts(dst.read_text(encoding="utf-8")) == ["Merhaba"] and src.read_text() == '{"prompt": "Merhaba"}\n'


# ------------------------------------------------------------------------------ benchmark reports
def test_a_report_is_saved_into_a_folder_made_for_it(tmp_path):
    from diffutron_engine.outputs import check_report_folder, report_path, save_report

    folder = str(tmp_path / "results" / "new")
    check_report_folder(folder, "t")
    path = save_report({"speedup": 2.0}, folder, "t")
    assert path == report_path(folder, "t") and json.loads(open(path).read()) == {"speedup": 2.0}
    assert save_report({"speedup": 3.0}, folder, "t") == path and json.loads(open(path).read()) == {"speedup": 3.0}
    _no_temporaries(tmp_path / "results" / "new")


def test_a_report_that_cannot_be_saved_is_refused_before_the_run(tmp_path):
    from diffutron_engine.outputs import check_report_folder, report_path, save_report

    (tmp_path / "file").write_text("keep")
    for folder, message in ((str(tmp_path / "file"), "file' is not a folder"),
                            (str(tmp_path / "file" / "sub"), "file' is not a folder"), ("", "--save is empty")):
        with pytest.raises(DiffutronError, match=message):
            check_report_folder(folder, "t")
        with pytest.raises(DiffutronError, match=message):
            save_report({}, folder, "t")
    report = report_path(str(tmp_path), "t")
    with open(report, "w") as f:
        f.write("an earlier report kept read-only\n")
    os.chmod(report, 0o444)
    with pytest.raises(DiffutronError, match="it is read-only"):
        check_report_folder(str(tmp_path), "t")
    with pytest.raises(DiffutronError, match="it is read-only"):
        save_report({}, str(tmp_path), "t")
    assert open(report).read() == "an earlier report kept read-only\n"
    assert (tmp_path / "file").read_text() == "keep"
