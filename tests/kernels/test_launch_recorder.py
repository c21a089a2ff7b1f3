"""The launch recorder (kernels/recorder.py) and what the compile check does with a recording: launches
are written as Triton specializes them, read back into stand-ins that specialize the same way, and a
launch that no plan makes is reported as drift (the default step's unmask launch once passed an int8
stand-in for the int32 bitmap, which the plans never did, and failed to compile on every GPU)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from where import ROOT

pytestmark = pytest.mark.triton



def _unmask_once(seen=None):
    from diffutron_engine.kernels.unmask import unmask_triton

    g = torch.Generator().manual_seed(0)
    conf, tok = torch.rand(2, 8, generator=g), torch.randint(0, 50, (2, 8), generator=g)
    canvas = torch.zeros(2, 16, dtype=torch.long)
    unmask_triton(conf, tok, torch.tensor([2, 3]), torch.tensor([0, 4]), canvas, seen=seen)
    return canvas


def _plan_keys(name):
    import importlib

    from diffutron_engine.kernels import recorder

    module = importlib.import_module(f"diffutron_engine.kernels.{name}")
    return {recorder.feature_key(p) for p in module.compile_plans(sms=132)}


def test_a_launch_is_recorded_once_as_triton_specializes_it(tmp_path):
    from diffutron_engine.kernels import recorder

    path = str(tmp_path / "launches.jsonl")
    with recorder.recording(path):
        first = _unmask_once()
        _unmask_once()  # the same launch again: one line
    [line] = open(path).read().splitlines()
    rec = json.loads(line)
    assert rec["kernel"] == "diffutron_engine.kernels.unmask:_unmask_kernel"
    assert rec["grid"] == [2] and rec["keywords"]["BLOCK_L"] == 16
    assert rec["positional"][0] == {"tensor": "float32", "aligned": True}
    assert (first != 0).sum() == 5  # the launch ran: k = 2 and 3 committed
    # after the block nothing is recorded
    _unmask_once(seen=torch.zeros(2, 2, dtype=torch.int32))
    assert len(open(path).read().splitlines()) == 1


def test_nested_recordings_each_get_every_launch(tmp_path):
    from diffutron_engine.kernels import recorder

    outer, inner = str(tmp_path / "outer.jsonl"), str(tmp_path / "inner.jsonl")
    with recorder.recording(outer):
        _unmask_once()
        with recorder.recording(inner):
            _unmask_once()
            _unmask_once(seen=torch.zeros(2, 2, dtype=torch.int32))
        _unmask_once(seen=torch.zeros(2, 2, dtype=torch.int32))
    assert len(open(outer).read().splitlines()) == 2 and len(open(inner).read().splitlines()) == 2


def test_a_corrupt_recording_is_refused_and_an_unknown_argument_is_named(tmp_path):
    from diffutron_engine.kernels import recorder

    assert recorder.describe(object()) == {"other": "object"}  # recorded, never raised in the launch path
    path = tmp_path / "r.jsonl"
    rec = {"kernel": "diffutron_engine.kernels.unmask:_unmask_kernel", "grid": [1], "keywords": {},
           "positional": [{"other": "object"}]}
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match="argument of type object"):
        recorder.load(str(path))
    path.write_text("not json\n" + json.dumps(rec) + "\n")
    with pytest.raises(ValueError, match="line 1: not a recorded launch"):
        recorder.read(str(path))


def test_runtime_flags_are_never_specialized():
    """Feature switches passed as ints (has_*) must be in do_not_specialize: Triton compiles an int equal
    to 1 as a constant, so a switch left out would make one program per value, which the drift rule
    (ints are sizes) would not see."""
    import inspect

    from diffutron_engine.kernels import attention, cross_entropy, sampling, unmask

    for module in (attention, cross_entropy, sampling, unmask):
        for name, fn in vars(module).items():
            if not name.endswith("_kernel"):
                continue
            params = inspect.signature(getattr(fn, "fn", fn)).parameters
            flags = [p for p in params if p.startswith("has_")]
            # a JITFunction keeps the list itself, the interpreter's stand-in in its kwargs; names or indices
            kept = (getattr(fn, "do_not_specialize", None) or getattr(fn, "kwargs", {}).get("do_not_specialize")
                    or [])
            kept = {p if isinstance(p, str) else list(params)[p] for p in kept}
            assert set(flags) <= kept, f"{name}: {sorted(set(flags) - kept)} not in do_not_specialize"


def test_recording_without_running(tmp_path):
    from diffutron_engine.kernels import recorder

    path = str(tmp_path / "launches.jsonl")
    with recorder.recording(path, execute=False):
        canvas = _unmask_once()
    assert canvas.count_nonzero() == 0 and len(open(path).read().splitlines()) == 1


def test_replayed_stand_ins_specialize_like_the_recorded_tensors(tmp_path):
    from diffutron_engine.kernels import recorder

    path = tmp_path / "launches.jsonl"
    base = torch.zeros(64, dtype=torch.float32)
    rec = {"kernel": "diffutron_engine.kernels.unmask:_unmask_kernel", "grid": [3],
           "positional": [recorder.describe(base), recorder.describe(base[1:]), 7, 2.5, None, True],
           "keywords": {"BLOCK_L": 16}}
    path.write_text(json.dumps(rec) + "\n" + '{"kernel": "cut off')  # a killed writer's last line is skipped
    [launch] = recorder.load(str(path))
    a, b = launch.args[:2]
    assert a.dtype == b.dtype == torch.float32
    assert a.data_ptr() % 16 == 0 and b.data_ptr() % 16 != 0
    assert launch.args[2:] == (7, 2.5, None, True) and launch.options == {"BLOCK_L": 16} and launch.grid == (3,)


def test_the_default_steps_launches_are_planned(tmp_path, golden):
    """Every launch of an engine step with every op on Triton, in the default batch (greedy, no penalty:
    the unmask launch without a seen bitmap) and a batch with every per-row feature, has the argument
    types and switches of a plan: what the compile check compiles is what runs."""
    from diffutron_engine.backends import force_backend
    from diffutron_engine.config import SamplingParams
    from diffutron_engine.engine import Engine
    from diffutron_engine.kernels import recorder

    path = str(tmp_path / "launches.jsonl")
    short = dict(max_new_tokens=4, block_size=2, steps=4, early_stop=False)
    with recorder.recording(path):
        with force_backend("triton"):
            eng = Engine(golden.model, golden.tokenizer, max_batch=2)
        eng.generate([[5, 17, 23]], SamplingParams(**short))
        eng.generate([[5, 17, 23], [7, 8]], [SamplingParams(**short, repetition_penalty=1.3, temperature=0.5, seed=1),
                                             SamplingParams(**short, threshold=0.3, suppress_tokens=[5])])
    launches = recorder.load(path)
    kernels = {launch.name for launch in launches}
    assert {"_unmask_kernel", "_sample_partial_kernel", "_sample_merge_kernel", "_attention_fwd_kernel"} <= kernels
    planned = set().union(*(_plan_keys(n) for n in ("unmask", "sampling", "attention")))
    drifted = [recorder.closest_difference(recorder.feature_key(x), planned) for x in launches
               if recorder.feature_key(x) not in planned]
    assert not drifted, drifted
    # the unmask launch without a bitmap passes an int32 stand-in, as the plans do
    no_seen = [x for x in launches if x.name == "_unmask_kernel" and x.args[18] == 0]
    assert no_seen and all(x.args[11].dtype == torch.int32 for x in no_seen)


def test_a_stand_in_of_another_type_is_drift():
    from diffutron_engine.kernels import recorder

    planned = _plan_keys("unmask")
    key = next(iter(planned))
    bad = tuple("seen_ptr=*int8" if k == "seen_ptr=*int32" else k for k in key)
    assert bad not in planned
    assert recorder.closest_difference(bad, planned) == "launched seen_ptr=*int8; planned seen_ptr=*int32"
    assert recorder.closest_difference(("x:_other",), planned) == "no plan launches this kernel"


def _ptxas_available():
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.slow
@pytest.mark.skipif(not _ptxas_available(), reason="needs triton's ptxas (the triton wheel ships it)")
def test_the_compile_check_fails_a_recorded_launch_that_drifted(tmp_path):
    """A recorded unmask launch with the int8 stand-in: reported as drift, and its compile fails."""
    from diffutron_engine.kernels import recorder

    good = str(tmp_path / "good.jsonl")
    with recorder.recording(good, execute=False):
        _unmask_once()
    rec = json.loads(open(good).read())
    rec["positional"][11]["tensor"] = "int8"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rec) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_compile_check.py"), "--targets", "90",
                           "--kernels", "unmask", "--jobs", "2", "--recorded", good, "--recorded", str(bad)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 1
    assert summary["drift"] == 1 and summary["failures"] == 2 and summary["recorded_launches"] == 2
    assert "launched seen_ptr=*int8; planned seen_ptr=*int32" in proc.stdout
    assert "atomic_or does not support int8" in proc.stdout


def test_bad_recorded_paths_are_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_compile_check.py"),
                           "--recorded", str(tmp_path / "missing.jsonl")], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --recorded")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "record_launches.py"), "--out",
                           str(tmp_path / "no" / "such" / "f.jsonl")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "existing folder" in proc.stderr
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "record_launches.py"), "--out",
                           str(tmp_path / "f.jsonl"), "--skip", "engin"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown source(s) engin" in proc.stderr
    assert not os.path.exists(tmp_path / "f.jsonl")
