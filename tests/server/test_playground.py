"""The playground (`serve`'s page at /) in a real browser: playwright drives Debian's Chromium (never a
downloaded one) against a real `serve --model tiny-tr` on a loopback port. The page's answers are checked
against the API's own: the final text against /v1/completions with the same settings and seed, the
replayed canvas at step k against the one redrawn here from a non-streaming traced request.

DIFFUTRON_SCREENSHOTS=FOLDER writes a finished run's and a mid-run screenshot there
(2026-12-02-playground-done.png, -midrun.png)."""

import json
import os
import urllib.request

import pytest
from serve_util import AUTH, KEY, Server, redraw

# every test here runs against a server process (model load included): the slow tier; the browser's tests
# are skipped, naming the installs, without playwright or a Chromium binary
pytestmark = [pytest.mark.slow, pytest.mark.needs("fastapi", "uvicorn")]


def browser_test(test):
    return pytest.mark.chromium(pytest.mark.needs("playwright")(test))

# the controls a run sets (plain completion; early_stop off: every answer position gets filled)
SETTINGS = {"max_tokens": 24, "steps": 24, "block_size": 8, "temperature": 0.7, "seed": 7, "early_stop": False}
PROMPT = "Bu işlev"
SHOTS = "2026-12-02-playground-{}.png"


@pytest.fixture(scope="module")
def server(open_server):
    return open_server


@pytest.fixture(scope="module")
def keyed():
    """A server under the key, with --fast (the dual cache; every request's default threshold 0.9)."""
    s = Server("--fast")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=chromium)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.problems = []  # console errors and uncaught exceptions
    pg.on("console", lambda m: m.type == "error" and pg.problems.append(f"console: {m.text}"))
    pg.on("pageerror", lambda e: pg.problems.append(f"page error: {e}"))
    yield pg
    context.close()


def open_page(page, server):
    page.goto(server.url + "/")
    page.wait_for_selector("#run:not([disabled])")


def set_controls(page, prompt=PROMPT, mode="plain", rule=None, delay=0, **settings):
    page.check(f"input[name=mode][value={mode}]")
    page.fill("#prompt", prompt)
    for name, value in settings.items():
        if isinstance(value, bool):
            page.set_checked(f"#c-{name}", value)
        else:
            page.fill(f"#c-{name}", str(value))
    if rule is not None:
        page.select_option("#c-rule", rule[0])
        if rule[1] is not None:
            page.fill("#c-rule-value", str(rule[1]))
    page.fill("#delay", str(delay))


def run_once(page, server, **settings):
    """The page opened, SETTINGS (or `settings`) set, one run to its end."""
    open_page(page, server)
    set_controls(page, **(settings or SETTINGS))
    page.click("#run")
    wait_finished(page)


def wait_finished(page, panes=1):
    page.wait_for_function(f"""() => {{
        const panes = document.querySelectorAll('#panes .pane');
        return panes.length === {panes} && [...panes].every(p => ['done', 'error'].includes(p.dataset.state));
    }}""")


def cells(page, pane=0) -> list[int]:
    return page.eval_on_selector_all(f"#panes .pane >> nth={pane} >> .canvas .cell",
                                     "cells => cells.map(c => Number(c.dataset.token))")


def sent_body(page, pane=0) -> dict:
    """What the page posted, less its streaming and trace fields."""
    body = json.loads(page.locator("#panes .pane").nth(pane).get_attribute("data-body"))
    for key in ("stream", "trace", "stream_options"):
        body.pop(key)
    return body


