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


def choose(logits: torch.Tensor, temperature: float, generators: list[torch.Generator], row_slices: list[slice],
           begin_suppress: list[int] | None, remasking: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token choice and confidence for each candidate row. Random draws of request r come from
    generators[r] only, so a request's draws do not depend on its batch."""
    if temperature == 0:
        x0 = logits.argmax(dim=-1)
    else:
        # Gumbel-max in float64, as the oracle: argmax(l - tau * log(-log U)) is the oracle's
        # argmax(exp(l) / (-log U)^tau) without the overflow-prone exp.
        x0 = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        for g, sl in zip(generators, row_slices):
            if sl.stop == sl.start:
                continue
            u = torch.rand((sl.stop - sl.start, logits.shape[1]), dtype=torch.float64, device=logits.device, generator=g)
            x0[sl] = (logits[sl].double() - temperature * torch.log(-torch.log(u))).argmax(dim=-1)
    if begin_suppress:
        logits[:, begin_suppress] = -torch.inf
    if remasking == "low_confidence":
        conf = torch.softmax(logits, dim=-1).gather(-1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        conf = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for g, sl in zip(generators, row_slices):
            if sl.stop > sl.start:
                conf[sl] = torch.rand(sl.stop - sl.start, device=logits.device, generator=g)
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
