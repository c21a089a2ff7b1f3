"""JSON from a user (a JSONL line, a data file, a request body) parsed with every failure as one line
naming where it came from: malformed text, nesting deeper than the parser recurses, an integer longer than
Python converts from text, bytes that are not UTF-8. Torch-free."""

from __future__ import annotations

import json
import sys

from .errors import DiffutronError


def parse_json(text: str | bytes, where: str, hint: str = ""):
    """json.loads(text), or one DiffutronError "WHERE: what is wrong[; HINT]".

    Bytes are decoded as UTF-8 (a leading byte-order mark is skipped, as json.loads does); JSON text
    exchanged between programs is UTF-8, so other encodings are refused, naming the first bad byte."""
    def fail(problem: str) -> DiffutronError:
        return DiffutronError(f"{where}: {problem}" + (f"; {hint}" if hint else ""))

    if isinstance(text, (bytes, bytearray)):
        raw = bytes(text).removeprefix(b"\xef\xbb\xbf")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise fail(f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"not valid JSON ({exc.msg})") from None
    except RecursionError:  # the parser recurses once per level of nesting
        raise fail("JSON nested too deeply to read") from None
    except ValueError as exc:  # an integer beyond Python's limit on the digits it converts from text
        if "integer string conversion" not in str(exc):
            raise fail(f"not valid JSON ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        raise fail(f"JSON with an integer of more than {sys.get_int_max_str_digits():,} digits") from None
