"""The GPU suite's CPU side: its kernel step at tiny shapes (Triton interpreter), the report files on
every path (failed, timed-out and crashing steps), process groups killed with what they started, reruns
of single steps, bad arguments, and the target table and markdown computed from a report."""

import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
import types

import pytest
from where import ROOT

SUITE = os.path.join(ROOT, "bench", "gpu_suite")


def _load():
    loader = importlib.machinery.SourceFileLoader("gpu_suite", SUITE)
    spec = importlib.util.spec_from_loader("gpu_suite", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def _gone(pid: int, wait: float = 5.0) -> bool:
    """Whether process pid has ended (a zombie waiting for its reaper counts as ended)."""
    end = time.monotonic() + wait
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.05)
    return False


# Stand-ins for the steps' child processes: each gets its step folder as argv[1] and writes
# [status, result] to result.json there, as the real child does (or does not, when it crashes).
_WRITE = "import json, os, sys, time\ndef put(status, result):\n" \
         "    json.dump([status, result], open(os.path.join(sys.argv[1], 'result.json'), 'w'))\n"
FAKE_STEPS = {
    # crashes before writing a result
    "build": "print('compiling the extension', flush=True)\nraise RuntimeError('the compiler exploded')\n",
    # writes a partial result, then hangs past its bound
    "kernels": "put('running', {'rows': [{'kernel': 'sampler', 'case': 'greedy N=4', 'ours_ms': 1.5}]})\n"
               "print('measuring the sampler', flush=True)\ntime.sleep(60)\n",
    # a failed status with a result of an unexpected shape
    "end_to_end": "put('failed', ['not', 'a', 'dict'])\n",
    "tests": "put('passed', {'summary': '3 passed in 0.10s', 'passed': 3, 'tests': []})\n",
}


def _fake(suite, monkeypatch, steps=None, bound=2):
    steps = {**FAKE_STEPS, **(steps or {})}

    def step_command(self, name, step_dir, bound):
        return [sys.executable, "-c", _WRITE + steps[name], step_dir]

    monkeypatch.setattr(suite.Suite, "step_command", step_command)
    monkeypatch.setattr(suite, "machine", lambda: {"python": "3", "torch": "t"})
    monkeypatch.setattr(suite, "BOUNDS", {k: (bound, bound) for k in suite.BOUNDS})


def _reports(folder):
    return sorted(os.listdir(folder))


@pytest.mark.slow
def test_quick_suite_writes_its_reports(tmp_path, capsys):
    suite = _load()
    code = suite.main(["--quick", "--skip", "build,tests,end_to_end", "--out", str(tmp_path)])
    assert code == 0
    [js] = [p for p in os.listdir(tmp_path) if p.endswith(".json")]
    stem = js[: -len(".json")]
    assert stem.endswith("-quick") and _reports(tmp_path) == [stem + ".json", stem + ".log", stem + ".md"]
    report = json.load(open(tmp_path / js))
    rows = report["steps"]["kernels"]["result"]["rows"]
    assert {r["kernel"] for r in rows} == {"sampler", "sampler+head", "attention", "cross_entropy"}
    # the sampler timed twice: the call and its pre-resolved launches (params resolved once, on the
    # logits' own device)
    for r in rows:
        if r["kernel"] == "sampler":
            assert r["kernel_ms"] > 0 and r["kernel_timer"] == "perf_counter" and r["resolved_params"] == 1
    assert "[suite] kernels: passed" in (tmp_path / (stem + ".log")).read_text()
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["status"] == {"kernels": "passed"}


