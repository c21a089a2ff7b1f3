"""Fused linear cross-entropy (kernels/cross_entropy.py) vs the plain torch reference.

Without a GPU the Triton kernels run in interpreter mode on CPU tensors; the env var must be set
before triton is first imported. Tolerance (project rule): the fused path's error against a float64
reference on the same (rounded) inputs must be at most twice the error of the plain reference run in
the inputs' own precision, plus a tiny floor relative to the tensor's scale.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from diffutron_engine.backends import Ops, force_backend  # noqa: E402
from diffutron_engine.kernels import cross_entropy as ce  # noqa: E402
from diffutron_engine.kernels.cross_entropy import (  # noqa: E402
    linear_cross_entropy_reference,
    linear_cross_entropy_torch,
    linear_cross_entropy_triton,
)

# the GPU tier: bench/gpu_suite runs this file on the GPU machine
pytestmark = pytest.mark.gpu_suite

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton)]
NAMES = ("loss", "grad hidden", "grad weight", "grad bias")
IMPLS = {"torch": linear_cross_entropy_torch, "triton": linear_cross_entropy_triton}


def _fused(*args, backend="torch", **kw):
    """The fused linear cross-entropy on one backend's implementation."""
    return IMPLS[backend](*args, **kw)


def _case(N=13, H=16, V=777, bias=True, weighted=True, ignored=(3, 8), seed=0, ignore_index=-100):
    """float32 CPU master inputs: hidden, weight, bias (or None), target, row_weight (or None)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5 * 2
    b = torch.randn(V, generator=g) if bias else None
    target = torch.randint(0, V, (N,), generator=g)
    target[[i for i in ignored if i < N]] = ignore_index
    row_weight = torch.rand(N, generator=g) * 2 + 0.1 if weighted else None
    return hidden, weight, b, target, row_weight


def _leaf(t, dtype=torch.float32):
    """A fresh leaf on DEVICE (never the master tensor itself, whose .grad would accumulate)."""
    return t.detach().to(DEVICE, dtype, copy=True).requires_grad_()


def _run(fn, case, dtype, **kw):
    """Loss and gradients (hidden, weight, bias) of fn on the case's inputs cast to dtype, as float64."""
    hidden, weight, bias, target, row_weight = case
    leaves = [None if t is None else _leaf(t, dtype) for t in (hidden, weight, bias)]
    rw = None if row_weight is None else row_weight.to(DEVICE)
    loss = fn(leaves[0], leaves[1], target.to(DEVICE), bias=leaves[2], row_weight=rw, **kw)
    loss.backward()
    return [loss.detach().double()] + [t.grad.double() for t in leaves if t is not None]


def _exact(case, dtype, **kw):
    """float64 reference on the inputs rounded to dtype."""
    rounded = [None if t is None else t.to(dtype).double() for t in case[:3]] + list(case[3:])
    return _run(linear_cross_entropy_reference, rounded, torch.float64, **kw)


