"""How many masked positions each denoising step commits (plain Python, no tensors except the one
binomial draw that must come from torch's global generator to stay RNG-compatible with dllm).

The linear schedule alpha(u) = 1 - u gives reverse_mask_prob(s, t) = s / t; dllm computes it in
float32 as (1 - (1 - s)) / (1 - (1 - t)). We emulate that float32 arithmetic exactly in Python: each
float32 operation equals the float64 operation rounded to float32 (a double has more than
2 * 24 + 2 bits of mantissa, so the double rounding is harmless for +, -, *, /).
"""

from __future__ import annotations

import struct
from functools import lru_cache


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


@lru_cache(maxsize=4096)
def transfer_prob(j: int, steps: int) -> float:
    """p_j = 1 - reverse_mask_prob(s, t) for step j of `steps`, t = (S-j)/S, s = (S-j-1)/S."""
    t = _f32((steps - j) / steps)
    s = _f32((steps - j - 1) / steps)
    r = _f32(_f32(1.0 - _f32(1.0 - s)) / _f32(1.0 - _f32(1.0 - t)))
    return 1.0 - r


def row_schedule(masked: int, steps: int, stochastic: bool = False, device=None, generator=None) -> list[int]:
    """Commit counts of one row for one block, zeros dropped (the block's per-row schedule).

    Deterministic: n_j = round-half-even(m_remaining * p_j), capped at m_remaining.
    Stochastic: n_j ~ Binomial(m_remaining, p_j), drawn with torch's global generator on `device`,
    including the draw at j = 0 when the row has no masked position (dllm checks for zero after it).
    With a `generator` (the engine's per-request streams) the draws come from it instead.
    """
    counts: list[int] = []
    remaining = masked
    for j in range(steps):
        p = transfer_prob(j, steps)
        if stochastic:
            import torch

            n_t = torch.tensor(remaining, dtype=torch.float64, device=device)
            if generator is None:
                n = int(torch.distributions.Binomial(n_t, p).sample().item())
            else:
                p_t = torch.tensor(p, dtype=torch.float64, device=device)
                n = int(torch.binomial(n_t, p_t, generator=generator).item())
        else:
            n = round(remaining * p)  # Python's round is half-to-even on float64, like torch.round
        n = min(n, remaining)
        counts.append(n)
        remaining -= n
        if remaining == 0:
            break
    return [n for n in counts if n > 0]


def block_schedule(
    masked_per_row: list[int], steps: int, stochastic: bool = False, device=None
) -> list[list[int]]:
    """Schedules of all rows (rows in order, so stochastic draws keep dllm's order), right-padded
    with zeros to the longest row: result[i][j] = tokens row i commits at step j of the block."""
    rows = [row_schedule(m, steps, stochastic, device) for m in masked_per_row]
    width = max((len(r) for r in rows), default=0)
    return [r + [0] * (width - len(r)) for r in rows]
