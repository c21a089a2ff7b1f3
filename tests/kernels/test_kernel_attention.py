"""Flash attention kernel vs the torch reference (kernels/attention.py).

Without a GPU the Triton kernel runs in interpreter mode on CPU tensors; the env var must be set
before triton is first imported. Tolerance (flash-attention style): the kernel's error against a
float64 reference must be at most twice the error of the naive reference computed in the inputs'
own precision, plus a tiny floor.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from diffutron_engine.kernels.attention import attention_reference, attention_triton  # noqa: E402

# the GPU tier: bench/gpu_suite runs this file on the GPU machine
pytestmark = pytest.mark.gpu_suite

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6


def _inputs(B, H, Q, D, S, P, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Q, D, generator=g)
    k = torch.randn(S, H, P, D, generator=g)
    v = torch.randn(S, H, P, D, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


def _check(q, k, v, slots, q_pos, key_valid, half_window=None):
    """Run the kernel and assert the flash-attention style error bound; returns the output."""
    args = (slots.to(DEVICE), q_pos.to(DEVICE), key_valid.to(DEVICE), half_window)
    out = attention_triton(q, k, v, *args)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert torch.isfinite(out).all()
    exact = attention_reference(q.double(), k.double(), v.double(), *args)
    naive = attention_reference(q, k, v, *args, compute_dtype=q.dtype)
    err = (out.double() - exact).abs().max().item()
    naive_err = (naive.double() - exact).abs().max().item()
    assert err <= 2 * naive_err + EPS, f"kernel error {err:.3g} vs naive {naive_err:.3g}"
    return out


def _full_forward(B, T, lengths):
    """slots = arange(B), every position is a query, row b has lengths[b] valid keys."""
    key_valid = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return torch.arange(B), torch.arange(T).expand(B, T).contiguous(), key_valid


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("half_window", [None, 4])
def test_full_forward_with_padding(dtype, half_window):
    # T = 37 is not a multiple of the key tile (32 in float32, 64 in float16); row 1 has a padded tail. The window of 4
    # reaches both sequence edges (positions 0 and 36).
    q, k, v = _inputs(2, 2, 37, 32, 2, 37, dtype)
    _check(q, k, v, *_full_forward(2, 37, [37, 29]), half_window)


@pytest.mark.triton
@pytest.mark.parametrize("half_window", [None, 64])
def test_default_blocks_head_dim_64(half_window):
    q, k, v = _inputs(2, 2, 70, 64, 2, 70, torch.float16, seed=1)
    _check(q, k, v, *_full_forward(2, 70, [70, 41]), half_window)


@pytest.mark.triton
def test_a_window_past_every_key_is_global_attention():
    """A window wider than the keys (up to the largest int the kernel takes) attends to every key, as a
    global layer does: the launcher clamps it to the key count, so the kernel's 32-bit distances hold."""
    q, k, v = _inputs(2, 2, 21, 32, 2, 21, torch.float32, seed=2)
    slots, q_pos, key_valid = _full_forward(2, 21, [21, 15])
    glob = _check(q, k, v, slots, q_pos, key_valid, None)
    for window in (21, 2**31 - 1):
        torch.testing.assert_close(_check(q, k, v, slots, q_pos, key_valid, window), glob)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("half_window", [None, 4])
def test_query_subset_permuted_slots(dtype, half_window):
    # Q = 5 queries: a block in the middle for row 0, the last positions for row 1; the batch
    # reads slots [2, 0] of a store of S = 3 with P = 40 > T = 37.
    q, k, v = _inputs(2, 2, 5, 16, 3, 40, dtype, seed=2)
    q_pos = torch.tensor([[10, 11, 12, 13, 14], [32, 33, 34, 35, 36]])
    key_valid = torch.ones(2, 37, dtype=torch.bool)
    key_valid[1, 30:] = False
    _check(q, k, v, torch.tensor([2, 0]), q_pos, key_valid, half_window)


@pytest.mark.triton
def test_strided_cache():
    # A [S, P, H, D] store seen as [S, H, P, D]: only the head dim needs a unit stride.
    q, _, _ = _inputs(2, 2, 5, 16, 2, 24, torch.float32, seed=3)
    k = torch.randn(2, 24, 2, 16, device=DEVICE).transpose(1, 2)
    v = torch.randn(2, 24, 2, 16, device=DEVICE).transpose(1, 2)
    q_pos = torch.tensor([[0, 3, 7, 20, 23], [1, 2, 3, 4, 5]])
    key_valid = torch.ones(2, 24, dtype=torch.bool)
    _check(q, k, v, torch.tensor([1, 0]), q_pos, key_valid, 3)


