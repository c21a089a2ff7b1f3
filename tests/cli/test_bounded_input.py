"""diffutron_engine.bounded and diffutron_engine.jsonio: the torch-free readers every command checks its
input with. read_lines: each line and the whole stream bounded (at the bound held, one past it refused),
a last line without a break kept, \\r\\n taken as a break, a line that is not UTF-8 named by its number,
a text stream taken as it is. parse_json: one line naming where for malformed text, deep nesting, a
5,000-digit integer, bytes that are not UTF-8 and empty input. show: a value cut to one short line."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from diffutron_engine.bounded import cut, read_lines, show, size_text
from diffutron_engine.errors import DiffutronError
from diffutron_engine.jsonio import parse_json


def _read(data, **bounds):
    bounds.setdefault("max_line_bytes", 8)
    return list(read_lines(io.BytesIO(data) if isinstance(data, bytes) else io.StringIO(data), "in.txt", **bounds))


def _error(call) -> str:
    with pytest.raises(DiffutronError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------ read_lines
def test_lines_are_numbered_from_one_without_their_breaks():
    assert _read(b"bir\r\niki\n\n\xc3\xbc\xc3\xa7\n") == [(1, "bir"), (2, "iki"), (3, ""), (4, "üç")]


def test_empty_input_has_no_lines():
    assert _read(b"") == [] and _read("") == []


def test_a_last_line_without_a_break_is_a_line():
    assert _read(b"bir\niki") == [(1, "bir"), (2, "iki")]
    assert _read(b"12345678") == [(1, "12345678")]


def test_a_line_at_the_bound_is_read_one_past_it_is_refused():
    assert _read(b"12345678\n9\n") == [(1, "12345678"), (2, "9")]
    assert _read(b"12345678\r\n") == [(1, "12345678")]  # the break is not counted, \r\n either
    assert _error(lambda: _read(b"ok\n123456789\n")) == "in.txt line 2 is longer than 8 bytes"
    assert _error(lambda: _read(b"123456789")) == "in.txt line 1 is longer than 8 bytes"  # cut off, no break
    assert _error(lambda: _read(b"123456789\r\n")) == "in.txt line 1 is longer than 8 bytes"
    assert _error(lambda: _read(b"x" * 1000, long_line_hint="is this the file?")) == \
        "in.txt line 1 is longer than 8 bytes; is this the file?"


def test_an_endless_line_is_refused_after_reading_its_bound():
    class Endless(io.RawIOBase):
        asked = []

        def readline(self, size=-1):
            assert size > 0, "a line read without a bound"
            self.asked.append(size)
            return b"\0" * size

    with pytest.raises(DiffutronError, match="line 1 is longer than 64 MiB"):
        list(read_lines(Endless(), "/dev/zero", max_line_bytes=64 * 2**20))
    assert Endless.asked == [64 * 2**20 + 2]


def test_the_whole_stream_is_bounded_in_bytes_and_lines():
    assert len(_read(b"1234\n" * 4, max_bytes=20)) == 4  # 20 bytes, breaks counted: at the bound
    assert _error(lambda: _read(b"1234\n" * 4 + b"5", max_bytes=20, too_much_hint="split it")) == \
        "in.txt holds more than 20 bytes; split it"
    assert _error(lambda: _read(b"1\n" * 2000, max_bytes=2**10)) == "in.txt holds more than 1 KiB"
    assert len(_read(b"a\n" * 3, max_lines=3)) == 3
    assert _error(lambda: _read(b"a\n" * 3 + b"b", max_lines=3)) == "in.txt holds more than 3 lines"


def test_a_line_that_is_not_utf8_is_named_by_its_number():
    message = _error(lambda: _read(b"bir\niki\n\xfc\xe7\n"))
    assert message.startswith("in.txt line 3 is not UTF-8 text (byte 0xfc at offset 0); convert it to UTF-8")
    lines = read_lines(io.BytesIO(b"ok\nab\xff\n"), "standard input", max_line_bytes=8)
    assert next(lines) == (1, "ok")  # read lazily: the lines before the bad one come first
    assert "standard input line 2 is not UTF-8 text (byte 0xff at offset 2)" in _error(lambda: next(lines))


def test_a_text_stream_reads_its_bytes_underneath():
    stream = io.TextIOWrapper(io.BytesIO(b"bir\nab\xff\n"), encoding="ascii", errors="surrogateescape")
    assert "line 2 is not UTF-8 text (byte 0xff" in _error(lambda: list(read_lines(stream, "x", max_line_bytes=8)))


def test_a_text_stream_without_bytes_is_taken_as_it_is():
    assert _read("bir\r\nüç\nson") == [(1, "bir"), (2, "üç"), (3, "son")]
    assert _error(lambda: _read("123456789\n")) == "in.txt line 1 is longer than 8 bytes"


def test_sizes_are_spoken_in_their_unit():
    assert [size_text(n) for n in (64 * 2**20, 2**30, 2**10, 100, 1500, 0)] == \
        ["64 MiB", "1 GiB", "1 KiB", "100 bytes", "1,500 bytes", "0 bytes"]


# ------------------------------------------------------------------------------------------ parse_json
def test_json_parses_text_and_utf8_bytes():
    assert parse_json('{"a": [1, 2.5, null]}', "x") == {"a": [1, 2.5, None]}
    assert parse_json('{"ş": "ğ"}'.encode(), "x") == {"ş": "ğ"}
    assert parse_json(b"\xef\xbb\xbf[1]", "x") == [1]  # a byte-order mark, as json.loads takes it


@pytest.mark.parametrize("text, problem", [
    ("", "not valid JSON (Expecting value)"),
    (b"", "not valid JSON (Expecting value)"),
    ('{"a": 1', "not valid JSON (Expecting ',' delimiter)"),
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply to read"),
    ('{"n": ' + "1" * 5000 + "}", "JSON with an integer of more than 4,300 digits"),
    (b'{"a": "\xff"}', "not UTF-8 text (byte 0xff at offset 7)"),
    ('{"a": 1}'.encode("utf-16"), "not UTF-8 text (byte 0xff at offset 0)"),
])
def test_json_failures_are_one_line_naming_where(text, problem):
    assert _error(lambda: parse_json(text, "in.jsonl:3")) == f"in.jsonl:3: {problem}"
    assert _error(lambda: parse_json(text, "in.jsonl:3", hint="expected an object")) == \
        f"in.jsonl:3: {problem}; expected an object"


def test_json_numbers_within_python_limits_parse():
    assert parse_json("1" * 4300, "x") == int("1" * 4300)
    assert parse_json("1." + "1" * 5000, "x") > 1  # only integers are limited


# ------------------------------------------------------------------------------------------------ show
def test_show_keeps_short_values_and_cuts_long_ones_with_their_length():
    assert show("abc") == "'abc'" and show(5) == "5" and show(None) == "None" and show([1, "a"]) == "[1, 'a']"
    assert show("a" * 100) == "'" + "a" * 39 + "... (102 characters)"
    assert cut("x" * 60) == "x" * 60 and cut("x" * 61) == "x" * 40 + "... (61 characters)"


def test_show_bounds_a_5000_digit_number_and_nested_containers():
    assert show(10**5000) == "an integer of 16,610 bits"  # beyond what Python converts to text
    nested = [1] * 10
    for _ in range(7):
        nested = [nested] * 10
    assert len(show(nested)) <= 80 and len(show({"k": nested}, as_json=True)) <= 80


def test_show_as_json_spells_values_as_their_sender_wrote_them():
    assert show(True, as_json=True) == "true" and show(None, as_json=True) == "null"
    assert show("é", as_json=True) == '"\\u00e9"' and show(1.5, as_json=True) == "1.5"
    assert show({"b": [True, None], "a": "x"}, as_json=True) == '{"b": [true, null], "a": "x"}'
    assert show(float("nan"), as_json=True) == "nan"
    assert show("a" * 100, as_json=True) == '"' + "a" * 39 + "... (102 characters)"


def test_the_shared_readers_do_not_import_torch():
    code = ("import sys; import diffutron_engine.bounded, diffutron_engine.jsonio; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
