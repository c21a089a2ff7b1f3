"""The engine's sampler on the rows that need a prediction (torch path; the fused kernels of
diffutron_engine.kernels / csrc implement the same contract).

Inputs are logits [N, V] of N candidate positions, never a B x T x V tensor. Semantics follow the
oracle step for step: repetition penalty, suppression, token choice (argmax, or Gumbel-max in float64
at temperature > 0), begin-suppression after the choice, confidence = softmax probability of the
chosen token (or a uniform draw for random remasking).
"""

from __future__ import annotations

import torch


def apply_repetition_penalty(logits: torch.Tensor, row_ids: list[torch.Tensor], row_slices: list[slice],
                             penalty: float) -> None:
    """In place: for candidate rows of request r (row_slices[r]) and each id in row_ids[r], a logit > 0 is
    divided by the penalty, any other multiplied by it."""
    for ids, sl in zip(row_ids, row_slices):
        if ids.numel() == 0 or sl.stop == sl.start:
            continue
        block = logits[sl, ids]
        logits[sl, ids] = torch.where(block > 0, block / penalty, block * penalty)


# Rows per chunk in `choose`: the softmax and the float64 Gumbel noise exist for this many rows at a
# time (2 x 256k floats = 2 MB), never for all N candidate rows at once. Measured on the CPU benchmark:
# 4-row chunks left exact mode's peak working memory at 1/9.8 of the oracle's.
CHUNK = 2


def choose(logits: torch.Tensor, temperature: float, generators: list[torch.Generator], row_slices: list[slice],
           begin_suppress: list[int] | None, remasking: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token choice and confidence for each candidate row. Random draws of request r come from
    generators[r] only, so a request's draws do not depend on its batch. Works through the rows in
    small chunks (softmax is per row, so the values are those of one big softmax)."""
    n = logits.shape[0]
    x0 = torch.empty(n, dtype=torch.long, device=logits.device)
    conf = torch.empty(n, dtype=logits.dtype if remasking == "low_confidence" else torch.float32, device=logits.device)
    for g, sl in zip(generators, row_slices):
        for a in range(sl.start, sl.stop, CHUNK):
            b = min(a + CHUNK, sl.stop)
            rows = logits[a:b].contiguous()
            if temperature == 0:
                x0[a:b] = rows.argmax(dim=-1)
            else:
                # Gumbel-max in float64, as the oracle: argmax(l - tau * log(-log U)) is the oracle's
                # argmax(exp(l) / (-log U)^tau) without the overflow-prone exp.
                u = torch.rand(rows.shape, dtype=torch.float64, device=rows.device, generator=g)
                x0[a:b] = (rows.double() - temperature * torch.log(-torch.log(u))).argmax(dim=-1)
                del u
            if begin_suppress:
                rows[:, begin_suppress] = -torch.inf
            if remasking == "low_confidence":
                conf[a:b] = torch.softmax(rows, dim=-1).gather(-1, x0[a:b].unsqueeze(-1)).squeeze(-1)
            else:
                conf[a:b] = torch.rand(b - a, device=rows.device, generator=g)
    return x0, conf


def select_threshold(conf: torch.Tensor, tau: float) -> torch.Tensor:
    """Indices (into conf) of every candidate with confidence >= tau, at least the most confident."""
    keep = (conf >= tau).nonzero().flatten()
    return keep if keep.numel() else conf.argmax().reshape(1)


def select_factor(conf: torch.Tensor, factor: float) -> torch.Tensor:
    """The n most confident candidates for the largest n with (n + 1) * (1 - c_n) < factor (>= 1)."""
    values, order = torch.sort(conf, descending=True)
    n = torch.arange(1, conf.numel() + 1, device=conf.device, dtype=values.dtype)
    ok = ((n + 1) * (1 - values) < factor).nonzero().flatten()
    count = int(ok.max()) + 1 if ok.numel() else 1
    return order[:count]
