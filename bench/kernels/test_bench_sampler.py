"""Microbenchmark: the fused sampler against the torch chain the reference sampler runs per step.

Run:  .venv/bin/python -m pytest bench/kernels -q --benchmark-columns=median,iqr,rounds
Shapes: N candidate rows (the masked positions of a block) x V = 256,000 (mmBERT), float32 on CPU.
Modes: greedy; greedy with repetition penalty and suppressed ids; temperature 0.7 (Gumbel-max).
"""

import pytest
import torch

from diffutron_engine.backends import cpp_available
from diffutron_engine.kernels.sampling import sample_cpp
from diffutron_engine.kernels.sampling import SamplingTensors, sample_torch

V = 256_000
MODES = {
    "greedy": dict(),
    "penalty+suppress": dict(penalty=1.2, suppress=(0, 1, 2, 3, 4)),
    "temperature": dict(temperature=0.7),
}


def torch_chain(logits, p: SamplingTensors, gen: torch.Generator):
    """What the reference sampler does per step (penalty in place, suppression, float64 Gumbel noise,
    argmax, softmax, gather), on a copy so every round starts from the same logits."""
    x = logits.clone()
    if p.has_penalty:
        for r, req in enumerate(p.row_request.tolist()):
            ids = p.seen[req]
            v = x[r, ids]
            x[r, ids] = torch.where(v > 0, v / p.penalty, v * p.penalty)
    if p.suppress:
        x[:, list(p.suppress)] = -torch.inf
    if p.sample:
        noise = torch.rand(x.shape, dtype=torch.float64, generator=gen)
        ids = (x.double().exp() / (-torch.log(noise)) ** p.temperature).argmax(-1)
    else:
        ids = x.argmax(-1)
    return ids, torch.softmax(x, -1).gather(-1, ids[:, None]).squeeze(-1)


@pytest.fixture(scope="module", params=[1, 8, 32], ids=lambda n: f"N{n}")
def logits(request):
    return torch.randn(request.param, V, generator=torch.Generator().manual_seed(0)) * 3


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("impl", ["torch-chain", "torch-fused", "cpp"])
def test_sampler(benchmark, logits, impl, mode):
    if impl == "cpp" and not cpp_available():
        pytest.skip("C++ extension not built")
    n = logits.shape[0]
    kw = dict(MODES[mode])
    if "penalty" in kw:
        kw.update(seen=[torch.randint(0, V, (200,), generator=torch.Generator().manual_seed(1))],
                  row_request=torch.zeros(n, dtype=torch.long))
    p = SamplingTensors(seeds=torch.arange(n), positions=torch.arange(n), steps=torch.zeros(n, dtype=torch.long), **kw)
    gen = torch.Generator().manual_seed(0)
    fn = {"torch-chain": lambda: torch_chain(logits, p, gen), "torch-fused": lambda: sample_torch(logits, p),
          "cpp": lambda: sample_cpp(logits, p)}[impl]
    benchmark.group = f"sampler {mode} N={n} V={V}"
    ids, _ = benchmark(fn)
    if not p.sample:
        ref, _ = torch_chain(logits, p, gen)
        assert torch.equal(ids, ref)
    if benchmark.stats is not None:  # None under --benchmark-disable (a correctness-only run)
        benchmark.extra_info["GB/s"] = round(logits.numel() * 4 / benchmark.stats.stats.median / 1e9, 2)
