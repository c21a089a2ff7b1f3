"""`generate --visual`: the denoising drawn in the terminal, one frame per step.

Each frame shows, for each of the first prompts (MAX_SHOWN), the answer region of its canvas: masks
dimmed (MASK_GLYPH), the tokens committed at this step highlighted, earlier ones as they are, and the
current block underlined between two dim markers; then a status line (step, forward passes, tokens
committed, elapsed time). Frames are redrawn in place with ANSI escape codes (no curses): the cursor
goes back up over the previous frame, each line is cleared to its end, and what a taller previous
frame left below is cleared. A frame never holds more lines than the terminal, so the redraw never
scrolls (the newest lines are kept).

Three parts: FrameBuilder turns each step's RequestOutputs (and the engine's canvases) into a Frame;
layout() lays a Frame out as lines of text with escape codes (pure, testable without a terminal);
Screen writes frames to a stream and restores the terminal (cursor shown, attributes reset) on close,
which the caller runs in a `finally` so that Ctrl-C or an error leaves the terminal sane.
"""

from __future__ import annotations

import os
import shutil
import time
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, Sequence

RESET = "\x1b[0m"
DIM = "\x1b[2m"
NEW = "\x1b[1;7m"  # bold, reverse video: committed at this step
BLOCK = "\x1b[4m"  # underline: the current block
SPECIAL = "\x1b[2;3m"  # dim italic: special tokens (<eos>, <pad>)
BOLD = "\x1b[1m"
HIDE_CURSOR = "\x1b[?25l"
SHOW_CURSOR = "\x1b[?25h"
CLEAR_LINE_END = "\x1b[K"
CLEAR_BELOW = "\x1b[J"

MASK_GLYPH = "░"
BLOCK_MARK = "│"  # before and after the current block, dimmed
MAX_SHOWN = 4  # prompts drawn; the others run without being drawn (the status line says so)

# the style of a cell: a combination of these flags, turned into escape codes by _sgr
S_MASK, S_NEW, S_BLOCK, S_SPECIAL, S_MARK, S_BOLD = 1, 2, 4, 8, 16, 32


@dataclass
class Section:
    """One prompt in a frame: its answer region (token ids, masks included) and what changed."""

    index: int  # the prompt's position (0-based)
    title: str  # the prompt, as shown in the section's header
    status: str = "waiting"  # "waiting", "running" or "done: <finish reason>"
    tokens: list[int] = field(default_factory=list)  # the answer region (empty while waiting)
    new: frozenset[int] = frozenset()  # answer positions committed at this step
    blocks: list[tuple[int, int]] = field(default_factory=list)  # answer-relative [lo, hi) of each block
    current: int | None = None  # the block being denoised (None when done or waiting)
    forward_passes: int = 0


@dataclass
class Frame:
    step: int
    forward_passes: int  # the batch's: steps that ran the model
    committed: int  # tokens committed so far, all prompts
    total: int  # tokens to commit, all prompts
    elapsed: float  # seconds
    sections: list[Section]
    prompts: int  # prompts in the run (sections holds at most MAX_SHOWN of them)


# ---------------------------------------------------------------------------------------------- layout
def char_width(c: str) -> int:
    if unicodedata.combining(c):
        return 0
    return 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1


def printable(text: str) -> str:
    """Text that cannot move the cursor: a newline shown as ↵, a tab as ⇥, other spaces as a space and
    any other control or format character as ·."""
    out = []
    for c in text:
        if c == " " or c.isprintable():
            out.append(c)
        elif c == "\n":
            out.append("↵")
        elif c == "\t":
            out.append("⇥")
        elif unicodedata.category(c) == "Zs":
            out.append(" ")
        else:
            out.append("·")
    return "".join(out)


