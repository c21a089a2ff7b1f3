"""`generate --visual`: the frame layout (pure, on fake canvases), the frames built from steps, the
screen's redraw and restore, and real runs through the CLI on a fake terminal."""

import io
import json
import re
import sys
from types import SimpleNamespace

import pytest

from diffutron_engine.cli import visual
from diffutron_engine.cli.main import main
from diffutron_engine.cli.visual import (BLOCK_MARK, CLEAR_BELOW, HIDE_CURSOR, MASK_GLYPH, RESET, SHOW_CURSOR, Frame,
                                         FrameBuilder, Screen, Section, layout, wrap)

MASK = 4
VOCAB = {10: "Mer", 11: "haba", 12: " dün", 13: "ya", 14: "\n", 15: "日本", 1: "<eos>"}
ESC = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SMALL = ["--model", "tiny-tr", "--max-new-tokens", "16", "--steps", "16", "--block-size", "8", "--seed", "0"]


def display(ids):
    return [VOCAB.get(i, "?") for i in ids]


def plain(text: str) -> str:
    return ESC.sub("", text)


def frame_of(*sections, step=3, prompts=None) -> Frame:
    return Frame(step=step, forward_passes=step, committed=5, total=16, elapsed=1.25, sections=list(sections),
                 prompts=prompts or len(sections))


def section(**kw) -> Section:
    base = dict(index=0, title="Merhaba", status="running", tokens=[10, 11, MASK, MASK, 12, MASK, MASK, MASK],
                new=frozenset({4}), blocks=[(0, 4), (4, 8)], current=1, forward_passes=3)
    base.update(kw)
    return Section(**base)


# ---------------------------------------------------------------------------------------------- layout
def test_layout_dims_masks_highlights_this_steps_commits_and_marks_the_current_block():
    lines = layout(frame_of(section()), width=60, height=20, display=display, mask_id=MASK)
    assert [plain(x) for x in lines] == [
        "[1] Merhaba  (block 2/2, pass 3)",
        f"Merhaba░░{BLOCK_MARK} dün░░░{BLOCK_MARK}",
        "step 3 · forward passes 3 · committed 5/16 · 1.2 s",
    ]
    body = lines[1]
    assert "\x1b[2m░░" in body  # masks outside the current block: dimmed
    assert "\x1b[2;4m░░░" in body  # masks of the current block: dimmed and underlined
    assert "\x1b[1;7;4m dün" in body  # committed at this step: bold reverse (and in the current block)
    assert body.startswith("Merhaba")  # committed earlier, outside the block: no attribute at all
    assert body.count(f"\x1b[2m{BLOCK_MARK}") == 2  # the current block's two dim markers
    for line in lines:
        assert line.endswith(RESET)


def test_layout_marks_a_middle_block_and_nothing_when_done():
    sec = section(tokens=[10, MASK, MASK, MASK, 12, 13, MASK, MASK], new=frozenset(), current=0)
    body = plain(layout(frame_of(sec), 60, 20, display, MASK)[1])
    assert body == f"{BLOCK_MARK}Mer░░░{BLOCK_MARK} dünya░░"
    done = section(tokens=[10, 11, 12, 13, 14, 15, 1, 1], new=frozenset({6, 7}), current=None, status="done: complete")
    lines = layout(frame_of(done), 60, 20, display, MASK, special_ids={1})
    assert plain(lines[0]) == "[1] Merhaba  (done: complete, 3 passes)"
    assert plain(lines[1]) == "Merhaba dünya↵日本<eos><eos>"  # a newline cannot break the frame
    assert BLOCK_MARK not in lines[1] and "\x1b[1;7;3m<eos>" in lines[1]


