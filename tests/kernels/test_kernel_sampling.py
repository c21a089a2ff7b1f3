"""The fused sampler (kernels/sampling.py, csrc/sampler.cpp) on every backend against its float64
reference: edge cases, precision by the flash-attention rule, statistics of the draws, hard checks."""

import math

import pytest
import torch

from diffutron_engine.backends import cpp_extension
from diffutron_engine.kernels import sampling as S
from diffutron_engine.kernels.sampling import sample_cpp

# the GPU tier: bench/gpu_suite runs this file on the GPU machine
pytestmark = pytest.mark.gpu_suite

BACKENDS = [
    pytest.param("torch", id="torch"),
    pytest.param("cpp", id="cpp", marks=pytest.mark.cext),
    pytest.param("triton", id="triton", marks=pytest.mark.triton),
    pytest.param("triton-head", id="triton-head", marks=pytest.mark.triton),
]
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def run(backend, logits, p, head=None, **kw):
    """ids, conf of `backend`; `head` = (hidden, weight, bias) whose product is `logits` (fused head)."""
    if backend == "torch":
        return S.sample_torch(logits, p, chunk=kw.get("chunk", 4))
    if backend == "cpp":
        return sample_cpp(logits.cpu(), p)
    # the launchers' own tiles (the engine's); `sms` sizes the vocabulary split as on a GPU with that many
    # SMs, so that small vocabularies are still swept in several splits and merged
    if backend == "triton":
        return S.sample_triton(logits.to(DEV), p, sms=kw.get("sms", 4))
    h, w, b = head
    return S.sample_head_triton(h.to(DEV), w.to(DEV), None if b is None else b.to(DEV), p, sms=kw.get("sms", 4))