def _assert_within_rule(got, naive, exact, what, dtype=torch.float32):
    """err <= 2 x naive err + floor; the floor is EPS, or half an ulp of dtype (the rounding of a result
    stored in dtype, which a naive path can be lucky enough to avoid), relative to the largest entry."""
    rel_floor = max(EPS, torch.finfo(dtype).eps / 2)
    for name, g, n, e in zip(NAMES, got, naive, exact):
        err = (g - e).abs().max().item()
        base = (n - e).abs().max().item()
        floor = rel_floor * e.abs().max().item()
        assert err <= 2 * base + floor, f"{what} {name}: error {err:.3e} > 2 x naive {base:.3e} + {floor:.1e}"


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles smaller than V so that the loss pass loops and both passes have a masked last tile."""
    monkeypatch.setattr(ce, "LSE_BLOCK_V", 256)
    monkeypatch.setattr(ce, "GRAD_BLOCK_V", 128)


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_matches_reference(backend, bias, reduction):
    case = _case(bias=bias)  # N = 13 rows in chunks of 4, V = 777 (no multiple of any tile)
    got = _run(_fused, case, torch.float32, reduction=reduction, chunk_rows=4, backend=backend)
    naive = _run(linear_cross_entropy_reference, case, torch.float32, reduction=reduction)
    _assert_within_rule(got, naive, _exact(case, torch.float32, reduction=reduction), f"{backend} fp32")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_matches_reference(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the Triton interpreter truncates fp32 -> bf16 stores (GPUs round to nearest even)")
    case = _case(H=32, V=1000, seed=1)
    got = _run(_fused, case, dtype, chunk_rows=4, backend=backend)
    naive = _run(linear_cross_entropy_reference, case, dtype, compute_dtype=dtype)
    _assert_within_rule(got, naive, _exact(case, dtype), f"{backend} {dtype}", dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_chunking_and_unweighted_rows(backend):
    case = _case(N=9, H=32, V=1000, weighted=False, ignored=(), seed=2)
    got = _run(_fused, case, torch.float32, reduction="mean", backend=backend)
    naive = _run(linear_cross_entropy_reference, case, torch.float32, reduction="mean")
    _assert_within_rule(got, naive, _exact(case, torch.float32, reduction="mean"), backend)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_gives_zero_loss_and_grads(backend, reduction):
    hidden, weight, bias, target, row_weight = _case(N=5, V=300, ignored=range(5))
    row_weight[1] = float("inf")  # e.g. 1/t at t = 0 on a row that carries no loss: must not leak
    got = _run(_fused, (hidden, weight, bias, target, row_weight), torch.float32,
               reduction=reduction, chunk_rows=2, backend=backend)
    for name, t in zip(NAMES, got):
        assert torch.equal(t, torch.zeros_like(t)), f"{name} is not exactly zero"


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_index_inside_the_vocabulary(backend):
    case = _case(N=7, V=300, ignored=(0, 4), ignore_index=5, seed=3)
    got = _run(_fused, case, torch.float32, ignore_index=5, chunk_rows=3, backend=backend)
    naive = _run(linear_cross_entropy_reference, case, torch.float32, ignore_index=5)
    _assert_within_rule(got, naive, _exact(case, torch.float32, ignore_index=5), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_weight_accumulates_both_gradients(backend):
    """The decoder is the embedding matrix: its gradient is the CE part plus the lookup part."""
    hidden0, weight0, _, target, row_weight = _case(N=11, V=500, seed=4)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 500, (11,), generator=g)
    proj0 = torch.randn(16, 16, generator=g) / 4

    def grads(ce_fn, dtype, **kw):
        weight = _leaf(weight0, dtype)
        proj = _leaf(proj0, dtype)
        hidden = torch.tanh(F.embedding(ids.to(DEVICE), weight) @ proj)
        loss = ce_fn(hidden, weight, target.to(DEVICE), row_weight=row_weight.to(DEVICE), **kw)
        loss.backward()
        return [loss.detach().double(), proj.grad.double(), weight.grad.double()]

    got = grads(_fused, torch.float32, chunk_rows=4, backend=backend)
    naive = grads(linear_cross_entropy_reference, torch.float32)
    exact = grads(linear_cross_entropy_reference, torch.float64)
    _assert_within_rule(got, naive, exact, f"{backend} tied")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_computes_the_loss_only(backend, monkeypatch):
    def no_gradient_pass(*args):
        raise AssertionError("the gradient pass ran without any gradient wanted")

    monkeypatch.setattr(ce, f"_grad_pass_{backend}", no_gradient_pass)
    case = _case(seed=6)
    hidden, weight, bias = (_leaf(t) for t in case[:3])
    target, row_weight = case[3].to(DEVICE), case[4].to(DEVICE)
    with torch.no_grad():
        loss = _fused(hidden, weight, target, bias, row_weight, chunk_rows=4, backend=backend)
    assert not loss.requires_grad and loss.dtype == torch.float32
    # Inputs that want no gradient take the same path with grad mode on.
    plain = _fused(hidden.detach(), weight.detach(), target, bias.detach(), row_weight,
                                       backend=backend)
    naive = linear_cross_entropy_reference(hidden.detach(), weight.detach(), target, bias.detach(), row_weight)
    exact = _exact(case, torch.float32)[0]
    for got in (loss, plain):
        assert abs(got.double() - exact) <= 2 * abs(naive.double() - exact) + EPS * abs(exact)


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_losses_for_evaluation(backend):
    """reduction="none": each row's weighted loss (0 on ignored rows) within the rule, row by row; and
    it refuses a gradient rather than silently returning a tensor that cannot be backpropagated."""
    hidden, weight, bias, target, row_weight = _case(N=9, seed=7)
    args = [t.to(DEVICE) for t in (hidden, weight, target)]
    kw = dict(bias=bias.to(DEVICE), row_weight=row_weight.to(DEVICE), reduction="none")
    with torch.no_grad():
        got = _fused(*args, chunk_rows=4, backend=backend, **kw).double()
    naive = linear_cross_entropy_reference(*args, **kw).double()
    exact = linear_cross_entropy_reference(*(t.double() if t.is_floating_point() else t for t in args),
                                           bias=bias.double(), row_weight=row_weight.double(), reduction="none")
    assert got.shape == (9,) and got[3] == 0 and got[8] == 0
    assert ((got - exact).abs() <= 2 * (naive - exact).abs() + EPS * exact.abs().max()).all()
    with pytest.raises(ValueError, match="no gradient"):
        _fused(_leaf(hidden), *args[1:], backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_inputs_that_need_it_get_a_gradient(backend):
    hidden0, weight0, bias0, target, row_weight = _case(N=6, V=200, seed=7)
    hidden = _leaf(hidden0)
    weight, bias = weight0.to(DEVICE), bias0.to(DEVICE)  # a frozen decoder
    _fused(hidden, weight, target.to(DEVICE), bias, chunk_rows=4, backend=backend).backward()
    ref_hidden = _leaf(hidden0)
    linear_cross_entropy_reference(ref_hidden, weight, target.to(DEVICE), bias).backward()
    assert weight.grad is None and bias.grad is None
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_gradient_scales_and_second_backward_raises(backend):
    hidden0, weight0, _, target, _ = _case(N=5, V=200, seed=8)
    runs = []
    for factor in (1.0, 3.0):
        hidden, weight = _leaf(hidden0), _leaf(weight0)
        loss = _fused(hidden, weight, target.to(DEVICE), backend=backend)
        (factor * loss).backward(retain_graph=True)
        runs.append((hidden.grad, weight.grad))
    for one, three in zip(*runs):
        torch.testing.assert_close(three, 3 * one)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


def test_empty_batch():
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    loss = _fused(hidden, weight, torch.zeros(0, dtype=torch.long), reduction="mean")
    loss.backward()
    assert loss.item() == 0 and hidden.grad.shape == (0, 8) and not weight.grad.any()


@pytest.mark.parametrize("forced, expected", [
    (None, "torch"),  # CPU tensors: torch by default
    ("torch", "torch"),
    ("cpp", "torch"),  # there is no C++ cross-entropy
    pytest.param("triton", "triton", marks=pytest.mark.triton),
])
def test_backend_choice(monkeypatch, forced, expected):
    """The project's rule (backends.Ops: forced backend, else triton on CUDA) picks the backend once;
    ops.cross_entropy runs that backend's passes."""
    monkeypatch.delenv("DIFFUTRON_BACKEND", raising=False)
    used = []
    for name in ("torch", "triton"):
        def recording(*args, _name=name, _pass=getattr(ce, f"_lse_pass_{name}")):
            used.append(_name)
            return _pass(*args)
        monkeypatch.setattr(ce, f"_lse_pass_{name}", recording)
    hidden, weight, _, target, _ = _case(N=3, V=100)
    with force_backend(forced):
        ops = Ops.select(hidden.device, hidden.dtype, only=("cross_entropy",))
    assert ops.cross_entropy_backend == expected
    ops.cross_entropy(hidden, weight, target)
    assert set(used) == {expected}


