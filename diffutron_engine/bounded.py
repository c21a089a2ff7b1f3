"""User input held to bounds: a stream read a line at a time (each line and the whole stream bounded,
each line decoded on its own so that an error names its line), and a user's value shown in an error line
cut to a bounded length (a 5,000-digit number, a long list, a value nested many times by shared
references stay one short line). Torch-free: the command line checks its input with these before it
imports torch."""

from __future__ import annotations

import itertools
import json
import reprlib

from .errors import DiffutronError

_UTF8_HINT = "convert it to UTF-8 (e.g. iconv -f LATIN5 -t UTF-8)"


def size_text(n: int) -> str:
    """A byte count as a bound is spoken of: 64 MiB, 1 GiB, 100 bytes."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n:,} bytes"


def _hinted(message: str, hint: str) -> str:
    return f"{message}; {hint}" if hint else message


def read_lines(stream, name: str, *, max_line_bytes: int, max_bytes: int | None = None,
               max_lines: int | None = None, long_line_hint: str = "", too_much_hint: str = ""):
    """(line number, text without its line break) of each line of `stream`, from 1.

    A binary stream (or a text stream with bytes underneath, e.g. sys.stdin: its `buffer` is read) is
    decoded as UTF-8 line by line, so a line that is not UTF-8 is named with its byte and offset instead
    of failing the whole read (or passing on as surrogates, as Python's C-locale stdin would). A text
    stream without bytes (io.StringIO) is taken as it is, its bounds counted in characters.

    Lines end at \\n; the break (\\n or \\r\\n) is not part of the text, and a last line without one is
    a line. Each line is read with a bound (readline without one reads an endless line into memory): one
    of more than `max_line_bytes` bytes, its break not counted, is an error; so is a stream of more than
    `max_bytes` bytes (breaks counted) or `max_lines` lines, where given. Each error is one
    DiffutronError starting with `name` ("NAME line 3 is longer than 64 MiB; LONG_LINE_HINT", "NAME holds
    more than 1 GiB; TOO_MUCH_HINT", "NAME line 2 is not UTF-8 text (byte 0xff at offset 4); ..."); the
    hints are left out when empty."""
    source = getattr(stream, "buffer", stream)
    total = 0
    for n in itertools.count(1):
        line = source.readline(max_line_bytes + 2)  # the longest line allowed and its \r\n
        if not line:
            return
        if max_lines is not None and n > max_lines:
            raise DiffutronError(_hinted(f"{name} holds more than {max_lines:,} lines", too_much_hint))
        total += len(line)
        if max_bytes is not None and total > max_bytes:
            raise DiffutronError(_hinted(f"{name} holds more than {size_text(max_bytes)}", too_much_hint))
        text = isinstance(line, str)
        body = line.removesuffix("\n" if text else b"\n").removesuffix("\r" if text else b"\r")
        if len(body) > max_line_bytes:
            raise DiffutronError(_hinted(f"{name} line {n} is longer than {size_text(max_line_bytes)}",
                                         long_line_hint))
        if text:
            yield n, body
            continue
        try:
            decoded = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DiffutronError(f"{name} line {n} is not UTF-8 text (byte 0x{body[exc.start]:02x} at offset "
                                 f"{exc.start}); {_UTF8_HINT}") from None
        yield n, decoded


# A container is shown through a repr that stops after a few levels and items, so that showing a value
# costs what the error line holds: 400 bytes of nested YAML aliases make a list of ten million items,
# whose full repr is tens of megabytes.
class _Bounded(reprlib.Repr):
    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxstring, self.maxlong, self.maxother = 3, 60, 60, 60
        for attr in ("maxlist", "maxtuple", "maxdict", "maxset", "maxfrozenset", "maxdeque", "maxarray"):
            setattr(self, attr, 6)


class _BoundedJson(_Bounded):
    """The same bounds, spelled as JSON (a value that came in a JSON body is shown as its sender wrote
    it: true, null, "text", keys in their order)."""

    def repr_str(self, x, level):
        return json.dumps(x) if len(x) <= self.maxstring else json.dumps(x[:self.maxstring]) + "..."

    def repr_bool(self, x, level):
        return "true" if x else "false"

    def repr_NoneType(self, x, level):
        return "null"

    def repr_dict(self, x, level):
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        items = [f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}"
                 for k, v in itertools.islice(x.items(), self.maxdict)]
        return "{" + ", ".join(items + ["..."] * (len(x) > self.maxdict)) + "}"


_REPR, _JSON_REPR = _Bounded(), _BoundedJson()


def cut(text: str, width: int = 60) -> str:
    """`text` if it has at most `width` characters, else its start and its length."""
    if len(text) <= width:
        return text
    return f"{text[:max(width - 20, 10)]}... ({len(text):,} characters)"


def show(value, width: int = 60, *, as_json: bool = False) -> str:
    """The value as an error line shows it, at most about `width` characters: repr(value) (or its JSON
    spelling with `as_json`) for a string or number, whose length is shown when it is cut; a bounded repr
    for a container (a few levels and items), so showing never costs more than the line holds."""
    try:
        if isinstance(value, (str, int, float)) or value is None:
            text = json.dumps(value) if as_json and not isinstance(value, float) else repr(value)
        else:
            text = (_JSON_REPR if as_json else _REPR).repr(value)
    except ValueError:  # an int beyond Python's conversion limit (4,300 digits by default)
        return f"an integer of {value.bit_length():,} bits" if isinstance(value, int) else type(value).__name__
    return cut(text, width)
