"""Training objectives: which positions to mask and how much each scored token weighs.

  mlm   the paper's continual pre-training: each maskable token masked with a fixed probability p;
        weight 1/p, so that the loss below is (in expectation) the mean cross-entropy per masked token;
  mdlm  the masked-diffusion loss of the SFT stages: per row t ~ U[t_min, 1), each maskable token masked
        with probability t, weight 1/t (the ELBO's weighting).

The loss of a batch is sum(weight * CE over masked tokens) / (maskable tokens of the whole optimizer
step), one normalization for both objectives that does not depend on how the step is split into
micro-batches or processes. Masked tokens are replaced by [MASK] (no 80/10/10: the generator only ever
sees [MASK] at the positions it fills).

Every random draw of an example comes from a generator keyed by (seed, epoch, example index), so masks
are the same whichever process or micro-batch the example lands in, and after a resume.
"""

from __future__ import annotations

import torch


def example_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    # mod 2**64: any config seed works (torch takes 64-bit seeds); seeds below ~1.8e6 are unchanged
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 10_000_019 + index) % 2**64)


def mask_example(ids: torch.Tensor, maskable: torch.Tensor, objective: str, mask_id: int, g: torch.Generator,
                 p: float = 0.15, t_min: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(input ids with [MASK]s, boolean mask of the masked positions, weight of each masked token)."""
    if objective == "mlm":
        prob, weight = p, 1.0 / p
    elif objective == "mdlm":
        t = t_min + (1.0 - t_min) * torch.rand((), generator=g).item()
        prob, weight = t, 1.0 / t
    else:
        raise ValueError(f"unknown objective {objective!r}")
    masked = (torch.rand(ids.shape, generator=g) < prob) & maskable
    return torch.where(masked, mask_id, ids), masked, weight


def mask_batch(ids, maskable, indices: list[int], epoch: int, seed: int, objective: str, mask_id: int,
               p: float, t_min: float):
    """Mask a collated batch row by row with per-example generators; returns (inputs, masked [B, T]
    bool, weights [B] float)."""
    inputs = ids.clone()
    masked = torch.zeros_like(maskable)
    weights = torch.zeros(ids.shape[0])
    for row, index in enumerate(indices):
        n = int(maskable[row].numel())
        g = example_generator(seed, epoch, index)
        x, m, w = mask_example(ids[row, :n], maskable[row, :n], objective, mask_id, g, p, t_min)
        inputs[row, :n], masked[row, :n], weights[row] = x, m, w
    return inputs, masked, weights
