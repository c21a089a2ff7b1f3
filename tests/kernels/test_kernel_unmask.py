"""The batched commit step (kernels/unmask.py): rule semantics, edges, and triton == torch."""

import pytest
import torch

from diffutron_engine.kernels import unmask as U

# the GPU tier: bench/gpu_suite runs this file on the GPU machine
pytestmark = pytest.mark.gpu_suite

IMPLS = [pytest.param(U.unmask_torch, id="torch"),
         pytest.param(U.unmask_triton, id="triton", marks=pytest.mark.triton)]
DEV = "cuda" if torch.cuda.is_available() else "cpu"
NEG = -torch.inf


def commit(fn, conf, rule="topk", value=None, k=None, start=None, width=None):
    conf = torch.as_tensor(conf, dtype=torch.float32).to(DEV)
    B, L = conf.shape
    tokens = (torch.arange(B * L).view(B, L) + 100).to(DEV)
    start = torch.zeros(B, dtype=torch.long) if start is None else torch.as_tensor(start)
    canvas = torch.full((B, width or L + int(start.max())), -1, dtype=torch.long, device=DEV)
    k = None if k is None else torch.as_tensor(k).to(DEV)
    chosen = fn(conf, tokens, k, start.to(DEV), canvas, rule, value)
    return chosen.cpu(), canvas.cpu(), tokens.cpu()


@pytest.mark.parametrize("fn", IMPLS)
def test_rules_on_one_row(fn):
    conf = [[0.2, 0.95, 0.5, 0.91]]
    chosen, _, _ = commit(fn, conf, "threshold", 0.9)
    assert chosen[0].nonzero().flatten().tolist() == [1, 3]
    chosen, _, _ = commit(fn, conf, "threshold", 0.99)
    assert chosen[0].nonzero().flatten().tolist() == [1]  # at least the most confident
    # sorted .95 .91 .5 .2 -> (n + 1)(1 - c_n) = 0.1, 0.27, 2.0, 4.0
    assert commit(fn, conf, "factor", 1.0)[0][0].nonzero().flatten().tolist() == [1, 3]
    assert commit(fn, conf, "factor", 0.05)[0][0].nonzero().flatten().tolist() == [1]
    assert commit(fn, conf, "factor", 5.0)[0][0].all()
    assert commit(fn, conf, "topk", k=[2])[0][0].nonzero().flatten().tolist() == [1, 3]


@pytest.mark.parametrize("fn", IMPLS)
def test_batch_edges(fn):
    """Non-candidates (-inf) are never chosen; a row without candidates commits nothing; k larger than
    the candidates takes them all; ties go to the lower position; tokens land at block_start + i."""
    conf = [[0.5, NEG, 0.5, 0.7, NEG],  # tie between 0 and 2: k=2 takes 3 and 0
            [NEG, NEG, NEG, NEG, NEG],  # nothing to commit
            [0.1, 0.2, 0.3, NEG, NEG],  # k = 9 > 3 candidates
            [0.9, 0.8, 0.7, 0.6, 0.5]]
    chosen, canvas, tokens = commit(fn, conf, "topk", k=[2, 1, 9, 0], start=[0, 2, 4, 1], width=12)
    assert chosen.tolist() == [[True, False, False, True, False], [False] * 5,
                               [True, True, True, False, False], [False] * 5]
    assert canvas[0, [0, 3]].tolist() == tokens[0, [0, 3]].tolist()
    assert canvas[2, 4:7].tolist() == tokens[2, :3].tolist()
    written = torch.zeros_like(canvas, dtype=torch.bool)
    written[0, [0, 3]] = True
    written[2, 4:7] = True
    assert (canvas[~written] == -1).all()  # nothing else touched
    for rule, value in (("threshold", 0.95), ("factor", 0.01)):
        chosen, _, _ = commit(fn, conf, rule, value)
        assert chosen.sum(1).tolist() == [1, 0, 1, 1]  # at least one where there is a candidate
        assert not chosen[torch.tensor(conf) == NEG].any()