@pytest.mark.triton
def test_fully_masked_rows_are_zero():
    q, k, v = _inputs(2, 2, 4, 16, 2, 32, torch.float16, seed=4)
    key_valid = torch.zeros(2, 32, dtype=torch.bool)
    key_valid[0, :10] = True  # row 1 has no valid key at all
    # Row 0: position 20 is more than 2 away from every valid key; -1000 and 10**12 stand for
    # padded queries with arbitrary positions.
    q_pos = torch.tensor([[5, 20, -1000, 10**12], [0, 1, 2, 3]])
    out = _check(q, k, v, torch.arange(2), q_pos, key_valid, 2)
    assert (out[0, :, 1:] == 0).all() and (out[1] == 0).all()
    assert (out[0, :, 0] != 0).any()
    out = _check(q, k, v, torch.arange(2), q_pos, key_valid, None)
    assert (out[1] == 0).all()


@pytest.mark.triton
def test_invalid_keys_are_never_read():
    # Unwritten cache slots may hold NaN: neither their K nor their V may leak into the output.
    q, k, v = _inputs(1, 2, 8, 16, 1, 32, torch.float32, seed=5)
    key_valid = torch.ones(1, 32, dtype=torch.bool)
    key_valid[0, 20:] = False
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[:, :, 20:] = float("nan")
    dirty_v[:, :, 20:] = float("nan")
    q_pos = torch.arange(8)[None] * 4
    out = attention_triton(q, dirty_k, dirty_v, torch.zeros(1, dtype=torch.long).to(DEVICE),
                          q_pos.to(DEVICE), key_valid.to(DEVICE))
    clean = _check(q, k, v, torch.zeros(1, dtype=torch.long), q_pos, key_valid)
    assert torch.equal(out, clean)


@pytest.mark.triton
@pytest.mark.parametrize("positions, far", [(range(0, 8), slice(32, 64)), (range(52, 60), slice(0, 32))])
def test_sliding_skips_far_key_tiles(positions, far):
    # With w = 4 and the float32 launcher's 32-key tiles, the tiles in `far` lie entirely outside every
    # query's window.
    # They hold NaN (valid keys, so only skipping keeps them out; masking would give 0 * NaN).
    q, k, v = _inputs(1, 2, 8, 16, 1, 64, torch.float32, seed=6)
    q_pos = torch.tensor([list(positions)])
    key_valid = torch.ones(1, 64, dtype=torch.bool)
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[:, :, far] = float("nan")
    dirty_v[:, :, far] = float("nan")
    out = attention_triton(q, dirty_k, dirty_v, torch.zeros(1, dtype=torch.long).to(DEVICE),
                          q_pos.to(DEVICE), key_valid.to(DEVICE), 4)
    clean = _check(q, k, v, torch.zeros(1, dtype=torch.long), q_pos, key_valid, 4)
    assert torch.equal(out, clean)


@pytest.mark.triton
def test_launcher_rejects_bad_inputs():
    q, k, v = _inputs(2, 2, 5, 16, 2, 8, torch.float32)
    slots, q_pos = torch.arange(2, device=DEVICE), torch.zeros(2, 5, dtype=torch.long, device=DEVICE)
    key_valid = torch.ones(2, 8, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="head dim"):
        attention_triton(q, k[..., :8], v[..., :8], slots, q_pos, key_valid)
    with pytest.raises(ValueError, match="q_pos"):
        attention_triton(q, k, v, slots, q_pos[:, :4], key_valid)
    with pytest.raises(ValueError, match="key_valid"):
        attention_triton(q, k, v, slots, q_pos, torch.ones(2, 9, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="half_window"):
        attention_triton(q, k, v, slots, q_pos, key_valid, half_window=-1)
    with pytest.raises(ValueError, match="share"):
        attention_triton(q.half(), k, v, slots, q_pos, key_valid)


def test_reference_matches_sdpa():
    # float64 on both sides: the two must agree to rounding (default assert_close tolerances).
    torch.manual_seed(7)
    shapes = [(2, 2, 6, 16), (3, 2, 12, 16), (3, 2, 12, 16)]
    q, k, v = (torch.randn(shape, dtype=torch.float64) for shape in shapes)
    slots = torch.tensor([2, 0])
    q_pos = torch.tensor([[0, 1, 2, 9, 10, 11], [3, 4, 5, 6, 7, 8]])
    key_valid = torch.ones(2, 10, dtype=torch.bool)
    key_valid[1, 7:] = False
    w = 3
    mask = key_valid[:, None, None, :] & ((q_pos[:, None, :, None] - torch.arange(10)).abs() <= w)
    assert mask.any(-1).all()
    expected = F.scaled_dot_product_attention(q, k[slots, :, :10], v[slots, :, :10], attn_mask=mask)
    got = attention_reference(q, k, v, slots, q_pos, key_valid, half_window=w)
    torch.testing.assert_close(got, expected)
