"""Backend selection, and the C++ sampler's greedy path on hard rows against the torch chain."""

import pytest
import torch

from diffutron_engine import DiffutronError, backends
from diffutron_engine.backends import force_backend, sample
from diffutron_engine.kernels.sampling import sample_cpp
from diffutron_engine.kernels.sampling import SampleParams

# the GPU tier: bench/gpu_suite runs this file on the GPU machine
pytestmark = pytest.mark.gpu_suite

EPS32 = torch.finfo(torch.float32).eps


def _cases():
    g = torch.Generator().manual_seed(0)
    yield "odd sizes", torch.randn(7, 4097, generator=g) * 4  # V not a multiple of the C++ 4096 tile
    yield "one column", torch.randn(3, 1, generator=g)
    yield "wide", torch.randn(5, 256_000 // 16 + 3, generator=g) * 8
    x = torch.randn(4, 5000, generator=g)
    x[0, :4096] = -torch.inf  # a whole first tile of -inf
    x[1, 100:] = -torch.inf
    x[2, 17] = 50.0  # a dominant token: confidence near 1
    yield "infinities", x
    yield "strided rows", torch.randn(6, 9000, generator=g)[:, :8191]
    yield "transposed view", torch.randn(3000, 5, generator=g).T  # the CPU LM head's [V, N] storage
    ties = torch.zeros(2, 300)
    ties[:, [5, 250]] = 3.0
    yield "ties", ties


@pytest.mark.cext
@pytest.mark.parametrize("name,logits", list(_cases()), ids=[c[0] for c in _cases()])
def test_cpp_greedy_matches_the_torch_chain(name, logits):
    ids, conf = sample_cpp(logits, SampleParams())
    ref_ids = logits.argmax(-1)
    assert torch.equal(ids, ref_ids)  # same token, same tie rule (first maximum)
    ref64 = torch.softmax(logits.double(), -1).gather(-1, ref_ids[:, None]).squeeze(-1)
    conf32 = torch.softmax(logits, -1).gather(-1, ref_ids[:, None]).squeeze(-1)
    # flash-attention rule: at most about twice the error of torch's own float32 chain
    err = (conf.double() - ref64).abs().max().item()
    err_torch = (conf32.double() - ref64).abs().max().item()
    assert err <= 2 * max(err_torch, EPS32), (err, err_torch)


@pytest.mark.cext
def test_cpp_all_minus_inf_row_gives_nan_like_torch():
    logits = torch.full((2, 10), -torch.inf)
    logits[1, 3] = 0.0
    ids, conf = sample_cpp(logits, SampleParams())
    assert torch.isnan(conf[0]) and torch.isnan(torch.softmax(logits[0], -1)[0])
    assert ids[1] == 3 and conf[1] == 1.0


def test_forced_backend_is_used_and_checked(monkeypatch):
    logits = torch.randn(3, 50)
    with force_backend("torch"):
        assert backends.pick(torch.device("cpu"), {"cpp": True, "torch": True}) == "torch"
        ids, _ = sample(logits, SampleParams())
    assert torch.equal(ids, logits.argmax(-1))
    with force_backend("triton"), pytest.raises(RuntimeError, match="forced but is not available"):
        backends.pick(torch.device("cpu"), {"cpp": True, "torch": True})
    with force_backend("cpp"):  # an op without a C++ kernel runs its torch version
        assert backends.pick(torch.device("cpu"), {"triton": False, "torch": True}) == "torch"
    monkeypatch.setenv("DIFFUTRON_BACKEND", "torch")
    assert backends.pick(torch.device("cpu"), {"cpp": True, "torch": True}) == "torch"
    monkeypatch.setenv("DIFFUTRON_BACKEND", "cuda-magic")
    with pytest.raises(DiffutronError, match="not one of"):
        backends.pick(torch.device("cpu"), {"torch": True})
    monkeypatch.setenv("DIFFUTRON_BACKEND", "TORCH")
    with pytest.raises(DiffutronError, match="names are lower case: 'torch'"):
        backends.pick(torch.device("cpu"), {"torch": True})
    # `env` shows an invalid setting instead of failing
    assert backends.describe()["forced backend"].startswith("invalid: DIFFUTRON_BACKEND='TORCH'")
    monkeypatch.setenv("DIFFUTRON_BACKEND", "triton")
    with pytest.raises(DiffutronError, match="DIFFUTRON_BACKEND=triton was forced but is not available for this op on cpu"):
        backends.pick(torch.device("cpu"), {"triton": False, "torch": True})


def test_automatic_choice():
    assert backends.pick(torch.device("cpu"), {"cpp": True, "torch": True}) == "cpp"
    assert backends.pick(torch.device("cpu"), {"cpp": False, "torch": True}) == "torch"
    assert backends.pick(torch.device("cuda"), {"triton": True, "cpp": True, "torch": True}) == "triton"
    # bfloat16 logits are not the C++ kernel's input: torch handles them
    ids, _ = sample(torch.randn(2, 30).bfloat16(), SampleParams())
    assert ids.shape == (2,)
