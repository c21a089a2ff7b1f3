"""Microbenchmark: fused argmax + confidence, C++ against the torch chain (argmax, softmax, gather).

Run:  .venv/bin/python -m pytest bench/kernels -q --benchmark-columns=median,iqr,rounds
Shapes: N rows of the LM head's output (the masked positions of a block), V = 256,000 (mmBERT).
"""

import pytest
import torch

from diffutron_engine.backends import argmax_confidence_cpp, argmax_confidence_torch, cpp_available

V = 256_000


@pytest.fixture(scope="module", params=[1, 8, 32], ids=lambda n: f"N{n}")
def logits(request):
    return torch.randn(request.param, V, generator=torch.Generator().manual_seed(0)) * 3


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_argmax_confidence(benchmark, logits, impl):
    if impl == "cpp" and not cpp_available():
        pytest.skip("C++ extension not built")
    fn = argmax_confidence_cpp if impl == "cpp" else argmax_confidence_torch
    benchmark.group = f"argmax_confidence N={logits.shape[0]} V={V}"
    ids, _ = benchmark(fn, logits)
    assert torch.equal(ids, logits.argmax(-1))
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = round(logits.numel() * 4 / seconds / 1e9, 2)