def _bad(**changes):
    h, w, b, t, rw = _case(N=4, H=8, V=50)
    kw = dict(hidden=h, weight=w, target=t, bias=b, row_weight=rw)
    kw.update(changes)
    return kw


@pytest.mark.parametrize("kwargs", [
    _bad(hidden=torch.randn(4 * 8)),
    _bad(weight=torch.randn(50, 9)),
    _bad(weight=torch.randn(50, 8, dtype=torch.float64)),
    _bad(hidden=torch.randn(4, 8, dtype=torch.float64), weight=torch.randn(50, 8, dtype=torch.float64), bias=None),
    _bad(bias=torch.randn(49)),
    _bad(target=torch.zeros(5, dtype=torch.long)),
    _bad(target=torch.zeros(4)),
    _bad(target=torch.tensor([0, 1, 50, 2])),
    _bad(target=torch.tensor([0, -1, 2, 3])),
    _bad(row_weight=torch.ones(3)),
    _bad(reduction="avg"),
    _bad(chunk_rows=0),
], ids=["hidden-1d", "hidden-size", "dtype-mismatch", "float64", "bias-shape", "target-shape", "target-float",
        "target-too-big", "target-negative", "row-weight-shape", "reduction", "chunk-rows"])
def test_bad_inputs_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        _fused(**kwargs)


