"""`diffutron-engine bench` end to end on a small version of the real architecture."""

import json

from diffutron_engine.cli.main import main


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
