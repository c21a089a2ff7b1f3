import pytest
import torch

from diffutron_engine.commit_schedule import block_schedule, row_schedule, transfer_prob


@pytest.mark.parametrize(
    "m,steps,expected",
    [
        (32, 32, [1] * 32),
        (32, 16, [2] * 16),
        (32, 8, [4] * 8),
        # The spec lists 3,3,3,3,3,3,4,3,4,3 here, which is what exact fractions give. In the float32
        # arithmetic that dllm runs, p_6 = 1 - 0.75000006 = 0.24999994, so
        # 14 * p_6 rounds to 3, not to 4: the real schedule is the one below.
        (32, 10, [3, 3, 3, 3, 3, 3, 3, 4, 3, 4]),
        (32, 64, [1] * 32),
        (0, 8, []),
        (1, 1, [1]),
        (5, 1, [5]),
    ],
)
def test_worked_values(m, steps, expected):
    assert row_schedule(m, steps) == expected


def test_published_long_setting_is_one_token_per_forward():
    # steps 128, block 32, 128 new tokens: 4 blocks x 32 steps x 1 token.
    per_block = -(-128 // 4)
    assert row_schedule(32, per_block) == [1] * 32


def test_schedule_matches_a_torch_float32_replay():
    """Replays dllm's recipe with torch float32 tensors and torch.round, step by step."""
    for m, steps in [(32, 10), (32, 7), (17, 9), (64, 48), (7, 3), (128, 100)]:
        remaining, out = m, []
        for j in range(steps):
            t = torch.as_tensor((steps - j) / steps, dtype=torch.float32)
            s = torch.as_tensor((steps - j - 1) / steps, dtype=torch.float32)
            p = 1 - ((1 - (1 - s)) / (1 - (1 - t))).item()
            n = min(int(torch.round(torch.tensor(remaining, dtype=torch.float64) * p)), remaining)
            out.append(n)
            remaining -= n
            if remaining == 0:
                break
        assert row_schedule(m, steps) == [n for n in out if n > 0]


def test_transfer_prob_is_float32_arithmetic():
    # reverse_mask_prob(s, t) = s / t computed in float32: 1 - p must be a float32 value.
    import struct

    for steps in (3, 7, 10, 64):
        for j in range(steps):
            r = 1.0 - transfer_prob(j, steps)
            assert struct.unpack("f", struct.pack("f", r))[0] == pytest.approx(r, abs=1e-16)
    assert transfer_prob(steps - 1, steps) == 1.0  # the last step commits whatever is left


def test_block_schedule_pads_rows_with_zeros():
    rows = block_schedule([32, 5, 0], 10)
    assert rows[0] == [3, 3, 3, 3, 3, 3, 3, 4, 3, 4]
    assert sum(rows[1]) == 5 and len(rows[1]) == 10 and rows[1][-1] == 0
    assert rows[2] == [0] * 10


def test_stochastic_schedule_sums_and_is_seeded():
    torch.manual_seed(0)
    a = block_schedule([32, 7, 0], 12, stochastic=True)
    torch.manual_seed(0)
    b = block_schedule([32, 7, 0], 12, stochastic=True)
    assert a == b
    assert [sum(r) for r in a] == [32, 7, 0]
    # One binomial draw per step until the row is exhausted (and one for an empty row): the
    # generator has advanced exactly as far as a manual replay.
    torch.manual_seed(0)
    block_schedule([3], 4, stochastic=True)
    after = torch.rand(1)
    torch.manual_seed(0)
    remaining, j = 3, 0
    while True:
        n = int(torch.distributions.Binomial(torch.tensor(float(remaining), dtype=torch.float64),
                                             transfer_prob(j, 4)).sample())
        remaining -= min(n, remaining)
        j += 1
        if remaining == 0:
            break
    assert torch.equal(torch.rand(1), after)