@pytest.mark.triton
def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    if DEVICE != "cpu":
        pytest.skip("needs CPU tensors")
    monkeypatch.setattr(ce, "_interpreting", lambda: False)
    with pytest.raises(ValueError, match="CUDA"):
        _fused(**_bad(), backend="triton")


_PEAK_SCRIPT = textwrap.dedent("""
    import torch
    from diffutron_engine.kernels.cross_entropy import linear_cross_entropy_reference, linear_cross_entropy_torch

    def kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    def peak_extra(fn, n, v, h=64):
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(n, h, generator=g, requires_grad=True)
        weight = (0.1 * torch.randn(v, h, generator=g)).requires_grad_()
        target = torch.randint(0, v, (n,), generator=g)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak resident size (VmHWM)
        before = kib("VmRSS")
        fn(hidden, weight, target).backward()
        return kib("VmHWM") - before

    fused = lambda h, w, t: linear_cross_entropy_torch(h, w, t, chunk_rows=64)
    for fn in (fused, linear_cross_entropy_reference):
        peak_extra(fn, 16, 256)  # load what the first call loads
    print(peak_extra(fused, 1024, 32000), peak_extra(linear_cross_entropy_reference, 1024, 32000))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self peak resident size")
def test_torch_backend_peak_memory_is_a_tenth_of_the_plain_path():
    """Peak resident growth of forward + backward, N=1024, V=32000, H=64 fp32 (plain logits: 131 MB).

    A subprocess, so that peaks are its own; glibc's mmap threshold is pinned so that freed blocks go
    back to the OS at once and the resident peak tracks the live peak.
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=120)
    if out.returncode != 0 and "clear_refs" in out.stderr:
        pytest.skip("cannot reset the peak resident size here")
    assert out.returncode == 0, out.stderr
    fused, plain = map(int, out.stdout.split())
    assert 10 * fused <= plain, f"fused peak {fused} KiB vs plain {plain} KiB"


@pytest.mark.cuda
@pytest.mark.triton
def test_cuda_peak_memory_is_a_tenth_of_the_plain_path():
    g = torch.Generator().manual_seed(0)
    N, H, V = 4096, 256, 65536
    hidden = torch.randn(N, H, generator=g).to("cuda", torch.bfloat16).requires_grad_()
    weight = (0.05 * torch.randn(V, H, generator=g)).to("cuda", torch.bfloat16).requires_grad_()
    target = torch.randint(0, V, (N,), generator=g).cuda()

    def peak(fn):
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn().backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start

    fused = peak(lambda: _fused(hidden, weight, target, chunk_rows=256, backend="triton"))
    plain = peak(lambda: linear_cross_entropy_reference(hidden, weight, target, compute_dtype=torch.bfloat16))
    assert 10 * fused <= plain, f"fused peak {fused / 2**20:.0f} MiB vs plain {plain / 2**20:.0f} MiB"