def test_layout_wraps_at_a_small_width_resetting_each_line():
    sec = section(tokens=[10, 11, 12, 13, 15, 15, 15, MASK], new=frozenset({2, 3}), blocks=[(0, 8)], current=0)
    lines = layout(frame_of(sec), width=8, height=40, display=display, mask_id=MASK)
    status = next(i for i, x in enumerate(lines) if plain(x).startswith("step"))
    body = lines[1:status]
    assert [plain(x) for x in body] == ["│Merhaba", " dünya日", "本日本日", "本░│"]
    assert [plain(x) for x in lines[status:]] == ["step 3", "forward ", "passes 3", "committe", "d 5/16", "1.2 s"]
    for line in lines:
        assert line.endswith(RESET)
    # the highlighted token cut by the wrap (" dün" then "ya", both this step's) opens its style again
    assert body[1].startswith("\x1b[1;7;4m dünya\x1b[0m\x1b[4m日")


def test_wrap_keeps_styles_per_line():
    lines = wrap([("abcdef", 2), ("gh", 0)], 4)
    assert lines == ["\x1b[1;7mabcd" + RESET, "\x1b[1;7mef\x1b[0mgh" + RESET]


def test_a_frame_taller_than_the_terminal_shows_its_last_lines():
    secs = [section(index=i, title=f"soru {i}") for i in range(4)]
    lines = layout(frame_of(*secs, prompts=9), width=100, height=5, display=display, mask_id=MASK)
    assert len(lines) == 5  # 8 lines of sections and the status line, in 5
    assert plain(lines[0]) == "… 5 more lines above"
    assert plain(lines[2]) == "[4] soru 3  (block 2/2, pass 3)"
    assert plain(lines[-1]).endswith("prompts 1-4 of 9 drawn")


def test_waiting_section_and_control_characters_in_a_title():
    lines = layout(frame_of(Section(index=1, title="iki\nsatır\x07")), 60, 10, display, MASK)
    assert plain(lines[0]) == "[2] iki↵satır·  (waiting)"
    assert len(lines) == 2


# ----------------------------------------------------------------------------------- frames from steps
def out(rid, index, committed, finished=False, tokens=None, passes=1):
    return SimpleNamespace(request_id=rid, index=index, committed=committed, finished=finished, tokens=tokens,
                           forward_passes=passes, finish_reason="complete" if finished else None)


def test_frame_builder_diffs_the_canvas_and_finds_the_current_block():
    clock = iter([0.0, 0.5, 1.0, 1.5]).__next__
    fb = FrameBuilder(["a", "b", "c"], max_new_tokens=4, block_size=2, mask_id=MASK, max_shown=2, clock=clock)
    canvases = {"r0": [7, 7, 10, MASK, MASK, MASK], "r2": [7, 11, MASK, MASK, MASK, MASK]}
    f1 = fb.frame([out("r0", 0, 1), out("r2", 2, 1)], canvases.__getitem__)
    s0, s1 = f1.sections
    assert s0.tokens == [10, MASK, MASK, MASK] and s0.new == {0} and s0.current == 0 and s0.status == "running"
    assert s1.status == "waiting" and s1.tokens == []  # prompt 2 not admitted yet
    assert (f1.step, f1.committed, f1.total, f1.prompts, f1.elapsed) == (1, 2, 12, 3, 0.5)
    canvases["r0"] = [7, 7, 10, 11, 12, MASK]
    s0 = fb.frame([out("r0", 0, 2, passes=2)], canvases.__getitem__).sections[0]
    assert s0.new == {1, 2} and s0.current == 1 and s0.forward_passes == 2
    f3 = fb.frame([out("r0", 0, 1, finished=True, tokens=[7, 7, 10, 11, 12, 13], passes=3)], canvases.__getitem__)
    s0 = f3.sections[0]
    assert s0.new == {3} and s0.current is None and s0.status == "done: complete"
    assert f3.forward_passes == 3


