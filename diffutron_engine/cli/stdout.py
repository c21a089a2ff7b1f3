"""Standard output for the commands: answers written as UTF-8 bytes and flushed, a closed pipe left to
main() (a quiet exit), any other write error one line. Apart from main.py so that the commands import it
without importing the dispatcher that imports them."""

from __future__ import annotations

import os
import sys

from ..errors import DiffutronError


def silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so that the interpreter's last flush of what is still
    buffered for a closed or full standard output succeeds instead of printing "Exception ignored".
    Nothing to do when sys.stdout is not a real file (a test's capture)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def write_stdout(text: str) -> None:
    """Write and flush to standard output: a closed pipe propagates as BrokenPipeError (main() exits
    quietly); any other write error (ENOSPC, EIO) becomes a one-line DiffutronError.

    The text goes out as UTF-8 bytes whatever encoding Python gave standard output (PYTHONIOENCODING=ascii,
    a locale without UTF-8): the answers are Turkish text, already UTF-8 where they came from (the
    prompts, the tokenizer), and a Unix tool passes text through as bytes, as cat and sed do, rather than
    failing at the first 'ş' after the work is done or writing '?' in its place. A reader that wants
    another encoding converts the bytes (iconv)."""
    try:
        buffer = getattr(sys.stdout, "buffer", None)
        if buffer is None:  # a text stream without bytes underneath (a test's io.StringIO)
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        sys.stdout.flush()  # what print() left in the text layer goes out first, in order
        buffer.write(text.encode("utf-8", "backslashreplace"))  # a lone surrogate spelled out, not raised
        buffer.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        silence_stdout()
        raise DiffutronError(f"cannot write to standard output: {exc.strerror or exc}") from None
