"""The GPU suite's CPU side: its kernel step at tiny shapes (Triton interpreter), the report files, and
the target table computed from a report."""

import importlib.machinery
import importlib.util
import json
import os

import pytest

HERE = os.path.dirname(__file__)
SUITE = os.path.join(HERE, "..", "bench", "gpu_suite")


def _load():
    loader = importlib.machinery.SourceFileLoader("gpu_suite", SUITE)
    spec = importlib.util.spec_from_loader("gpu_suite", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quick_suite_writes_its_reports(tmp_path, capsys):
    suite = _load()
    code = suite.main(["--quick", "--skip", "build,tests,end_to_end", "--out", str(tmp_path)])
    assert code == 0
    [js] = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    assert js.endswith("-quick.json") and os.path.exists(tmp_path / js.replace(".json", ".md"))
    report = json.load(open(tmp_path / js))
    kinds = {r["kernel"] for r in report["steps"]["kernels"]["result"]["rows"]}
    assert kinds == {"sampler", "sampler+head", "attention", "cross_entropy"}
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["status"]["kernels"] == "passed"


def test_targets_from_a_report():
    suite = _load()
    report = {"steps": {
        "kernels": {"status": "passed", "result": [
            {"kernel": "sampler", "case": "greedy N=64", "speedup": 6.0, "pct_copy_bw": 75.0},
            {"kernel": "attention", "case": "a", "speedup": 1.2}, {"kernel": "attention", "case": "b", "speedup": 0.9},
            {"kernel": "cross_entropy", "case": "c", "memory_ratio": 12.0, "time_ratio": 1.1}]},
        "end_to_end": {"status": "passed", "result": {
            "b1": {"modes": {"reference": {"tokens_per_s": 10.0}, "exact": {"tokens_per_s": 60.0, "extra": {"ms_per_step": 1.5}}}},
            "b64": {"modes": {"reference": {"tokens_per_s": 3000.0}, "exact": {"tokens_per_s": 9000.0},
                              "dual": {"tokens_per_s": 31000.0}, "fast": {"tokens_per_s": 20000.0}}}}}}}
    met = {t["target"]: t["met"] for t in suite.targets(report)}
    assert met["sampler % of copy bandwidth (N=64, V=256k, bf16)"] and met["sampler x torch chain"]
    assert not met["attention vs SDPA (worst shape)"]
    assert met["b1 exact x oracle"] and not met["b1 exact ms/step"]
    assert met["b64 best fast mode (dual) tok/s"] and met["b64 dual x oracle"]
    cfg = {"dtype": "bfloat16", "prompt_len": 64, "new_tokens": 128, "block_size": 32}
    for run in report["steps"]["end_to_end"]["result"].values():
        run.update(config=cfg, table="(table)")
    md = suite.markdown({"machine": {"python": "3", "torch": "t"}, "started": "now", **report,
                         "targets": suite.targets(report)})
    assert "| attention vs SDPA (worst shape) | 0.9 | >= 1 | NO |" in md