# ----------------------------------------------------------------------------------- the screen
def test_screen_redraws_in_place_and_restores_the_terminal():
    stream = io.StringIO()
    screen = Screen(stream, display, MASK, size=lambda: (80, 10))
    screen.draw(frame_of(section()))
    first = stream.getvalue()
    assert first.startswith(HIDE_CURSOR) and first.endswith(CLEAR_BELOW)
    assert first.count("\n") == 3 and "\x1b[K\n" in first
    screen.draw(frame_of(section(), step=4))
    second = stream.getvalue()[len(first):]
    assert second.startswith("\r\x1b[3A")  # back over the 3 lines of the previous frame
    screen.close()
    screen.close()
    assert stream.getvalue().endswith(CLEAR_BELOW + RESET + SHOW_CURSOR)
    assert stream.getvalue().count(SHOW_CURSOR) == 1


def test_screen_redraws_from_the_top_after_a_resize():
    sizes = iter([(80, 10), (30, 10)])
    stream = io.StringIO()
    screen = Screen(stream, display, MASK, size=lambda: next(sizes))
    screen.draw(frame_of(section()))
    first = stream.getvalue()
    screen.draw(frame_of(section()))
    assert stream.getvalue()[len(first):].startswith("\x1b[H")  # old lines may have rewrapped: no counting up


def test_token_display_spaces_and_split_characters(monkeypatch):
    from diffutron_engine.loading import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = load_model("tiny-tr", dtype="float32", device="cpu").tokenizer
    shown = visual.TokenDisplay(tok, tok.mask_token_id)
    text = "Merhaba, nasılsın?\n日本 😀"
    ids = tok.encode(text, add_special_tokens=False)
    texts = shown(ids + [tok.mask_token_id, tok.eos_token_id])
    assert "".join(texts[:-2]) == text and " nasıl" in texts  # the byte-level space marker is a space
    assert "日本" in texts and "😀" in texts  # byte pieces of one character decoded together
    assert texts[-2:] == ["", tok.eos_token] and tok.eos_token_id in shown.special


def test_cannot_draw():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert visual.cannot_draw(Tty(), {"TERM": "xterm"}) is None
    assert visual.cannot_draw(Tty(), {"TERM": "dumb"}) == "TERM=dumb"
    assert visual.cannot_draw(io.StringIO(), {}) == "standard output is not a terminal"


# ----------------------------------------------------------------------------------- through the CLI
class FakeTty(io.StringIO):
    def isatty(self):
        return True