def _sgr(style: int) -> str:
    """The escape codes of a style (after a reset)."""
    codes = []
    if style & (S_MASK | S_MARK | S_SPECIAL) and not style & S_NEW:  # dim and bold exclude each other
        codes.append("2")
    if style & (S_NEW | S_BOLD):
        codes.append("1")
    if style & S_NEW:
        codes.append("7")
    if style & S_SPECIAL:
        codes.append("3")
    if style & S_BLOCK:
        codes.append("4")
    return f"\x1b[{';'.join(codes)}m" if codes else ""


def section_cells(sec: Section, texts: Sequence[str], mask_id: int, special_ids=frozenset()) -> list[tuple[str, int]]:
    """(text, style) of each piece of a section's answer region: one per position, plus the current
    block's two markers. `texts` are the positions' display texts (masks are drawn as MASK_GLYPH)."""
    cells = []
    lo, hi = sec.blocks[sec.current] if sec.current is not None else (-1, -1)
    for pos, tok in enumerate(sec.tokens):
        if pos in (lo, hi):
            cells.append((BLOCK_MARK, S_MARK))
        style = S_BLOCK if lo <= pos < hi else 0
        if tok == mask_id:
            cells.append((MASK_GLYPH, style | S_MASK))
            continue
        if pos in sec.new:
            style |= S_NEW
        if tok in special_ids:
            style |= S_SPECIAL
        cells.append((printable(texts[pos]), style))
    if 0 <= lo < len(sec.tokens) <= hi:
        cells.append((BLOCK_MARK, S_MARK))
    return cells


def wrap(cells: Sequence[tuple[str, int]], width: int) -> list[str]:
    """Lines of at most `width` columns holding the cells' characters, each line opening its own
    styles and ending with a reset (a line drawn alone never leaks its attributes). A cell longer than
    the room left on a line goes on over the next."""
    width = max(width, 1)
    lines: list[str] = []
    parts: list[str] = []
    used, style = 0, 0
    for text, cell_style in cells:
        for c in text:
            w = char_width(c)
            if used + w > width and used > 0:
                lines.append("".join(parts) + RESET)
                parts, used, style = [], 0, 0
            if cell_style != style:
                parts.append(RESET + _sgr(cell_style) if style else _sgr(cell_style))
                style = cell_style
            parts.append(c)
            used += w
    if parts or not lines:
        lines.append("".join(parts) + RESET)
    return lines


def fit(text: str, width: int) -> str:
    """`text` cut to `width` columns (an ellipsis marks the cut)."""
    text, out, used = printable(text), [], 0
    for c in text:
        w = char_width(c)
        if used + w > width:
            while out and used + 1 > width:
                used -= char_width(out.pop())
            return "".join(out) + "…"
        out.append(c)
        used += w
    return "".join(out)


def header(sec: Section, width: int) -> str:
    """"[i] prompt  (block b/B, pass N)", cut to `width` columns (the prompt is cut first)."""
    if sec.status == "waiting" or not sec.tokens:
        info = sec.status
    elif sec.current is not None:
        info = f"block {sec.current + 1}/{len(sec.blocks)}, pass {sec.forward_passes}"
    else:
        info = f"{sec.status}, {sec.forward_passes} passes"
    label, tail = f"[{sec.index + 1}] ", f"  ({info})"
    room = width - len(label) - len(tail)
    if room < 8:  # a narrow terminal: the status before the prompt
        return wrap([(fit(label + info + "  " + sec.title, width), S_BOLD)], width)[0]
    return wrap([(label, S_BOLD), (fit(sec.title, room), 0), (tail, S_MARK)], width)[0]


def status_lines(frame: Frame, width: int) -> list[str]:
    """Step, forward passes, tokens committed, elapsed time (and how many prompts are drawn): one line,
    or more on a narrow terminal (broken between the items)."""
    items = [f"step {frame.step}", f"forward passes {frame.forward_passes}",
             f"committed {frame.committed}/{frame.total}", f"{frame.elapsed:.1f} s"]
    if frame.prompts > len(frame.sections):
        items.append(f"prompts 1-{len(frame.sections)} of {frame.prompts} drawn")
    lines = [""]
    for item in items:
        if lines[-1] and len(lines[-1]) + 3 + len(item) > width:
            lines.append("")
        lines[-1] += (" · " if lines[-1] else "") + item
    return [part for line in lines for part in wrap([(line, S_BOLD)], width)]


