"""`diffutron-engine bench eval`'s generation phase: lm-eval-style generate_until requests answered one at a
time by the oracle and all at once by the engine; its report, its table, its plot, its refusals."""

import json
import os
import struct
import subprocess
import sys

import pytest

from where import ROOT
from diffutron_engine.cli.main import main

RESULTS = os.path.join(ROOT, "bench", "results")
OLD_EVAL = os.path.join(RESULTS, "2026-11-30-eval-cpu-l2.json")  # a report from before the generation phase


def png_size(path):
    raw = open(path, "rb").read()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw.endswith(b"IEND\xaeB`\x82") and 10_000 < len(raw) < 150_000
    return struct.unpack(">II", raw[16:24])


def test_a_tiny_generation_run_reports_every_field_and_agrees_with_the_oracle(tmp_path, capsys):
    """4 requests through an engine of max_batch 3 (the fourth joins as the first ones finish), every
    request also through the oracle, float32 greedy: the engine's tokens and texts are the oracle's."""
    from diffutron_engine.bench.likelihood import problems

    code = main(["bench", "eval", "--phases", "generation", "--layers", "1", "--vocab", "1000", "--threads", "2",
                 "--gen-requests", "4", "--gen-new-tokens", "6", "--gen-max-batch", "3", "--gen-plain-requests", "4",
                 "--save", str(tmp_path), "--tag", "t"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = captured.out.strip().splitlines()
    report = json.loads(out[-1])
    assert report["bench"] == "eval" and report["phases"] == ["generation"] and "results" not in report
    gen = report["generation"]
    cfg = gen["config"]
    assert (cfg["requests"], cfg["new_tokens"], cfg["steps"], cfg["block_size"], cfg["max_batch"]) == (4, 6, 6, 6, 3)
    assert cfg["temperature"] == 0.0 and cfg["stop_strings"] and cfg["plain_requests"] == 4
    plain, engine = gen["results"]
    assert (plain["name"], engine["name"]) == ("plain", "engine")
    assert plain["forwards"] == plain["row_forwards"] == 4 * 6  # one request per model call
    assert engine["row_forwards"] == 4 * 6 and engine["forwards"] == 12  # 3 rows for 6 steps, then the fourth
    for r in (plain, engine):
        assert r["requests_per_s"] > 0 and r["seconds"] > 0 and "peak_mem_mb" in r
    assert gen["speedup"] == pytest.approx(engine["requests_per_s"] / plain["requests_per_s"], rel=0.01)
    assert gen["agreement"] == 100.0 and gen["tokens_compared"] == 4 * 6 and gen["texts_equal"] == 4
    assert problems(report) == []
    assert out[0].split()[:3] == ["generation", "requests", "req/s"] and "speed-up" in out[3]
    assert json.loads(next(tmp_path.glob("*-t.json")).read_text())["generation"] == gen


def test_problems_name_a_generation_that_differs_from_the_oracle():
    from diffutron_engine.bench.likelihood import problems

    report = {"config": {"dtype": "float32"}, "generation": {"config": {"requests": 4, "plain_requests": 4},
                                                            "agreement": 97.5, "texts_equal": 3}}
    assert [p.split(":")[0] for p in problems(report)] == ["generation", "generation"]
    report["config"]["dtype"] = "bfloat16"  # rounding differs there: a figure, not a rule
    assert problems(report) == []


def test_bad_eval_flags_are_one_line_and_exit_2_before_measuring():
    """In a fresh interpreter: one line on stderr naming the flag, exit 2, nothing on stdout, no model built
    (argparse's refusals come before torch is imported)."""
    cases = [(["bench", "eval", "--phases", "likelihood,nope"], "unknown phase(s) nope; choose from likelihood", True),
             (["bench", "eval", "--phases", ","], "no phase given", True),
             (["bench", "eval", "--gen-requests", "0"], "argument --gen-requests: must be >= 1, got 0", True),
             (["bench", "eval", "--gen-new-tokens", "x"], "argument --gen-new-tokens: expected an integer", True),
             (["bench", "eval", "--gen-max-batch", "0"], "argument --gen-max-batch: must be >= 1", True),
             (["bench", "eval", "--gen-requests", "4", "--gen-plain-requests", "5"],
              "--gen-plain-requests 5 is more than --gen-requests 4", False)]
    code = ("import json, sys\nimport diffutron_engine.models.random_weights as rw\n"
            "def built(*a, **k):\n    raise AssertionError('a model was built')\nrw.random_mmbert = built\n"
            "from diffutron_engine.cli.main import main\n"
            "try:\n    rc = main(json.loads(sys.argv[1]))\nexcept SystemExit as e:\n    rc = e.code\n"
            "sys.stderr.write('torch imported\\n' if sys.argv[2] == '1' and 'torch' in sys.modules else '')\n"
            "sys.exit(rc)\n")
    for argv, message, torch_free in cases:
        r = subprocess.run([sys.executable, "-c", code, json.dumps(argv), "1" if torch_free else "0"], cwd=ROOT,
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
        assert r.returncode == 2 and r.stdout == "", (argv, r)
        assert len(r.stderr.splitlines()) == 1 and message in r.stderr, (argv, r.stderr)


def test_eval_help_names_the_generation_flags(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "eval", "--help"])
    out = capsys.readouterr().out
    assert all(f in out for f in ("--phases", "--gen-requests", "--gen-new-tokens", "--gen-max-batch",
                                  "--gen-plain-requests"))


# ------------------------------------------------------------------------------------------ plots
def _generation_section():
    return {"config": {"requests": 32, "new_tokens": 32, "steps": 32, "block_size": 32, "temperature": 0.0,
                       "stop_strings": ["Soru:", "\n\n"], "max_batch": 32, "plain_requests": 8},
            "results": [{"name": "plain", "requests": 8, "seconds": 300.0, "requests_per_s": 0.027, "forwards": 256,
                         "row_forwards": 256, "peak_mem_mb": 900.0},
                        {"name": "engine", "requests": 32, "seconds": 100.0, "requests_per_s": 0.32, "forwards": 32,
                         "row_forwards": 1024, "peak_mem_mb": 2000.0}],
            "speedup": 11.85, "agreement": 100.0, "tokens_compared": 256, "tokens_undecided": 0, "texts_equal": 8}


@pytest.mark.needs("matplotlib")
def test_plot_eval_with_and_without_the_generation_section(tmp_path, capsys):
    from diffutron_engine.bench import plot

    old = json.load(open(OLD_EVAL))
    assert "generation" not in old and plot.report_kind(old) == "eval"
    fig = plot.plot_eval(old)  # as before the generation phase
    assert [ax.get_ylabel() for ax in fig.axes] == ["scored requests/s", "peak working memory (MiB)"]
    plot.render(fig)

    both = dict(old, bench="eval", phases=["likelihood", "generation"], generation=_generation_section())
    fig = plot.plot_eval(both)
    assert [ax.get_ylabel() for ax in fig.axes] == ["scored requests/s", "peak working memory (MiB)",
                                                    "generated requests/s"]
    speed = fig.axes[2]
    assert [t.get_text() for t in speed.texts] == ["1.00x", "11.85x"]
    assert "tokens equal to the oracle's 100%" in fig._suptitle.get_text()
    plot.render(fig)

    only = {k: v for k, v in both.items() if k not in ("results", "speedup", "max_abs_diff", "max_rel_diff")}
    only["phases"] = ["generation"]
    assert plot.report_kind(only) == "eval"
    for name, report, width in (("old", old, 850), ("both", both, 1150), ("only", only, 600)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(report))
        assert main(["bench", "plot", str(path), "--out", str(tmp_path / f"{name}.png")]) == 0, capsys.readouterr()
        assert png_size(tmp_path / f"{name}.png") == (width, 390)
    neither = {k: v for k, v in only.items() if k != "generation"}
    path = tmp_path / "neither.json"
    path.write_text(json.dumps(neither))
    capsys.readouterr()
    assert main(["bench", "plot", str(path), "--out", str(tmp_path / "x.png")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
