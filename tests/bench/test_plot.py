"""`--plot FILE` on bench throughput, eval and serve, and `bench plot REPORT.json ... --out FILE.png`:
real reports drawn as valid PNGs, bad paths and a missing matplotlib refused in one line before any
measuring."""

import json
import os
import struct
import sys

import pytest

from where import ROOT
from diffutron_engine.cli.main import main

RESULTS = os.path.join(ROOT, "bench", "results")
SAVED = {"throughput": ["2026-11-30-cpu-b1-greedy-full.json"], "eval": ["2026-11-30-eval-cpu-l2.json"],
         "serve": [f"2026-11-30-cpu-tiny-tr-serve-c{c}.json" for c in (1, 16, 64)]}


def assert_png(path, width=None, height=None):
    """A whole PNG that decodes, of a sensible size (about 1000 x 400 pixels at dpi 100, < 150 KB)."""
    raw = open(path, "rb").read()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR", raw[:16]
    w, h = struct.unpack(">II", raw[16:24])
    assert 600 <= w <= 1200 and 300 <= h <= 600, (w, h)
    assert (width is None or w == width) and (height is None or h == height), (w, h)
    assert 10_000 < len(raw) < 150_000, len(raw)
    assert raw.endswith(b"IEND\xaeB`\x82")
    from matplotlib.image import imread

    assert imread(path).shape[:2] == (h, w)


def _one_error_line(capsys, code, *needles):
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and captured.out == "", captured
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


@pytest.fixture
def no_measuring(monkeypatch):
    """Every benchmark's measuring replaced by a failure: a refusal must come before it."""
    from diffutron_engine.bench import likelihood, serve, throughput

    def measured(*a, **k):
        raise AssertionError("the benchmark ran")

    for module in (throughput, likelihood, serve):
        monkeypatch.setattr(module, "run", measured)


# ------------------------------------------------------------------------------------------ saved reports
@pytest.mark.needs("matplotlib")
@pytest.mark.parametrize("kind", sorted(SAVED))
def test_bench_plot_draws_saved_reports_of_each_kind(kind, tmp_path, capsys):
    out = tmp_path / f"{kind}.png"
    code = main(["bench", "plot", *(os.path.join(RESULTS, n) for n in SAVED[kind]), "--out", str(out)])
    assert code == 0, capsys.readouterr()
    assert capsys.readouterr().err.strip() == f"plotted {out}"
    assert_png(out)


