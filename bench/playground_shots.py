#!/usr/bin/env python3
"""Screenshots of the playground's compare view: pane A exact (the schedule), pane B threshold 0.9, on the
same prompt and seed, one mid-run (masks left) and one with both runs finished (their figures shown).

    python bench/playground_shots.py --peaked --out bench/results
    python bench/playground_shots.py --model PATH --out FOLDER

--peaked builds a copy of the bundled tiny-tr in a temporary folder with `head.norm.weight` times 30: its
predictions are confident, so the threshold commits many positions per step and pane B takes far fewer
forward passes than pane A. Starts `diffutron-engine serve` (no key) on a free loopback port, drives the
page with playwright through Debian's Chromium (/usr/lib/chromium/chromium, or $DIFFUTRON_CHROMIUM), writes
2026-12-02-playground-compare-{midrun,done}.png into --out and stops the server with SIGTERM. Prints each
pane's forward passes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from diffutron_engine.errors import DiffutronError  # noqa: E402
from diffutron_engine.outputs import check_file_output, write_file  # noqa: E402

SHOTS = "2026-12-02-playground-compare-{}.png"
PROMPT = "Bu işlev"
# plain completion, greedy: the peaked model's threshold run commits most of the 32 positions in a few steps
SETTINGS = {"max_tokens": 32, "steps": 32, "block_size": 32, "temperature": 0, "seed": 7}
DELAY_MS = 120  # the page's frame delay: slows the drawing (not the run) so a mid-run frame can be caught
VIEWPORT = {"width": 1400, "height": 900}


def peaked_copy(folder: str) -> str:
    """tiny-tr with its final norm's weight times 30 (sharper softmax: confident predictions)."""
    from safetensors.torch import load_file, save_file

    from diffutron_engine.loading import BUNDLED_MODELS

    model = os.path.join(folder, "tiny-tr-peaked")
    shutil.copytree(BUNDLED_MODELS["tiny-tr"], model)
    weights = load_file(os.path.join(model, "model.safetensors"))
    weights["head.norm.weight"] = weights["head.norm.weight"] * 30
    save_file(weights, os.path.join(model, "model.safetensors"), metadata={"format": "pt"})
    return model


class Server:
    """`serve --model MODEL --port 0` (no key); the port is read from its "serving ... on" line."""

    def __init__(self, model: str, timeout: float = 120):
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("DIFFUTRON_API_KEY", None)
        self.proc = subprocess.Popen([sys.executable, "-m", "diffutron_engine.cli.main", "serve", "--model", model,
                                      "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                     cwd=ROOT)
        self.lines: list[str] = []
        # the output is read by a thread: a full pipe would block the server
        threading.Thread(target=lambda: self.lines.extend(r.decode("utf-8", "replace") for r in self.proc.stdout),
                         daemon=True).start()
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = re.search(r"serving \S+ on http://127\.0\.0\.1:(\d+)/v1", "".join(self.lines))
            if found:
                self.url = f"http://127.0.0.1:{found.group(1)}"
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop()
        raise DiffutronError(f"the server did not start: {''.join(self.lines)[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def forward_passes(page, pane: int) -> int:
    text = page.locator("#panes .pane").nth(pane).locator(".figures").text_content()
    return int(re.search(r"forward passes\s*(\d+)", text).group(1))


def shoot(url: str, chromium: str, targets: dict) -> tuple[int, int]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.set_default_timeout(60_000)
            page.goto(url + "/")
            page.wait_for_selector("#run:not([disabled])")
            page.check("input[name=mode][value=plain]")
            page.fill("#prompt", PROMPT)
            for name, value in SETTINGS.items():
                page.fill(f"#c-{name}", str(value))
            page.select_option("#c-rule", "schedule")
            page.fill("#delay", str(DELAY_MS))
            page.check("#compare")
            page.select_option("#compare-rule", "threshold")
            page.fill("#compare-value", "0.9")
            page.click("#run")
            # mid-run: B drawn to its end while A, a third of the way in, still shows masks
            page.wait_for_function("""() => {
                const panes = document.querySelectorAll('#panes .pane');
                return panes.length === 2 && panes[1].dataset.state === 'done'
                    && Number(panes[0].dataset.step) >= 10;
            }""")
            if page.locator("#panes .pane >> nth=0 >> .cell.mask").count() == 0:
                raise DiffutronError("pane A had no masks left at the mid-run frame: raise the frame delay")
            write_file(targets["midrun"], page.screenshot(full_page=True), "--out")
            page.wait_for_function("""() => {
                const panes = document.querySelectorAll('#panes .pane');
                return panes.length === 2 && [...panes].every(p => p.dataset.state === 'done');
            }""")
            if page.locator("#panes .pane .cell.mask").count():
                raise DiffutronError("masks left after both runs finished")
            write_file(targets["done"], page.screenshot(full_page=True), "--out")
            return forward_passes(page, 0), forward_passes(page, 1)
        finally:
            browser.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="the model to serve (a folder or a bundled name)")
    which.add_argument("--peaked", action="store_true",
                       help="serve a peaked copy of tiny-tr built in a temporary folder")
    ap.add_argument("--out", required=True, help="folder for the two PNGs")
    args = ap.parse_args(argv)
    chromium = os.environ.get("DIFFUTRON_CHROMIUM", "/usr/lib/chromium/chromium")
    try:
        targets = {what: check_file_output(os.path.join(args.out, SHOTS.format(what)), "--out")
                   for what in ("midrun", "done")}
        if not os.access(chromium, os.X_OK):
            raise DiffutronError(f"no Chromium at {chromium!r}: apt-get install chromium, or set DIFFUTRON_CHROMIUM")
        with tempfile.TemporaryDirectory(prefix="diffutron-shots-") as tmp:
            model = peaked_copy(tmp) if args.peaked else args.model
            server = Server(model)
            try:
                a, b = shoot(server.url, chromium, targets)
            finally:
                server.stop()
    except DiffutronError as exc:
        print(f"playground_shots: {exc}", file=sys.stderr)
        return 1
    print(f"pane A (exact): {a} forward passes; pane B (threshold 0.9): {b} forward passes")
    for target in targets.values():
        print(f"wrote {target.given} ({os.path.getsize(target.path) // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