def layout(frame: Frame, width: int, height: int, display: Callable[[Sequence[int]], list[str]], mask_id: int,
           special_ids=frozenset()) -> list[str]:
    """The lines of a frame, at most `width` columns and `height` lines each: a header and the wrapped
    answer region per section, then the status line. A taller frame keeps its last lines (the status
    line always), the first of them saying how many are hidden above. `display(ids)` gives each
    position's display text."""
    width, height = max(width, 8), max(height, 3)
    body: list[str] = []
    for sec in frame.sections:
        body.append(header(sec, width))
        if sec.tokens:
            body += wrap(section_cells(sec, display(sec.tokens), mask_id, special_ids), width)
    status = status_lines(frame, width)[-(height - 1):]
    room = height - len(status)
    if len(body) > room:
        keep = room - 1
        hidden = len(body) - keep
        above = wrap([(fit(f"… {hidden} more lines above", width), S_MARK)], width)[0]
        body = [above] + (body[-keep:] if keep else [])
    return body + status


# ----------------------------------------------------------------------------------- token display
class TokenDisplay:
    """Each token's display text: what the tokenizer decodes it to after another token (so that a
    SentencePiece '▁' or a byte-level 'Ġ' becomes the space it stands for; a token decoded alone may
    lose it). Consecutive tokens that are each only part of a character (byte-level pieces of one UTF-8
    character) are decoded together, the character shown on the first of them. Cached by id."""

    def __init__(self, tokenizer, mask_id: int):
        self.tokenizer = tokenizer
        self.mask_id = mask_id
        self.special = frozenset(getattr(tokenizer, "all_special_ids", ()) or ())
        anchor = tokenizer.encode("a", add_special_tokens=False)
        self.anchor = anchor[-1:] if anchor else []
        self.anchor_text = self._decode(self.anchor)
        self.cache: dict[int, str] = {}

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def one(self, tok: int) -> str:
        text = self.cache.get(tok)
        if text is None:
            both = self._decode(self.anchor + [tok]) if self.anchor else ""
            text = both[len(self.anchor_text):] if self.anchor and both.startswith(self.anchor_text) \
                else self._decode([tok])
            self.cache[tok] = text
        return text

    def __call__(self, ids: Sequence[int]) -> list[str]:
        ids = list(ids)
        texts = [self.one(t) if t != self.mask_id else "" for t in ids]
        partial = [t != self.mask_id and t not in self.special and "\ufffd" in s for t, s in zip(ids, texts)]
        i = 0
        while i < len(ids):
            if not partial[i]:
                i += 1
                continue
            j = i
            while j < len(ids) and partial[j]:
                j += 1
            if j - i > 1:
                texts[i:j] = [self._decode(ids[i:j])] + [""] * (j - i - 1)
            i = j
        return texts


