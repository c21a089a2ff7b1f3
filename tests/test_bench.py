"""`diffutron-engine bench` end to end on a small version of the real architecture."""

import json

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
