"""The GPU compile check (bench/gpu_compile_check.py): every kernel's launch plans compile for a real GPU
target without spills. The full check (three targets, every configuration) is `make gpu-compile-check`,
which CI runs; here one target, in a subprocess (the suite's TRITON_INTERPRET=1 would hand the compiler
interpreter functions)."""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch
from where import ROOT

SCRIPT = os.path.join(ROOT, "bench", "gpu_compile_check.py")


def _ptxas() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else None


needs_ptxas = pytest.mark.skipif(_ptxas() is None, reason="needs triton's ptxas (the triton wheel ships it)")


def _check(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


@needs_ptxas
@pytest.mark.parametrize("kernels", ["cross_entropy"])  # the other kernels: make gpu-compile-check (CI)
def test_kernels_compile_for_sm90_without_spills(kernels, tmp_path):
    out = tmp_path / "rows.json"
    proc = _check("--targets", "90", "--kernels", kernels, "--jobs", "2", "--json-out", str(out))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert summary["failures"] == 0 and summary["spill_bytes"] == 0
    assert summary["targets"] == ["sm_90"] and summary["configs"] >= 4
    rows = json.loads(out.read_text())["rows"]
    assert {r["file"] for r in rows} == set(kernels.split(","))
    assert all(r["status"] == "ok" and r["registers"] <= 255 and r["shared"] <= 232448 for r in rows)


def test_bad_arguments_are_refused():
    proc = _check("--targets", "75")
    assert proc.returncode == 2 and "targets must be among" in proc.stderr
    proc = _check("--kernels", "softmax")
    assert proc.returncode == 2 and "kernels among" in proc.stderr
    env_check = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=120, cwd=ROOT,
                               env=dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT))
    assert env_check.returncode == 2 and "unset it" in env_check.stderr


@pytest.mark.parametrize("name", ["sampling", "unmask", "attention", "cross_entropy"])
def test_every_kernel_file_plans_its_configurations(name):
    """Each kernel file derives its configurations from its launcher's plan function; the plans are
    launches whose grids fit CUDA's limits at the model's shapes (Launch checks them)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton")
    module = importlib.import_module(f"diffutron_engine.kernels.{name}")
    plans = module.compile_plans(sms=132)
    assert plans and all(p.grid and all(g >= 1 for g in p.grid) for p in plans)
    assert all(p.label for p in plans)


def test_grids_past_cudas_limits_are_refused():
    from diffutron_engine.kernels.launch import Launch

    with pytest.raises(ValueError, match="over CUDA's limit of 65535"):
        Launch(kernel=None, grid=(1, 70_000), args=())
    Launch(kernel=None, grid=(2**31 - 1, 65535), args=())


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_attention_grid_holds_large_batches():
    """Batch x heads goes on grid axis 0 (up to 2**31 - 1): 8,192 rows x 12 heads is 98,304 programs,
    past axis 1's 65,535."""
    from diffutron_engine.kernels.attention import plan_attention

    meta = torch.device("meta")
    B, H, Q, D, T = 8192, 12, 32, 64, 512
    q = torch.empty(B, H, Q, D, dtype=torch.bfloat16, device=meta)
    kv = torch.empty(B, H, T, D, dtype=torch.bfloat16, device=meta)
    launch = plan_attention(q, kv, kv, torch.empty(B, dtype=torch.long, device=meta),
                            torch.empty(B, Q, dtype=torch.long, device=meta),
                            torch.empty(B, T, dtype=torch.bool, device=meta), 64, None,
                            torch.empty(B, H, Q, D, dtype=torch.bfloat16, device=meta))
    assert launch.grid == (B * H, 1)