# ----------------------------------------------------------------------------------- frames from steps
class FrameBuilder:
    """Frames from the engine's steps: after each step, `frame(outputs, canvas)` with that step's
    RequestOutputs and a function giving a running request's canvas (Engine.canvas). What a step
    committed is what changed in a prompt's canvas since its previous frame."""

    def __init__(self, titles: Sequence[str], max_new_tokens: int, block_size: int, mask_id: int,
                 max_shown: int = MAX_SHOWN, clock: Callable[[], float] = time.perf_counter):
        self.titles = list(titles)
        self.n = max_new_tokens
        self.block_size = block_size
        self.mask_id = mask_id
        self.clock = clock
        self.t0 = clock()
        self.shown = [Section(i, t) for i, t in enumerate(self.titles[:max_shown])]
        self.canvases: dict[int, list[int]] = {}
        self.steps = self.passes = self.committed = 0

    def blocks(self) -> list[tuple[int, int]]:
        bs = self.block_size
        return [(lo, min(lo + bs, self.n)) for lo in range(0, self.n, bs)]

    def frame(self, outputs, canvas: Callable[[str], list[int]]) -> Frame:
        self.steps += 1
        if any(o.finish_reason not in ("abort", "error") for o in outputs):
            self.passes += 1
        for out in outputs:
            self.committed += out.committed
            if out.index >= len(self.shown):
                continue
            sec = self.shown[out.index]
            whole = out.tokens if out.finished else canvas(out.request_id)
            region = list(whole[len(whole) - self.n:]) if whole is not None else []
            before = self.canvases.get(out.index, [self.mask_id] * len(region))
            self.canvases[out.index] = region
            sec.tokens = region
            sec.new = frozenset(p for p, (a, b) in enumerate(zip(before, region)) if a != b and b != self.mask_id)
            sec.blocks = self.blocks()
            sec.forward_passes = out.forward_passes
            if out.finished:
                sec.status, sec.current = f"done: {out.finish_reason}", None
            else:
                sec.status = "running"
                sec.current = next((b for b, (lo, hi) in enumerate(sec.blocks)
                                    if any(t == self.mask_id for t in region[lo:hi])), None)
        reported = {o.index for o in outputs}
        for sec in self.shown:  # a section not reported this step committed nothing at it
            if sec.index not in reported:
                sec.new = frozenset()
        return Frame(step=self.steps, forward_passes=self.passes, committed=self.committed,
                     total=self.n * len(self.titles), elapsed=self.clock() - self.t0,
                     sections=[Section(**vars(s)) for s in self.shown], prompts=len(self.titles))


# ----------------------------------------------------------------------------------- the screen
def cannot_draw(stream, environ=os.environ) -> str | None:
    """Why frames cannot be drawn on `stream` (not a terminal, or TERM=dumb), or None when they can."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError, OSError):
        tty = False
    if not tty:
        return "standard output is not a terminal"
    if environ.get("TERM", "") == "dumb":
        return "TERM=dumb"
    return None


class Screen:
    """Frames drawn in place on a terminal stream. `draw(frame)` replaces the previous frame; `close()`
    shows the cursor and resets the attributes (run it in a `finally`; it may be called twice). The
    last frame stays on the terminal, the cursor below it."""

    def __init__(self, stream, display: Callable[[Sequence[int]], list[str]], mask_id: int,
                 special_ids=frozenset(), size: Callable[[], os.terminal_size] = shutil.get_terminal_size):
        self.stream = stream
        self.display = display
        self.mask_id = mask_id
        self.special_ids = special_ids
        self.size = size
        self.drawn = 0  # lines of the previous frame (the cursor is on the line below it)
        self.drawn_size = None  # the terminal's size at the previous frame
        self.frames = 0
        self.open = False

    def draw(self, frame: Frame) -> None:
        cols, rows = tuple(self.size())
        # one column spare: a line that fills the last column leaves some terminals' cursor on the next
        lines = layout(frame, cols - 1, rows - 1, self.display, self.mask_id, self.special_ids)
        out = [] if self.open else [HIDE_CURSOR]
        self.open = True
        if self.drawn and (cols, rows) != self.drawn_size:
            out.append("\x1b[H")  # resized: the previous frame's lines may have rewrapped; redraw from the top
        elif self.drawn:
            out.append(f"\r\x1b[{self.drawn}A")
        self.drawn_size = (cols, rows)
        out += [line + CLEAR_LINE_END + "\n" for line in lines]
        out.append(CLEAR_BELOW)
        self.drawn = len(lines)
        self.frames += 1
        self._write("".join(out))

    def close(self) -> None:
        if self.open:
            self.open = False
            self._write(RESET + SHOW_CURSOR)

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()