@pytest.mark.triton
@pytest.mark.parametrize("rule,value", [("topk", None), ("threshold", 0.6), ("factor", 1.5)])
def test_triton_equals_torch_on_random_batches(rule, value):
    g = torch.Generator().manual_seed(3)
    for L in (1, 7, 32, 33):
        conf = torch.rand(6, L, generator=g)
        conf[torch.rand(6, L, generator=g) < 0.3] = NEG
        conf[1, : L // 2] = conf[1, 0]  # ties
        k = torch.randint(0, L + 2, (6,), generator=g)
        start = torch.randint(0, 5, (6,), generator=g)
        a = commit(U.unmask_triton, conf, rule, value, k, start)
        b = commit(U.unmask_torch, conf, rule, value, k, start)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.triton
def test_triton_equals_torch_with_mixed_rules_and_seen_bits():
    g = torch.Generator().manual_seed(5)
    B, L, S, vocab = 7, 13, 9, 300
    for _ in range(3):
        conf = torch.rand(B, L, generator=g)
        conf[torch.rand(B, L, generator=g) < 0.3] = NEG
        tokens = torch.randint(0, vocab, (B, L), generator=g)
        tokens[0, :4] = 31  # the same token (and bit 31 of a word) committed several times
        rule = torch.randint(0, 3, (B,), generator=g).to(torch.int32)
        value = torch.rand(B, generator=g) * 2
        k = torch.randint(0, L + 1, (B,), generator=g)
        start = torch.randint(0, 4, (B,), generator=g)
        rows = torch.randperm(S, generator=g)[:B]
        out = []
        for fn in (U.unmask_triton, U.unmask_torch):
            canvas = torch.randint(0, vocab, (S, L + 4), generator=torch.Generator().manual_seed(1)).to(DEV)
            seen = torch.randint(-2**31, 2**31 - 1, (S, (vocab + 31) // 32), dtype=torch.int32,
                                 generator=torch.Generator().manual_seed(2)).to(DEV)
            chosen = fn(conf.to(DEV), tokens.to(DEV), k.to(DEV), start.to(DEV), canvas, rule.to(DEV), value.to(DEV),
                        rows=rows.to(DEV), seen=seen, unseen=(4, 1))
            out.append((chosen.cpu(), canvas.cpu(), seen.cpu()))
        assert all(torch.equal(x, y) for x, y in zip(*out))


def pairwise_selection(conf, rule, value, k):
    """The rules by their definition, one row at a time: rank = how many candidates come first (higher
    confidence, or equal confidence at a lower position). O(L^2): a reference for tests only."""
    out = torch.zeros(conf.shape, dtype=torch.bool)
    for b, c in enumerate(conf.double()):
        cand = c > -torch.inf
        pos = torch.arange(len(c))
        ahead = ((c[None, :] > c[:, None]) | ((c[None, :] == c[:, None]) & (pos[None, :] < pos[:, None]))) & cand[None, :]
        rank = ahead.sum(1)
        if rule[b] == U.TOPK:
            sel = rank < k[b]
        elif rule[b] == U.THRESHOLD:
            sel = (c.float() >= value[b]) | (rank == 0)
        else:
            good = cand & ((rank + 2).float() * (1 - c.float()) < value[b])
            sel = rank < max(int((rank + 1)[good].max()) if good.any() else 0, 1)
        out[b] = sel & cand
    return out


# the CPU interpreter runs tl.sort element by element (about 25 s per row at L = 4,096), so the
# large Triton cases are in the slow tier, and 4,096 runs on a GPU only (in the interpreter it takes the
# code path of 1,025, and the compiled kernel is checked at every size by bench/gpu_compile_check.py;
# the GPU suite runs these tests on the GPU)
BLOCK_CASES = [pytest.param(fn.values[0], L, id=f"{L}-{fn.id}", marks=list(fn.marks) + (
    [pytest.mark.slow] if fn.id == "triton" and L >= 1024 else []) + (
    [pytest.mark.cuda] if fn.id == "triton" and L > 2048 else []))
    for L in (1, 31, 256, 1024, 1025, 4096) for fn in IMPLS]


@pytest.mark.parametrize("fn,L", BLOCK_CASES)
def test_any_block_size_matches_the_definition(fn, L):
    """Blocks up to the kernel's largest (1,025 crosses a power of two; the kernel's ranking needs no
    L x L tile): every rule, with ties (confidences on a coarse grid), non-candidates, k past the
    candidates, against the rules' definition."""
    g = torch.Generator().manual_seed(L)
    # the interpreter sorts a row of 4,096 in ~25 s: large blocks there take the sort-using rules, past
    # 1,024 top-k alone (the sort, the cut and the ties at the cut)
    rows = [0, 1, 2, 3]
    if fn is U.unmask_triton and L > 256:
        rows = [0, 3] if L <= 1024 else [0]
    B = len(rows)
    conf = (torch.rand(B, L, generator=g) * 16).floor() / 16  # many ties
    conf[torch.rand(B, L, generator=g) < 0.25] = NEG
    rule = torch.tensor([U.TOPK, U.TOPK, U.THRESHOLD, U.FACTOR], dtype=torch.int32)[rows]
    value = torch.tensor([0.0, 0.0, 0.9, 0.5 + L / 8])[rows]
    k = torch.tensor([max(1, L // 3), L + 5, 0, 0])[rows]
    tokens = torch.randint(0, 1000, (B, L), generator=g)
    canvas = torch.full((B, L + 3), -1, dtype=torch.long)
    start = torch.tensor([0, 1, 2, 3])[:B]
    seen = torch.zeros(B, 32, dtype=torch.int32)
    chosen = fn(conf.to(DEV), tokens.to(DEV), k.to(DEV), start.to(DEV), canvas.to(DEV), rule.to(DEV),
                value.to(DEV), seen=seen.to(DEV)).cpu()
    assert torch.equal(chosen, pairwise_selection(conf, rule, value, k))


def test_blocks_past_the_kernels_limit_are_refused():
    if U.triton is None:
        pytest.skip("triton not installed")
    conf = torch.zeros(1, U.MAX_BLOCK + 1)
    with pytest.raises(ValueError, match="blocks of up to"):
        U.unmask_triton(conf, conf.long(), torch.ones(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                        torch.zeros(1, U.MAX_BLOCK + 1, dtype=torch.long))


@pytest.mark.parametrize("fn", IMPLS)
def test_per_row_rules_rows_and_seen_bits(fn):
    """Rows of different requests in one launch: each its own rule and value, its canvas row through
    `rows` (several padding rows may share one), and the committed tokens' bits set in its seen bitmap
    (a token committed twice counts once; the unseen ids and bits already set are left alone)."""
    from diffutron_engine.kernels.sampling import id_bitmap

    vocab = 100
    conf = torch.tensor([[0.2, 0.95, 0.5, 0.91],
                         [0.2, 0.95, 0.5, 0.91],
                         [0.9, 0.8, NEG, 0.6],
                         [NEG, NEG, NEG, NEG],
                         [NEG, NEG, NEG, NEG]]).to(DEV)
    tokens = torch.tensor([[10, 63, 31, 64], [11, 12, 13, 14], [7, 7, 99, 1], [5, 5, 5, 5], [6, 6, 6, 6]]).to(DEV)
    rule = torch.tensor([U.THRESHOLD, U.FACTOR, U.TOPK, U.TOPK, U.TOPK], dtype=torch.int32).to(DEV)
    value = torch.tensor([0.9, 0.05, 0.0, 0.0, 0.0]).to(DEV)
    k = torch.tensor([0, 0, 3, 1, 1]).to(DEV)
    start = torch.tensor([0, 2, 1, 0, 0]).to(DEV)
    rows = torch.tensor([2, 0, 1, 3, 3]).to(DEV)  # rows 3 and 4 pad onto one canvas row
    canvas = torch.full((4, 8), 4, dtype=torch.long, device=DEV)
    seen = torch.zeros(4, (vocab + 31) // 32, dtype=torch.int32, device=DEV)
    seen[1] = id_bitmap([7, 50], vocab).to(DEV)
    chosen = fn(conf, tokens, k, start, canvas, rule, value, rows=rows, seen=seen, unseen=(4, 1)).cpu()
    assert chosen.tolist() == [[False, True, False, True], [False, True, False, False],
                               [True, True, False, True], [False] * 4, [False] * 4]
    canvas = canvas.cpu()
    assert canvas[2].tolist() == [4, 63, 4, 64, 4, 4, 4, 4]
    assert canvas[0].tolist() == [4, 4, 4, 12, 4, 4, 4, 4]
    assert canvas[1].tolist() == [4, 7, 7, 4, 1, 4, 4, 4]
    assert (canvas[3] == 4).all()
    expected = {2: [63, 64], 0: [12], 1: [7, 50], 3: []}  # 1 is unseen (EOS); 7 twice, and already set
    for row, ids in expected.items():
        assert torch.equal(seen[row].cpu(), id_bitmap(ids, vocab)), row


def test_bad_input():
    conf, tok = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long)
    canvas, start = torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="rule must be one of"):
        U.unmask_torch(conf, tok, None, start, canvas, "best")
    with pytest.raises(ValueError, match="k for top-k"):
        U.unmask_torch(conf, tok, None, start, canvas, "topk")
    with pytest.raises(ValueError, match="needs its value"):
        U.unmask_torch(conf, tok, None, start, canvas, "threshold")
    with pytest.raises(ValueError, match=r"\[B, L\]"):
        U.unmask_torch(conf, tok[:, :2], None, start, canvas, "factor", 1.0)