def use_tty(monkeypatch) -> FakeTty:
    """A terminal on standard output (set inside the test: capsys replaces sys.stdout after the fixtures)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setenv("COLUMNS", "60")
    monkeypatch.setenv("LINES", "24")
    stream = FakeTty()
    monkeypatch.setattr(sys, "stdout", stream)
    return stream


def run_plain(capsys, *argv):
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.mark.parametrize("as_json", [False, True])
def test_visual_run_draws_a_frame_per_step_then_the_plain_answers(capsys, monkeypatch, as_json):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prompts = ["Merhaba, nasılsın?", "Bir şiir yaz."]
    flags = SMALL + (["--json"] if as_json else [])
    expected = run_plain(capsys, *prompts, *flags)
    passes = [json.loads(x)["forward_passes"] for x in run_plain(capsys, *prompts, *SMALL, "--json").splitlines()]
    stream = FakeTty()
    monkeypatch.setenv("TERM", "xterm")
    monkeypatch.setattr(sys, "stdout", stream)
    code = main(["generate", *prompts, *flags, "--visual"])
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().err == ""  # no progress line: the frames' status line says it
    text = stream.getvalue()
    drawn, _, after = text.rpartition(RESET + SHOW_CURSOR)
    if as_json:  # the answers exactly as without --visual (but the time each took)
        drop = lambda rows: [{k: v for k, v in json.loads(r).items() if k != "seconds"} for r in rows]  # noqa: E731
        assert drop(after.splitlines()) == drop(expected.splitlines())
    else:
        assert after == expected
    assert drawn.startswith(HIDE_CURSOR)
    assert drawn.count(CLEAR_BELOW) == sum(passes)  # --batch-size 1: one prompt after the other, a frame a step
    frames = [plain(f) for f in drawn.split(CLEAR_BELOW)[:-1]]
    assert "step 1 · forward passes 1" in frames[0] and "[2] Bir şiir yaz.  (waiting)" in frames[0]
    assert MASK_GLYPH in frames[0] and BLOCK_MARK in frames[0]
    assert f"step {sum(passes)} · forward passes {sum(passes)} · committed 32/32" in frames[-1]
    assert "(done: " in frames[-1] and MASK_GLYPH not in frames[-1]


def test_visual_restores_the_terminal_when_interrupted(capsys, monkeypatch):
    tty = use_tty(monkeypatch)
    calls = []

    def draw(self, frame, _draw=Screen.draw):
        calls.append(frame.step)
        if len(calls) == 3:
            raise KeyboardInterrupt
        _draw(self, frame)

    monkeypatch.setattr(Screen, "draw", draw)
    code = main(["generate", "Merhaba", *SMALL, "--visual"])
    assert code == 130 and capsys.readouterr().err == "diffutron-engine: interrupted\n"
    text = tty.getvalue()
    assert text.endswith(RESET + SHOW_CURSOR) and text.count(CLEAR_BELOW) == 2


def test_visual_restores_the_terminal_after_an_error(monkeypatch):
    tty = use_tty(monkeypatch)
    def frame(self, outputs, canvas):
        raise RuntimeError("renderer broke")

    monkeypatch.setattr(FrameBuilder, "frame", frame)
    with pytest.raises(RuntimeError, match="renderer broke"):
        main(["generate", "Merhaba", *SMALL, "--visual"])
    assert tty.getvalue() == ""  # nothing was drawn: nothing to restore

    calls = []

    def draw(self, frame, _draw=Screen.draw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("terminal gone")
        _draw(self, frame)

    monkeypatch.undo()
    stream = use_tty(monkeypatch)
    monkeypatch.setattr(Screen, "draw", draw)
    with pytest.raises(RuntimeError, match="terminal gone"):
        main(["generate", "Merhaba", *SMALL, "--visual"])
    assert stream.getvalue().startswith(HIDE_CURSOR) and stream.getvalue().endswith(RESET + SHOW_CURSOR)


def test_visual_without_a_terminal_prints_exactly_the_plain_output(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expected = run_plain(capsys, "Merhaba", *SMALL)
    code = main(["generate", "Merhaba", *SMALL, "--visual"])  # capsys: not a terminal
    out, err = capsys.readouterr()
    assert code == 0 and out == expected
    assert err == ("diffutron-engine: note: --visual draws nothing (standard output is not a terminal); "
                   "the answers are printed as usual\n")

    stream = FakeTty()
    monkeypatch.setattr(sys, "stdout", stream)
    monkeypatch.setenv("TERM", "dumb")
    assert main(["generate", "Merhaba", *SMALL, "--visual"]) == 0
    assert stream.getvalue() == expected and "(TERM=dumb)" in capsys.readouterr().err

    monkeypatch.setenv("TERM", "xterm")
    dst = tmp_path / "answers.txt"
    assert main(["generate", "Merhaba", *SMALL, "--visual", "--output", str(dst)]) == 0
    assert stream.getvalue() == expected  # nothing more drawn
    assert dst.read_text(encoding="utf-8") == expected and "(--output is given)" in capsys.readouterr().err


@pytest.mark.parametrize("flag, message", [
    ("--stream", "diffutron-engine: error: --visual and --stream both show the answers as they are made: "
                 "give one of them\n"),
    ("--reference", "diffutron-engine: error: --visual needs the engine (a ModernBERT model, no --reference)\n"),
])
def test_refusals_are_one_line_and_exit_2(capsys, monkeypatch, flag, message):
    tty = use_tty(monkeypatch)
    code = main(["generate", "Merhaba", *SMALL, "--visual", flag])
    assert code == 2 and capsys.readouterr().err == message
    assert tty.getvalue() == ""