def problem(n=5, v=1000, h=16, seed=0, dtype=torch.float32):
    """Logits from a small LM head (so the fused-head variant sees the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.6
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    hidden, weight, bias = hidden.to(dtype), weight.to(dtype), bias.to(dtype)
    logits = (hidden.double() @ weight.double().T + bias.double()).to(dtype)
    return logits, (hidden, weight, bias)


def params(n, logits, **kw):
    base = dict(seeds=torch.arange(n) * 7919 + 2**33, positions=torch.arange(n) + 3, steps=torch.full((n,), 2))
    base.update(kw)
    return S.SamplingTensors(**base)


def _penalty_setup(logits):
    """Seen ids whose logits are positive (one is the row's argmax: the penalty must move the choice)
    and negative."""
    top = logits[0].argmax().item()
    neg = logits[0].argmin().item()
    return [torch.tensor([top, neg, 3]), torch.tensor([logits[1].argmax().item(), 11])]


CASES = {
    "greedy": dict(),
    "penalty": dict(penalty=1.7),
    "suppress": dict(suppress=(0, 5, 999)),
    "begin-suppress": dict(begin_suppress=(1, 2)),
    "everything": dict(penalty=0.8, suppress=(7,), begin_suppress=(8, 9)),
    "temperature": dict(temperature=0.8),
    "temperature+penalty": dict(temperature=1.3, penalty=1.4, suppress=(4,), begin_suppress=(6,)),
    "random-conf": dict(temperature=0.5, random_confidence=True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(backend, case):
    logits, head = problem(n=7, v=1000)  # V = 1000: not a multiple of the 256 / 128 tiles
    kw = dict(CASES[case])
    if kw.get("penalty"):
        kw["seen"] = _penalty_setup(logits)
        kw["row_request"] = torch.tensor([0, 1, 0, 1, 1, 0, 0])
    if "begin_suppress" in kw:  # make one row's choice a begin-suppressed id: its confidence is 0
        kw["begin_suppress"] = kw["begin_suppress"] + (int(logits[3].argmax()),)
    p = params(7, logits, **kw)
    ids, conf = run(backend, logits, p, head)
    ref_ids, ref_conf = S.sample_reference(logits, p)
    assert torch.equal(ids.cpu(), ref_ids)
    # flash-attention rule: error vs float64 at most ~2x that of the torch float32 chain (for the fused
    # head, the chain starts at the float32 product, whose rounding the kernel's own product shares)
    torch_logits = logits if backend != "triton-head" else torch.addmm(head[2], head[0], head[1].T)
    _, conf32 = S.sample_torch(torch_logits, p)
    err = (conf.cpu().double() - ref_conf).abs().max().item()
    err_torch = (conf32.double() - ref_conf).abs().max().item()
    assert err <= 2 * err_torch + 1e-7, (err, err_torch)
    if kw.get("suppress"):
        assert not set(ids.tolist()) & set(kw["suppress"])
    if kw.get("begin_suppress") and not kw.get("random_confidence"):
        assert conf[3].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_with_different_settings_share_one_call(backend):
    """Per-row temperature, penalty, seen ids, suppression, begin-suppression, random confidence and
    validity in one call (rows of different requests): every valid row gives what it gives alone."""
    n, v = 8, 1000
    logits, head = problem(n=n, v=v, seed=3)
    temps = torch.tensor([0.0, 0.8, 0.0, 1.3, 0.5, 0.0, 2.0, 0.0])
    pens = torch.tensor([1.0, 1.7, 0.8, 1.0, 1.4, 1.0, 1.0, 1.2])
    seen = [torch.tensor([int(logits[i].argmax()), i + 3, 500 + i]) for i in range(n)]
    sup = [(), (5, 999), (int(logits[2].argmax()),), (), (7,), (), (1, 2, 3), ()]
    beg = [(8,), (), (), (4,), (), (9, int(logits[5].argmax())), (), ()]
    rand = torch.tensor([False, False, False, False, True, False, False, False])
    valid = torch.tensor([True, True, True, True, True, True, False, True])
    sup_map = torch.stack([S.id_bitmap(ids, v) for ids in sup])
    beg_map = torch.stack([S.id_bitmap(ids, v) for ids in beg])
    base = params(n, logits)
    p = S.SamplingTensors(temperature=temps, penalty=pens, seeds=base.seeds, positions=base.positions,
                          steps=base.steps, seen=seen, row_request=torch.arange(n), suppress=sup_map,
                          begin_suppress=beg_map, random_confidence=rand, valid=valid)
    ids, conf = run(backend, logits, p, head)
    torch_logits = logits if backend != "triton-head" else torch.addmm(head[2], head[0], head[1].T)
    for i in range(n):
        if not valid[i]:
            continue
        alone = S.SamplingTensors(temperature=float(temps[i]), penalty=float(pens[i]), seeds=base.seeds[i:i + 1],
                                  positions=base.positions[i:i + 1], steps=base.steps[i:i + 1], seen=[seen[i]],
                                  row_request=torch.zeros(1, dtype=torch.long), suppress=sup[i],
                                  begin_suppress=beg[i], random_confidence=bool(rand[i]))
        ref_ids, ref_conf = S.sample_reference(logits[i:i + 1], alone)
        assert ids[i].item() == ref_ids.item(), i
        assert ids[i].item() not in sup[i]
        _, conf32 = S.sample_torch(torch_logits[i:i + 1], alone)
        err = abs(conf[i].item() - ref_conf.item())
        assert err <= 2 * abs(conf32.item() - ref_conf.item()) + 1e-7, (i, err)
    assert conf[5].item() == 0.0  # row 5's greedy choice is begin-suppressed for row 5 only
    assert conf[0].item() > 0.0


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] in ("torch", "triton")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_logits(backend, dtype):
    logits, _ = problem(n=6, v=777, dtype=dtype)
    p = params(6, logits, penalty=1.3, seen=[torch.tensor([1, 2, 3])], row_request=torch.zeros(6, dtype=torch.long),
               begin_suppress=(5,))
    ids, conf = run(backend, logits, p)
    ref_ids, ref_conf = S.sample_reference(logits, p)
    assert torch.equal(ids.cpu(), ref_ids)
    assert conf.dtype == dtype
    # the output is rounded to the logits' dtype: half an ulp of it on top of the rule's bound
    _, conf_t = S.sample_torch(logits, p)
    bound = 2 * (conf_t.double() - ref_conf).abs().max().item() + torch.finfo(dtype).eps * ref_conf.max().item()
    assert (conf.cpu().double() - ref_conf).abs().max().item() <= bound


@pytest.mark.parametrize("backend", BACKENDS)
def test_edges(backend):
    """One column; a row whose every id is suppressed but one; the maximum in the last, partial tile;
    ties (the first maximum wins)."""
    if backend == "triton-head":
        pytest.skip("the edge values are planted into logits, which the fused head never sees")
    logits, _ = problem(n=4, v=300)
    logits[0] = 0.0  # all ties: id 0
    logits[1, 299] = 40.0  # the maximum in the partial last tile
    ids, _ = run(backend, logits, params(4, logits))
    assert ids[0].item() == 0 and ids[1].item() == 299
    one = torch.randn(3, 1)
    ids, conf = run(backend, one, params(3, one))
    assert ids.tolist() == [0, 0, 0] and torch.allclose(conf.cpu().float(), torch.ones(3))
    only = torch.randn(2, 300)
    ids, _ = run(backend, only, params(2, only, temperature=2.0, suppress=tuple(range(300))[:-1]))
    assert ids.tolist() == [299, 299]


@pytest.mark.triton
@pytest.mark.parametrize("head", [False, True], ids=["logits", "head"])
def test_vocabulary_splits_and_partial_tiles(head):
    """The launcher's own tiles over a vocabulary of three tiles and a few ids (the last tile partial),
    swept in several splits (sized for 8 SMs) and merged: the maximum in the partial last tile, equal
    maxima in two splits (the lower id wins, as torch.argmax), rows of one call with and without draws."""
    v = 3 * S.SAMPLE_BLOCK_V + 5
    logits, h = problem(n=4, v=v, h=8, seed=6)
    if not head:
        logits[0, v - 1] = 50.0  # in the partial last tile
        logits[1, 7] = logits[1, 2 * S.SAMPLE_BLOCK_V + 3] = 60.0  # a tie across splits
    p = params(4, logits, temperature=torch.tensor([0.0, 0.0, 0.9, 1.5]))
    ids, conf = run("triton-head" if head else "triton", logits, p, h, sms=8)
    torch_logits = torch.addmm(h[2], h[0], h[1].T) if head else logits
    ref_ids, _ = S.sample_torch(torch_logits, p)
    assert torch.equal(ids.cpu(), ref_ids)
    if not head:
        assert ids[:2].tolist() == [v - 1, 7]


@pytest.mark.parametrize("backend", BACKENDS)
def test_draws_do_not_depend_on_the_batch(backend):
    logits, (h, w, b) = problem(n=6, v=1000)
    p = params(6, logits, temperature=1.0)
    ids, _ = run(backend, logits, p, (h, w, b))
    for r in (0, 4):
        alone = S.SamplingTensors(temperature=1.0, seeds=p.seeds[r:r + 1], positions=p.positions[r:r + 1],
                                  steps=p.steps[r:r + 1])
        one, _ = run(backend, logits[r:r + 1], alone, (h[r:r + 1], w, b))
        assert one.item() == ids[r].item()


def _chi2_limit(dof: int) -> float:
    """Wilson-Hilferty: the chi-square value exceeded with probability ~1e-6 under the null."""
    return dof * (1 - 2 / (9 * dof) + 4.75 * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] in ("torch", "cpp")])
def test_draw_statistics(backend):
    """100,000 draws of one row (distinct positions, so independent counters) against
    softmax(x / tau), x the penalized and suppressed logits; suppressed ids are never drawn."""
    n, v, tau = 100_000, 37, 0.7
    g = torch.Generator().manual_seed(1)
    row = torch.randn(v, generator=g) * 2
    row[3], row[4] = 2.5, -1.5  # seen ids, positive and negative
    logits = row.expand(n, v).contiguous()
    p = S.SamplingTensors(temperature=tau, penalty=1.5, seeds=torch.full((n,), 99), positions=torch.arange(n),
                          steps=torch.zeros(n, dtype=torch.long), seen=[torch.tensor([3, 4])],
                          row_request=torch.zeros(n, dtype=torch.long), suppress=(0, 17))
    ids, _ = run(backend, logits, p, chunk=4096)
    x = row.double().clone()
    x[3], x[4] = row[3] / 1.5, row[4] * 1.5
    x[[0, 17]] = -torch.inf
    prob = torch.softmax(x / tau, -1)
    counts = torch.bincount(ids.cpu(), minlength=v).double()
    assert counts[0] == 0 and counts[17] == 0
    keep = prob > 0
    exp = prob[keep] * n
    chi2 = float(((counts[keep] - exp) ** 2 / exp).sum())
    assert chi2 < _chi2_limit(int(keep.sum()) - 1), chi2


@pytest.mark.triton
@pytest.mark.parametrize("backend", ["triton", "triton-head"])
def test_triton_draws_are_the_torch_draws(backend):
    """The Triton sampler draws the same Philox numbers and rounds the Gumbel scores as the torch
    backend does (no FMA contraction), so its tokens are the torch backend's, draw for draw; with the
    statistics of the torch draws tested above, that tests the Triton draws' statistics (100,000 rows
    of one program each would take minutes in the CPU interpreter). Suppressed ids are never drawn."""
    n, v = 200, 37
    logits, head = problem(n=n, v=v, seed=4)
    p = params(n, logits, temperature=torch.rand(n, generator=torch.Generator().manual_seed(2)) * 2,
               penalty=1.5, seen=[torch.tensor([3, 4])], row_request=torch.zeros(n, dtype=torch.long),
               suppress=(0, 17))
    torch_logits = logits if backend == "triton" else torch.addmm(head[2], head[0], head[1].T)
    ids, _ = run(backend, logits, p, head)
    ref, _ = S.sample_torch(torch_logits, p)
    assert torch.equal(ids.cpu(), ref)
    assert not ({0, 17} & set(ids.tolist()))
    assert len(set(ids.tolist())) > 10  # temperatures up to 2: many distinct ids, not one argmax


def test_philox_known_answers():
    """Philox-4x32-10 first words against the generator's published known-answer vectors."""
    cases = [((0, 0, 0, 0), (0, 0), 0x6627E8D5),
             ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), 0x408F276D),
             ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0), 0xD16CFE09)]
    for c, k, want in cases:
        got = S.philox_first_word(*(torch.tensor(x) for x in c + k))
        assert int(got) == want
        ext = cpp_extension()
        if ext is not None:
            assert ext.philox(*c, k[0] | (k[1] << 32)) == want


def test_random_confidences_are_uniform():
    n = 100_000
    u = S.random_confidence(torch.full((n,), 5), torch.arange(n), torch.zeros(n, dtype=torch.long),
                            torch.zeros(n, dtype=torch.long))
    assert 0 < u.min() and u.max() < 1
    counts = torch.histc(u, bins=20, min=0, max=1).double()
    chi2 = float(((counts - n / 20) ** 2 / (n / 20)).sum())
    assert chi2 < _chi2_limit(19)


def test_bad_inputs():
    x = torch.randn(2, 10)
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        S.sample_torch(torch.randn(2, 3, 4), S.SamplingTensors())
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        S.sample_torch(x.long(), S.SamplingTensors())
    with pytest.raises(ValueError, match="per-row seeds"):
        S.SamplingTensors(temperature=0.5)
    with pytest.raises(ValueError, match="needs `seen`"):
        S.SamplingTensors(penalty=1.2)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 10\)"):
        S.id_bitmap([10], 10)
    with pytest.raises(ValueError, match="shape"):
        S.sample_torch(x, S.SamplingTensors(temperature=1.0, seeds=torch.zeros(3, dtype=torch.long)))