def screenshot(page, what):
    folder = os.environ.get("DIFFUTRON_SCREENSHOTS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        page.screenshot(path=os.path.join(folder, SHOTS.format(what)), full_page=True)


@browser_test
def test_the_page_loads_without_console_errors_and_shows_the_engine(page, server):
    open_page(page, server)
    info = page.text_content("#engine-info")
    assert "tiny-tr" in info and "cache none" in info
    assert page.input_value("#c-steps") == "128" and page.get_attribute("#c-steps", "max") == "16384"
    assert page.input_value("#c-remasking") == "low_confidence" and page.input_value("#c-rule") == "schedule"
    assert page.is_hidden("#key-form") and page.is_hidden("#message")
    assert not page.problems, page.problems


@browser_test
def test_a_run_fills_every_mask_and_ends_with_the_apis_text(page, server):
    run_once(page, server)
    pane = page.locator("#panes .pane").first
    assert pane.get_attribute("data-state") == "done", pane.text_content()
    tokens = cells(page)
    assert len(tokens) == SETTINGS["max_tokens"] and page.locator(".canvas .cell.mask").count() == 0
    body = sent_body(page)
    assert body["prompt"] == PROMPT and body["seed"] == 7 and body["threshold"] is None
    status, answer = server.post("/v1/completions", body)
    assert status == 200, answer
    assert page.text_content("#panes .pane .final-text") == answer["choices"][0]["text"]
    figures = page.text_content("#panes .pane .figures")
    assert "forward passes" in figures and "tokens/s" in figures and "ms" in figures
    assert not page.problems, page.problems


@browser_test
def test_the_slider_replays_the_trace_step_by_step(page, server):
    run_once(page, server)
    status, answer = server.post("/v1/completions", {**sent_body(page), "trace": True})
    assert status == 200, answer
    trace = answer["choices"][0]["trace"]
    prompt_tokens = trace[0]["start"]["prompt_tokens"]
    slider = page.locator("#panes .pane .slider")
    assert slider.get_attribute("max") == str(len(trace))
    for k in (0, 1, len(trace) // 2, len(trace) - 1, len(trace)):
        slider.fill(str(k))
        assert page.get_attribute("#panes .pane", "data-step") == str(k)
        assert cells(page) == redraw(trace, k)[prompt_tokens:], k
        now = page.eval_on_selector_all("#panes .pane .cell.now", "cells => cells.map(c => Number(c.dataset.pos))")
        assert sorted(now) == (sorted(trace[k - 1]["positions"]) if k else [])
    page.click("#panes .pane .prev")  # ◀ from the last step
    assert cells(page) == redraw(trace, len(trace) - 1)[prompt_tokens:]
    page.click("#panes .pane .next")
    assert cells(page) == redraw(trace, len(trace))[prompt_tokens:]
    assert not page.problems, page.problems


@browser_test
def test_compare_runs_two_settings_side_by_side(page, server):
    """Exact against the fast preset's threshold, same prompt and seed; slowed down (frame delay) to catch
    a frame mid-run: masks left, some cells filled."""
    open_page(page, server)
    set_controls(page, mode="chat", delay=60, **SETTINGS)
    page.check("#compare")
    page.select_option("#compare-rule", "threshold")
    page.fill("#compare-value", "0.9")
    page.click("#run")
    page.wait_for_function("() => Number(document.querySelector('#panes .pane').dataset.step) >= 10")
    if page.get_attribute("#panes .pane", "data-state") == "running":
        assert page.locator("#panes .pane >> nth=0 >> .cell.mask").count() > 0
        screenshot(page, "midrun")
    wait_finished(page, panes=2)
    panes = page.locator("#panes .pane")
    assert [panes.nth(i).get_attribute("data-state") for i in range(2)] == ["done", "done"]
    titles = [panes.nth(i).locator(".pane-title").text_content() for i in range(2)]
    assert "exact" in titles[0] and "threshold 0.9" in titles[1]
    a, b = sent_body(page, 0), sent_body(page, 1)
    assert a["messages"] == b["messages"] and a["seed"] == b["seed"] == 7
    assert (a["threshold"], b["threshold"]) == (None, 0.9)
    for i, body in enumerate((a, b)):
        status, answer = server.post("/v1/chat/completions", body)
        assert status == 200, answer
        assert panes.nth(i).locator(".final-text").text_content() == answer["choices"][0]["message"]["content"]
        assert page.locator(f"#panes .pane >> nth={i} >> .cell.mask").count() == 0
    screenshot(page, "done")
    assert not page.problems, page.problems


@browser_test
def test_a_bad_setting_shows_the_apis_error(page, server):
    open_page(page, server)
    set_controls(page, **{**SETTINGS, "steps": 0})
    page.click("#run")
    wait_finished(page)
    error = page.locator("#panes .pane .error")
    assert page.get_attribute("#panes .pane", "data-state") == "error" and error.is_visible()
    assert "HTTP 400: steps must be >= 1, got 0" in error.text_content()
    assert not [p for p in page.problems if p.startswith("page error")], page.problems


@browser_test
def test_an_error_event_mid_stream_shows_on_the_page(page, server):
    """The server's SSE error event (what a failed step or a shutdown sends after the status line): the
    stream is answered here by the test, one traced step, then the error."""
    step = {"step": 1, "block": [2, 4], "positions": [2], "tokens": [16], "texts": [","], "confidences": [0.5],
            "start": {"tokens": [706, 726, 4, 4], "texts": ["Bu", " işlev", "", ""], "prompt_tokens": 2,
                      "mask_token": 4}}
    events = [{"id": "x", "object": "text_completion", "created": 0, "model": "tiny-tr",
               "choices": [{"index": 0, "text": ",", "logprobs": None, "finish_reason": None, "trace": step}]},
              {"error": {"message": "the request failed: boom", "type": "server_error", "param": None, "code": None}},
              "[DONE]"]
    sse = "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events)
    page.route("**/v1/completions", lambda route: route.fulfill(status=200, body=sse,
                                                                 headers={"content-type": "text/event-stream"}))
    run_once(page, server)
    assert page.get_attribute("#panes .pane", "data-state") == "error"
    assert "The server stopped the run: the request failed: boom" in page.text_content("#panes .pane .error")
    assert cells(page) == [16, 4]  # the step that came is drawn
    assert not page.problems, page.problems


def test_the_page_comes_without_the_key_and_the_engine_route_with_it(keyed):
    for path, kind in (("/", "text/html"), ("/static/app.js", "text/javascript"), ("/static/style.css", "text/css")):
        req = urllib.request.Request(keyed.url + path)
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 200 and r.headers["content-type"].startswith(kind), path
    assert keyed.get("/static/nope.js")[0] == 401  # only the page's own files are open
    assert keyed.get("/v1/engine")[0] == 401
    status, info = keyed.get("/v1/engine", AUTH)
    assert status == 200, info
    assert info["model"] == "tiny-tr" and info["engine"]["cache"] == "dual" and info["engine"]["max_batch"] == 8
    assert info["engine"]["model_dtype"] == "float32" and info["engine"]["model_device"] == "cpu"
    assert info["request_defaults"] == {"threshold": 0.9}  # --fast
    assert info["sampling_params"]["steps"] == 128 and info["sampling_params"]["threshold"] is None
    assert info["sampling_params"]["trace"] is False and info["api_names"]["max_new_tokens"] == "max_tokens"
    assert info["bounds"] == {"max_steps": 2**14, "max_temperature": 100.0, "context": 512,
                              "remasking": ["low_confidence", "random"], "max_n": 16}


@browser_test
def test_under_a_key_the_page_asks_for_it(page, keyed):
    """The key is asked for, a wrong one refused with a readable message, the right one kept for the
    tab (sessionStorage, never localStorage); the server's --fast shows in the engine line and the
    default commit rule."""
    page.goto(keyed.url + "/")  # the page and its files come without the key
    page.wait_for_selector("#key-form:not([hidden])")
    assert "needs an API key" in page.text_content("#message") and page.is_disabled("#run")
    page.fill("#key", "wrong")
    page.click("#key-form button")
    page.wait_for_function("() => document.querySelector('#message').textContent.includes('refused')")
    page.fill("#key", KEY)
    page.click("#key-form button")
    page.wait_for_selector("#run:not([disabled])")
    assert page.is_hidden("#key-form") and page.is_hidden("#message")
    assert "cache dual" in page.text_content("#engine-info")
    assert page.input_value("#c-rule") == "threshold" and page.input_value("#c-rule-value") == "0.9"
    set_controls(page, **SETTINGS)
    page.click("#run")
    wait_finished(page)
    assert page.get_attribute("#panes .pane", "data-state") == "done", page.text_content("#panes")
    assert sent_body(page)["threshold"] == 0.9
    assert page.evaluate("sessionStorage.getItem('diffutron-api-key')") == KEY
    assert page.evaluate("localStorage.length") == 0
    assert not [p for p in page.problems if p.startswith("page error")], page.problems