@pytest.mark.needs("matplotlib")
def test_plot_functions_return_figures_from_report_dicts():
    from diffutron_engine.bench import plot

    reports = {k: [json.load(open(os.path.join(RESULTS, n))) for n in names] for k, names in SAVED.items()}
    assert [plot.report_kind(reports[k][0]) for k in ("throughput", "eval", "serve")] == ["throughput", "eval", "serve"]
    fig = plot.plot_throughput(reports["throughput"][0])
    assert [ax.get_ylabel() for ax in fig.axes] == ["generated tokens/s", "tokens equal to the oracle's (%)",
                                                    "forward passes per generated token"]
    title = fig._suptitle.get_text()
    assert "22 layers" in title and "AMD EPYC" in title and "128 steps" in title
    png = plot.render(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    fig = plot.plot_eval(reports["eval"][0])
    assert [ax.get_ylabel() for ax in fig.axes] == ["scored requests/s", "peak working memory (MiB)"]
    plot.render(fig)
    fig = plot.plot_serve(reports["serve"][::-1])  # ordered by concurrency whatever the order given
    assert [t.get_text().split("\n")[0] for t in fig.axes[0].get_xticklabels()] == ["1", "16", "64"]
    assert [ax.get_ylabel() for ax in fig.axes] == ["end-to-end latency (s)", "time to first chunk (s)"]
    assert "model not recorded" in fig._suptitle.get_text()  # reports from before the model was recorded
    plot.render(fig)


@pytest.mark.needs("matplotlib")
def test_bench_plot_refuses_what_it_cannot_draw_in_one_line(tmp_path, capsys):
    th, ev = (os.path.join(RESULTS, SAVED[k][0]) for k in ("throughput", "eval"))
    overhead = os.path.join(RESULTS, "2026-11-30-cpu-overhead.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    out = str(tmp_path / "x.png")
    for argv, needles in [
        ([overhead], ("is an overhead report",)),
        ([th, ev], ("different benchmarks",)),
        ([th, th], ("give one throughput report",)),
        ([str(bad)], ("bad.json", "not valid JSON")),
        ([str(tmp_path / "missing.json")], ("cannot read report",)),
    ]:
        _one_error_line(capsys, main(["bench", "plot", *argv, "--out", out]), *needles)
    assert not os.path.exists(out)
    copy = tmp_path / "report.json"
    copy.write_text(open(th).read())
    _one_error_line(capsys, main(["bench", "plot", str(copy), "--out", str(copy)]), "is also an input")
    assert json.loads(copy.read_text())["modes"]  # untouched
    _one_error_line(capsys, main(["bench", "plot", th, "--out", str(tmp_path / "no" / "x.png")]),
                    "is not an existing folder")
    # a report of the right kind, edited by hand: one line, not a traceback
    edited = json.loads(open(th).read())
    edited["modes"] = {name: "fast" for name in edited["modes"]}
    cut = tmp_path / "edited.json"
    cut.write_text(json.dumps(edited))
    _one_error_line(capsys, main(["bench", "plot", str(cut), "--out", out]), "edited.json: a throughput report")
    assert not os.path.exists(out)
    # the old spelling `bench --overhead` parses the throughput flags: --plot is refused, not ignored
    _one_error_line(capsys, main(["bench", "--overhead", "--plot", out]), "bench overhead has no plot")


# ------------------------------------------------------------------------------------------ refusals
@pytest.mark.needs("matplotlib")
@pytest.mark.parametrize("argv", [["throughput"], ["eval"], ["serve", "--url", "http://127.0.0.1:9"]],
                         ids=["throughput", "eval", "serve"])
def test_bad_plot_path_is_one_line_and_exit_2_before_measuring(argv, tmp_path, capsys, no_measuring):
    for plot, needle in [(str(tmp_path / "missing" / "x.png"), "is not an existing folder"),
                         (str(tmp_path), "is a folder"), ("", "--plot is empty")]:
        _one_error_line(capsys, main(["bench", *argv, "--plot", plot]), "--plot", needle)
    # nor the report that --save writes
    from diffutron_engine.outputs import report_path

    tag = "t-c16" if argv[0] == "serve" else "t"
    _one_error_line(capsys, main(["bench", *argv, "--save", str(tmp_path), "--tag", "t",
                                  "--plot", report_path(str(tmp_path), tag)]), "the report --save writes")
    assert os.listdir(tmp_path) == []


@pytest.mark.needs("matplotlib")
def test_bench_serve_plot_is_not_its_prompts(tmp_path, capsys, no_measuring):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "Merhaba"}\n')
    _one_error_line(capsys, main(["bench", "serve", "--prompts", str(prompts), "--plot", str(prompts)]),
                    "is also an input")
    assert prompts.read_text() == '{"prompt": "Merhaba"}\n'


@pytest.mark.parametrize("argv", [["throughput", "--layers", "1"], ["eval"], ["serve"], ["plot", "r.json"]],
                         ids=["throughput", "eval", "serve", "plot"])
def test_missing_matplotlib_is_one_line_naming_the_install(argv, tmp_path, capsys, monkeypatch, no_measuring):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    flag = "--out" if argv[0] == "plot" else "--plot"
    line = _one_error_line(capsys, main(["bench", *argv, flag, str(tmp_path / "x.png")]), "needs matplotlib",
                           "pip install -e '.[plot]'")
    assert line.startswith("diffutron-engine: error: ")
    assert not os.path.exists(tmp_path / "x.png")


# ------------------------------------------------------------------------------------------ real runs
@pytest.mark.slow
@pytest.mark.needs("matplotlib")
def test_bench_throughput_plot_of_a_real_run(tmp_path, capsys):
    png = tmp_path / "throughput.png"
    code = main(["bench", "throughput", "--layers", "1", "--vocab-size", "2048", "--prompt-len", "8",
                 "--new-tokens", "8", "--block-size", "4", "--steps", "8", "--modes", "reference,exact,dual",
                 "--save", str(tmp_path), "--tag", "t", "--plot", str(png)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads(captured.out.strip().splitlines()[-1])  # the report is still the last line
    assert set(report["modes"]) == {"reference", "exact", "dual"}
    assert f"plotted {png}" in captured.err
    assert_png(png, width=1000, height=390)
    # the saved report draws the same picture
    again = tmp_path / "again.png"
    assert main(["bench", "plot", str(next(tmp_path.glob("*-t.json"))), "--out", str(again)]) == 0
    assert_png(again, width=1000, height=390)


@pytest.mark.slow
@pytest.mark.needs("matplotlib")
def test_bench_eval_plot_of_a_real_run(tmp_path, capsys):
    png = tmp_path / "eval.png"
    code = main(["bench", "eval", "--phases", "likelihood", "--layers", "1", "--requests", "4", "--mc-num", "4",
                 "--batch-size", "4", "--vocab", "1000", "--plot", str(png)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["phases"] == ["likelihood"]
    assert_png(png, width=850, height=390)


@pytest.mark.slow
@pytest.mark.needs("matplotlib", "fastapi", "uvicorn", "httpx")
def test_bench_serve_plot_of_real_runs_against_a_real_server(tmp_path, capsys):
    """One run per concurrency against `serve --model tiny-tr`: each --plot draws its run, the saved
    reports name the model and the machine, and `bench plot` draws them side by side."""
    from serve_util import KEY, Server

    server = Server()
    try:
        for c in (1, 2):
            code = main(["bench", "serve", "--url", server.url, "--api-key", KEY, "--num-requests", "4",
                         "--concurrency", str(c), "--max-tokens", "4", "--extra-body", '{"steps": 4, "block_size": 4}',
                         "--save", str(tmp_path), "--tag", "t", "--plot", str(tmp_path / f"c{c}.png")])
            captured = capsys.readouterr()
            assert code == 0, captured
            assert_png(tmp_path / f"c{c}.png", width=900, height=410)
    finally:
        server.stop()
    reports = sorted(str(p) for p in tmp_path.glob("*-t-c*.json"))
    saved = [json.loads(open(p).read()) for p in reports]
    assert [r["concurrency"] for r in saved] == [1, 2] and all(r["model"] == "tiny-tr" for r in saved)
    assert all(r["machine"]["cpu"] for r in saved) and all(KEY not in open(p).read() for p in reports)
    assert main(["bench", "plot", *reports, "--out", str(tmp_path / "serve.png")]) == 0
    assert_png(tmp_path / "serve.png", width=900, height=410)


@pytest.mark.needs("matplotlib")
def test_plot_module_and_bench_plot_import_no_torch(tmp_path):
    """The module imports neither torch nor matplotlib at its top; `bench plot` draws without torch."""
    import subprocess

    report = os.path.join(RESULTS, SAVED["eval"][0])
    code = ("import sys\nimport diffutron_engine.bench.plot\n"
            "assert not {'torch', 'matplotlib'} & set(sys.modules), 'imported at the top'\n"
            "from diffutron_engine.cli.main import main\nrc = main(sys.argv[1:])\n"
            "assert 'torch' not in sys.modules, 'torch imported'\nsys.exit(rc)\n")
    r = subprocess.run([sys.executable, "-c", code, "bench", "plot", report, "--out", str(tmp_path / "e.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert_png(tmp_path / "e.png")
