"""`diffutron-engine bench` end to end on a small version of the real architecture."""

import json
import warnings

import pytest

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
    from diffutron_engine.overhead import OverheadConfig, format_table, run

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
    from diffutron_engine.benchmark import problems

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
    from diffutron_engine.benchmark import BenchConfig, problems, run
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