def test_failed_crashed_and_timed_out_steps_still_leave_every_report(tmp_path, monkeypatch, capsys):
    suite = _load()
    _fake(suite, monkeypatch)
    code = suite.main(["--quick", "--out", str(tmp_path)])
    assert code == 1
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    assert summary["status"] == {"build": "failed", "kernels": "timeout", "end_to_end": "failed", "tests": "passed"}
    stem = summary["files"]["json"][: -len(".json")]
    assert _reports(tmp_path) == sorted(os.path.basename(stem) + e for e in (".json", ".log", ".md"))
    report = json.load(open(stem + ".json"))
    steps = report["steps"]
    assert "exited with code 1 before writing its result" in steps["build"]["result"]["error"]
    assert "the compiler exploded" in steps["build"]["result"]["log_tail"]
    # the killed step keeps what it had measured, and its output up to the kill
    assert steps["kernels"]["result"]["rows"][0]["ours_ms"] == 1.5
    assert "killed after 2 s" in steps["kernels"]["result"]["error"]
    assert "measuring the sampler" in steps["kernels"]["result"]["log_tail"]
    assert steps["end_to_end"]["result"]["result"] == ["not", "a", "dict"]
    md = open(stem + ".md").read()
    assert "| kernels | timeout |" in md and "the compiler exploded" in md and "| sampler | greedy N=4 | 1.5 |" in md
    log = open(stem + ".log").read()
    assert "compiling the extension" in log and "measuring the sampler" in log


