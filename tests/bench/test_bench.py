"""`diffutron-engine bench` end to end on a small version of the real architecture."""

import json
import os
import subprocess
import sys
import warnings

import pytest

from where import ROOT
from diffutron_engine.cli.main import main


@pytest.mark.slow
def test_bench_reports_every_mode_and_ends_with_json(capsys, tmp_path):
    code = main(["bench", "--layers", "2", "--vocab-size", "2048", "--prompt-len", "8", "--new-tokens", "8",
                 "--block-size", "4", "--steps", "8", "--batch-size", "2", "--modes", "reference,exact,dual,fast",
                 "--save", str(tmp_path), "--tag", "t"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    report = json.loads(out[-1])
    assert set(report["modes"]) == {"reference", "exact", "dual", "fast"}
    exact = report["modes"]["exact"]
    assert exact["agreement"] == 100.0 and exact["forwards_per_token"] == 1.0 and exact["tokens_per_s"] > 0
    assert report["modes"]["reference"]["forwards_per_token"] == 1.0
    assert report["config"]["layers"] == 2 and "machine" in report
    assert out[0].split()[:2] == ["mode", "tok/s"]
    assert json.loads(next(tmp_path.glob("*-t.json")).read_text())["modes"].keys() == report["modes"].keys()


@pytest.mark.cext
def test_overhead_report_on_small_settings(capsys):
    """The overhead harness at tiny settings: every figure is there, ops per step do not change with the
    batch or the block, and `bench --overhead` prints a table then one JSON line."""
    from diffutron_engine.bench.overhead import OverheadConfig, format_table, run

    report = run(OverheadConfig(batches=(1, 3), blocks=(4, 8), prompt_len=8, new_tokens=32, block_size=8,
                                min_seconds=0.05), log=lambda s: None)
    assert [r["batch"] for r in report["rows"]] == [1, 3]
    for r in report["rows"]:
        assert r["hf_ms"] > 0 and r["device_step_ms"] > 0 and r["engine_step_ms"] > 0
        assert 0 < r["ops_outside_model"] < r["ops_per_step"]
    ops = {r["ops_per_step"] for r in report["rows"]} | {b["ops_per_step"] for b in report["blocks"]}
    assert len(ops) == 1
    assert report["targets"][-1]["met"] and "engine/tf" in format_table(report)


def _report(**exact):
    graphs = {"captures": 0, "replays": 16, "fallbacks": 0, "warmups": 0}
    return {"config": {"temperature": 0.0, "device": "cuda", "cuda_graphs": True},
            "modes": {"reference": {"agreement": 100.0, "extra": {"ms_per_step": 2.0}},
                      "exact": {"agreement": 100.0, "extra": {"ms_per_step": 1.0, "graphs": dict(graphs)}, **exact},
                      "dual": {"agreement": 80.0, "extra": {"ms_per_step": 0.5, "graphs": dict(graphs)}}}}


def test_problems_lists_what_makes_a_report_invalid():
    from diffutron_engine.bench.throughput import problems

    assert problems(_report()) == []  # the cache modes are approximations: their agreement is no problem
    bad = _report(agreement=99.5)
    bad["modes"]["exact"]["extra"]["graphs"].update(captures=2, fallbacks=3, warmups=1)
    del bad["modes"]["dual"]["extra"]["graphs"]
    found = problems(bad)
    assert len(found) == 5, found
    assert found[0].startswith("exact: 99.5% of generated tokens agree")
    assert "3 step(s) ran eagerly" in found[1]
    assert found[2].startswith("exact: 1 step(s) of a shape first seen inside the timed region ran eagerly")
    assert "2 CUDA graph capture(s) inside the timed region" in found[3]
    assert found[4].startswith("dual: CUDA graphs were asked for but the run reports no graph counters")
    first_seen = _report()  # a shape first seen while timed: its step ran eagerly, nothing else shows it
    first_seen["modes"]["dual"]["extra"]["graphs"].update(warmups=2, replays=14)
    assert problems(first_seen) == ["dual: 2 step(s) of a shape first seen inside the timed region ran eagerly "
                                    "as CUDA graph warm-ups (the warm-up did not run every step shape)"]
    sampled = _report(agreement=80.0)
    sampled["config"]["temperature"] = 0.7  # sampled tokens are the oracle's in distribution, not draw by draw
    assert problems(sampled) == []
    half = _report(agreement=50.0)
    half["config"]["dtype"] = "bfloat16"  # other roundings than the oracle's: a figure, not a rule
    assert problems(half) == []
    half["config"]["dtype"] = "float32"
    assert problems(half) == ["exact: 50% of generated tokens agree with the oracle's; greedy exact mode "
                              "must give the oracle's tokens (100%)"]
    cpu = _report()
    cpu["config"]["device"] = "cpu"  # graphs are ignored on CPU: no counters expected
    for m in cpu["modes"].values():
        m["extra"].pop("graphs", None)
    assert problems(cpu) == []


@pytest.mark.parametrize("failing", [False, True], ids=["graphs", "failing-captures"])
def test_bench_warms_up_on_the_timed_batch(monkeypatch, failing):
    """With graphs (on CPU, tests/engine/test_cuda_graphs.py's stand-in), every step of the timed run is a replay:
    the warm-up ran the same batch, so nothing is first seen or captured while timed. Captures that fail
    are counted and make the report invalid."""
    import diffutron_engine.engine as engine_pkg
    from diffutron_engine.bench.throughput import BenchConfig, problems, run
    from graph_util import CPUStepGraphs

    class GraphedEngine(engine_pkg.Engine):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.runner.graphs = CPUStepGraphs(fail=lambda key: failing)

    monkeypatch.setattr(engine_pkg, "Engine", GraphedEngine)
    modes = ("reference", "exact", "dual") if not failing else ("exact",)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the failed captures' warnings
        report = run(BenchConfig(layers=2, vocab_size=2048, prompt_len=8, new_tokens=8, block_size=4, steps=8,
                                 batch_size=2, modes=modes), log=lambda s: None)
    counts = {m: report["modes"][m]["extra"]["graphs"] for m in modes if m != "reference"}
    if not failing:
        assert counts == {m: {"captures": 0, "replays": 8, "fallbacks": 0, "warmups": 0}
                          for m in counts}  # 8 steps, all replays
        assert "graphs" not in report["modes"]["reference"]["extra"]
        assert report["modes"]["exact"]["agreement"] == 100.0 and problems(report) == []
    else:
        assert counts == {"exact": {"captures": 0, "replays": 0, "fallbacks": 8, "warmups": 0}}
        assert problems(report) == ["exact: 8 step(s) ran eagerly because a CUDA graph capture failed "
                                    "(the run does not measure graph replay)"]


# ------------------------------------------------------------------------------------------ the command line
def _parse(*argv):
    from diffutron_engine.cli.main import build_parser

    return build_parser().parse_args(["bench", *argv])


def test_bench_subcommands_and_the_old_spellings_parse():
    from diffutron_engine.cli import bench

    args = _parse("throughput", "--layers", "2", "--modes", "exact, dual")
    assert (args.bench_command, args.func, args.layers, args.modes) == ("throughput", bench.run_throughput, 2,
                                                                      ("exact", "dual"))
    # no subcommand: throughput, with its defaults or the flags given
    assert _parse().func is bench.run_throughput and _parse().layers == 22
    old = _parse("--layers", "2", "--vocab-size", "1000")
    assert (old.bench_command, old.func, old.layers, old.vocab_size) == ("throughput", bench.run_throughput, 2, 1000)
    # `bench --overhead` is `bench overhead`
    assert _parse("--overhead", "--threads", "2").func is bench.run_overhead
    assert _parse("--overhead", "--threads", "2").threads == 2
    assert _parse("overhead", "--save", "x").func is bench.run_overhead
    assert _parse("eval", "--mc-num", "8").func is bench.run_eval and _parse("eval", "--mc-num", "8").mc_num == 8
    args = _parse("serve", "--num-requests", "3", "--extra-body", '{"steps": 4}')
    assert (args.func, args.num_requests, args.extra_body) == (bench.run_serve, 3, '{"steps": 4}')


@pytest.mark.parametrize("argv, shown, hidden", [
    (("bench", "--help"), ["throughput", "overhead", "eval", "serve"], []),
    (("bench", "overhead", "--help"), ["--threads", "--save", "--tag"], ["--layers", "--modes", "--overhead"]),
    (("bench", "throughput", "--help"), ["--modes", "--layers", "--cuda-graphs"], ["--overhead"]),
    (("bench", "eval", "--help"), ["--mc-num", "--token-budget"], ["--modes"]),
    (("bench", "serve", "--help"), ["--num-requests", "--extra-body", "--api-key"], ["--modes"]),
], ids=["bench", "overhead", "throughput", "eval", "serve"])
def test_bench_help(capsys, argv, shown, hidden):
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert all(s in out for s in shown) and not any(h in out for h in hidden), out


def test_bench_bad_flags_are_one_line_and_exit_2_before_torch_is_imported():
    """Each bad flag in a fresh interpreter: one line on stderr naming it, exit code 2, nothing on stdout,
    and torch never imported (the check comes before any model is built)."""
    from where import ROOT

    cases = [(["bench", "throughput", "--modes", "exact,nope"], "unknown mode(s) nope; choose from reference, exact"),
             (["bench", "--modes", "nope"], "unknown mode(s) nope"),
             (["bench", "--layers", "0"], "argument --layers: must be >= 1, got 0"),
             (["bench", "overhead", "--layers", "2"], "unrecognized arguments: --layers 2"),
             (["bench", "eval", "--vocab", "10"], "argument --vocab: must be >= 1000, got 10"),
             (["bench", "serve", "--concurrency", "0"], "argument --concurrency: must be >= 1, got 0"),
             (["bench", "serve", "--request-rate", "0"], "argument --request-rate: must be a finite number > 0"),
             (["bench", "serve", "--extra-body", "{"], "argument --extra-body: not JSON"),
             (["bench", "serv"], "invalid choice: 'serv'")]
    code = ("import json, sys\nfrom diffutron_engine.cli.main import main\n"
            "try:\n    rc = main(json.loads(sys.argv[1]))\nexcept SystemExit as e:\n    rc = e.code\n"
            "sys.stderr.write('torch imported\\n' if 'torch' in sys.modules else '')\nsys.exit(rc)\n")
    for argv, message in cases:
        r = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
        assert r.returncode == 2 and r.stdout == "", (argv, r)
        assert len(r.stderr.splitlines()) == 1 and message in r.stderr, (argv, r.stderr)


def test_bench_modes_are_presets_without_torch():
    from diffutron_engine import config
    from diffutron_engine.bench.modes import BENCH_MODES, DEFAULT_BENCH_MODES, REFERENCE, check_modes

    assert all(isinstance(m, config.Preset) for m in BENCH_MODES.values())
    assert BENCH_MODES["fast"] is config.FAST
    assert BENCH_MODES[REFERENCE].engine == {} and BENCH_MODES[REFERENCE].request == {}
    assert BENCH_MODES["exact"].engine == {"cache": "none"} and BENCH_MODES["threshold"].request == {"threshold": 0.9}
    assert set(DEFAULT_BENCH_MODES) <= set(BENCH_MODES)
    assert check_modes(" exact,,dual ") == ("exact", "dual")
    # each once, the oracle first: the other modes' agreement is measured against its tokens
    assert check_modes("exact,fast,reference,exact") == ("reference", "exact", "fast")
    for bad in ("exact,nope", ""):
        with pytest.raises(ValueError):
            check_modes(bad)


@pytest.mark.needs("httpx")
def test_bench_serve_counts_failed_requests_and_saves_without_the_key(capsys, tmp_path, monkeypatch):
    """Against a port where nothing listens: every request is an error, exit code 1, the table then the
    JSON line; the saved report holds the arguments but never the API key."""
    monkeypatch.setenv("DIFFUTRON_API_KEY", "secret-key")
    code = main(["bench", "serve", "--url", "http://127.0.0.1:9", "--num-requests", "2", "--concurrency", "1",
                 "--save", str(tmp_path), "--tag", "t"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    assert out[0].split()[:2] == ["requests", "errors"]
    report = json.loads(out[-1])
    assert report["requests"] == 2 and report["errors"] == 2
    saved = next(tmp_path.glob("*-t-c1.json")).read_text()
    assert "secret-key" not in saved and json.loads(saved)["args"]["num_requests"] == 2


@pytest.mark.parametrize("argv,message", [
    (["--repo-a", ".", "--rounds", "0"], "error: --rounds must be >= 1"),
    (["--repo-a", ".", "--threads", "0"], "error: --threads must be >= 1"),
    (["--repo-a", ".", "--save", "/nonexistent-folder/x.json"], "error: "),
    (["--repo-a", "/nonexistent-checkout"], "error: /nonexistent-checkout is not a folder"),
    (["--repo-a", "/tmp"], "does not import diffutron_engine from /tmp"),
])
def test_overhead_ab_refuses_bad_arguments_before_measuring(argv, message):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "overhead_ab.py"), *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