def test_a_step_that_raises_in_process_still_leaves_every_report(tmp_path, monkeypatch, capsys):
    suite = _load()
    _fake(suite, monkeypatch)

    def step(self, name, bound):
        raise RuntimeError("the suite itself broke")

    monkeypatch.setattr(suite.Suite, "step", step)
    with pytest.raises(RuntimeError):
        suite.main(["--quick", "--only", "build", "--out", str(tmp_path)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "the suite itself broke" in summary["interrupted"]
    for path in summary["files"].values():
        assert os.path.exists(path)
    assert "The suite was interrupted" in open(summary["files"]["md"]).read()


def test_a_suite_terminated_mid_step_kills_the_step_and_still_leaves_every_report(tmp_path, monkeypatch, capsys):
    suite = _load()
    pid_file = tmp_path / "pid"
    # the step terminates the suite itself (SIGTERM, as a session's time limit would), then hangs
    step = ("import signal\nput('running', {'rows': [{'kernel': 'attention', 'case': 'B=1', 'ours_ms': 2.0}]})\n"
            f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
            "os.kill(os.getppid(), signal.SIGTERM)\ntime.sleep(60)\n")
    _fake(suite, monkeypatch, {"kernels": step}, bound=30)
    with pytest.raises(SystemExit) as info:
        suite.main(["--quick", "--out", str(tmp_path / "out")])
    assert info.value.code == 143
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["status"] == {"build": "failed", "kernels": "interrupted"}
    report = json.load(open(summary["files"]["json"]))
    assert report["steps"]["kernels"]["result"]["rows"][0]["ours_ms"] == 2.0
    assert "| kernels | interrupted |" in open(summary["files"]["md"]).read()
    assert _gone(int(pid_file.read_text()))


def test_markdown_of_a_report_whose_every_step_failed():
    suite = _load()
    report = {"started": "now", "steps": {
        "build": {"status": "failed", "result": {"error": "RuntimeError: no compiler", "log_tail": "x\ny"}},
        "kernels": {"status": "timeout", "result": {"rows": [{"kernel": "sampler"}, "junk"], "error": "killed"}},
        "end_to_end": {"status": "failed", "result": {"b1": {"error": "OutOfMemoryError: CUDA"},
                                                       "b64": {"modes": {"exact": {"extra": {"graphs": {
                                                           "captures": 3, "replays": 120, "fallbacks": 1}}}},
                                                               "problems": ["exact: 1 eager fallback"]},
                                                       "error": "b1: OutOfMemoryError | b64: problems"}},
        "tests": {"status": "running"},
        "odd": "not a dict"}}
    md = suite.markdown(report)
    for text in ("no compiler", "| kernels | timeout |", "OutOfMemoryError: CUDA", "| exact | 3 | 120 | 1 |",
                 "problem: exact: 1 eager fallback", "| tests | running |"):
        assert text in md
    assert suite.targets(report) == []
    assert suite.markdown({}).startswith("# GPU suite")
    assert "could not be rendered" not in md


def test_a_step_timeout_kills_its_whole_group_and_the_groups_it_started(tmp_path, monkeypatch):
    suite = _load()
    pids = tmp_path / "pids"
    hang = f"""
import subprocess
same = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
own = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)
with open(os.environ['{suite.GROUPS_ENV}'], 'a') as f:
    f.write(f'{{own.pid}}\\n')
open({str(pids)!r}, 'w').write(f'{{same.pid}} {{own.pid}}')
print('started both', flush=True)
time.sleep(60)
"""
    _fake(suite, monkeypatch, {"build": hang}, bound=3)
    t = time.monotonic()
    assert suite.main(["--quick", "--only", "build", "--out", str(tmp_path / "out")]) == 1
    assert time.monotonic() - t < 20
    same, own = map(int, pids.read_text().split())
    assert _gone(same) and _gone(own)


def test_run_group_kills_a_grandchild_at_its_deadline(tmp_path):
    suite = _load()
    pid_file = tmp_path / "pid"
    code = textwrap.dedent(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
        open({str(pid_file)!r}, 'w').write(str(child.pid))
        print('waiting on the grandchild', flush=True)
        time.sleep(60)
    """)
    echo = types.SimpleNamespace(text="")
    t = time.monotonic()
    rc, tail = suite.run_group([sys.executable, "-c", code], 2, str(tmp_path / "out.txt"),
                               echo=lambda s: setattr(echo, "text", echo.text + s))
    assert rc is None and time.monotonic() - t < 10
    assert "waiting on the grandchild" in tail and "waiting on the grandchild" in echo.text
    assert _gone(int(pid_file.read_text()))


@pytest.mark.slow
def test_the_tests_step_stops_pytest_at_its_own_deadline(tmp_path, monkeypatch):
    suite = _load()
    test_file = tmp_path / "test_hangs.py"
    test_file.write_text("import time\n\nimport pytest\n\npytestmark = pytest.mark.gpu_suite\n\n"
                         "def test_quick():\n    pass\n\ndef test_hangs():\n    time.sleep(60)\n")
    monkeypatch.setattr(suite, "GPU_TEST_PATHS", [str(test_file)])
    ctx = types.SimpleNamespace(quick=False, dir=str(tmp_path), left=lambda: 12.0)
    with pytest.raises(suite.StepError) as info:
        suite.gpu_tests(ctx)
    exc = info.value
    assert exc.status == "timeout" and exc.result["passed"] == 1
    assert exc.result["running_when_killed"].endswith("test_hangs")


def test_the_tests_step_fails_when_no_test_carries_the_marker(tmp_path, monkeypatch):
    suite = _load()
    test_file = tmp_path / "test_unmarked.py"
    test_file.write_text("def test_quick():\n    pass\n")
    monkeypatch.setattr(suite, "GPU_TEST_PATHS", [str(test_file)])
    ctx = types.SimpleNamespace(quick=False, dir=str(tmp_path), left=lambda: 60.0)
    with pytest.raises(suite.StepError, match="no test under .* carries the gpu_suite marker"):
        suite.gpu_tests(ctx)


def test_failures_are_summed_up_by_their_first_error_line():
    suite = _load()
    text = textwrap.dedent("""\
        =================================== FAILURES ===================================
        __________________ test_one[a] __________________

            def test_one():
        >       assert f() == 2
        E       assert 1 == 2
        E        +  where 1 = f()
        __________________ test_two __________________
        E   RuntimeError: boom
        =========================== short test summary info ============================
        FAILED tests/x.py::test_one[a] - assert 1 == 2
        """)
    assert suite._first_errors(text) == {"test_one[a]": "assert 1 == 2", "test_two": "RuntimeError: boom"}


def test_the_gpu_tier_is_the_marked_tests():
    """The tier is what the marker selects: the kernel tests, the backends, the CUDA graphs and the engine
    on every backend, wherever they sit in tests/."""
    suite = _load()
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *suite.gpu_test_args()],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    files = {line.split("::")[0] for line in proc.stdout.splitlines() if "::" in line}
    for f in ("kernels/test_kernel_sampling.py", "kernels/test_kernel_unmask.py", "kernels/test_kernel_attention.py",
              "kernels/test_kernel_cross_entropy.py", "kernels/test_backends.py", "engine/test_cuda_graphs.py",
              "engine/test_engine.py"):
        assert "tests/" + f in files, (f, sorted(files))
    assert "tests/engine/test_engine.py::test_exact_mode_on_every_backend[torch]" in proc.stdout
    assert not any("server/" in f or "training/" in f for f in files)


def test_only_writes_its_own_report_beside_the_full_run(tmp_path, monkeypatch, capsys):
    suite = _load()
    passing = "put('passed', {})\n"
    _fake(suite, monkeypatch, {k: passing for k in FAKE_STEPS})
    assert suite.main(["--quick", "--out", str(tmp_path)]) == 0
    full = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert suite.main(["--quick", "--only", "end_to_end,tests", "--out", str(tmp_path)]) == 0
    rerun = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rerun["files"]["json"].endswith("-quick-rerun-end-to-end-tests.json")
    assert len(_reports(tmp_path)) == 6 and full["files"]["json"] != rerun["files"]["json"]
    assert list(json.load(open(full["files"]["json"]))["steps"]) == list(suite.BOUNDS)
    assert list(json.load(open(rerun["files"]["json"]))["steps"]) == ["end_to_end", "tests"]


def test_a_rerun_takes_the_bound_it_is_given(tmp_path, monkeypatch, capsys):
    """The full run's bound kills a slow step; its rerun with --bound gives it the time it needs."""
    suite = _load()
    slow = "time.sleep(1.5)\nput('passed', {})\n"
    _fake(suite, monkeypatch, {"end_to_end": slow}, bound=0.5)
    suite.main(["--quick", "--only", "end_to_end", "--out", str(tmp_path)])
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["status"]["end_to_end"] == "timeout"
    assert suite.main(["--quick", "--only", "end_to_end", "--bound", "end_to_end=20", "--out", str(tmp_path)]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["status"]["end_to_end"] == "passed"
    # the second rerun of the same step is written beside the first, which stays
    assert again["files"]["json"] == first["files"]["json"].replace(".json", "-2.json")
    assert json.load(open(first["files"]["json"]))["steps"]["end_to_end"]["status"] == "timeout"


@pytest.mark.parametrize("args, says", [
    (["--skip", "kernels,nope"], "unknown step(s) nope"),
    (["--only", "bild"], "unknown step(s) bild"),
    (["--only", "build", "--skip", "tests"], "not both"),
    (["--out", "{file}"], "is not a folder"),
    (["--out", "{file}/sub"], "is not a folder"),
    (["--bound", "end_to_end=ten"], "--bound takes STEP=SECONDS"),
    (["--bound", "end2end=30"], "--bound takes STEP=SECONDS"),
    (["--bound", "tests=-1"], "--bound takes STEP=SECONDS"),
])
def test_bad_arguments_exit_2_and_write_nothing(tmp_path, capsys, args, says):
    suite = _load()
    afile = tmp_path / "a-file"
    afile.write_text("x")
    args = [a.format(file=afile) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "reports")]
    assert suite.main(["--quick", *args]) == 2
    cap = capsys.readouterr()
    assert cap.out == "" and says in cap.err and len(cap.err.strip().splitlines()) == 1
    assert _reports(tmp_path) == ["a-file"] and afile.read_text() == "x"


def test_bad_arguments_exit_2_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, SUITE, "--quick", "--only", "nope", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.startswith("error: unknown step(s) nope")
    assert not os.path.exists(tmp_path / "r")


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
