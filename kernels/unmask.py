"""Commit step of the denoiser for a whole batch in one launch: per row, choose among the still-masked
positions of the current block (top-k by confidence with k from the schedule, or the threshold / factor
rules of parallel decoding, always at least one), write the chosen tokens into the canvas and report
which positions were committed.

Why a kernel: the choice is tiny (a block is 32 positions) but, done per request in Python, it costs a
host round trip and a handful of launches per row at every step; here it is one launch for the batch,
with no host synchronization, so a step can be captured in a CUDA graph.

Inputs are block-local: conf [B, L] (-inf where a position is not a candidate: already committed, past
the row's block, or padding), tokens [B, L] (the sampler's choice per candidate), k [B] (the schedule's
count; ignored by the threshold and factor rules), block_start [B] (canvas column of block position 0).
The ranking is by confidence, ties to the lower position (a total order, so "the k most confident" is
always well defined).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

TOPK, THRESHOLD, FACTOR = 0, 1, 2
RULES = {"topk": TOPK, "threshold": THRESHOLD, "factor": FACTOR}

if triton is not None:

    @triton.jit
    def _unmask_kernel(
        conf_ptr, conf_stride_b,
        tok_ptr, tok_stride_b,
        k_ptr, start_ptr,
        canvas_ptr, canvas_stride_b,
        chosen_ptr, chosen_stride_b,
        L, value,
        RULE: tl.constexpr, BLOCK_L: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, BLOCK_L)
        ok = i < L
        c = tl.load(conf_ptr + b * conf_stride_b + i, mask=ok, other=float("-inf")).to(tl.float32)
        cand = c > float("-inf")
        # rank of each position: how many candidates come before it (higher confidence, or equal
        # confidence at a lower position); rank 0 is the most confident
        ahead = (c[None, :] > c[:, None]) | ((c[None, :] == c[:, None]) & (i[None, :] < i[:, None]))
        ahead = ahead & cand[None, :]
        rank = tl.sum(ahead.to(tl.int32), axis=1)
        if RULE == 0:  # top-k, k from the schedule (never more than the candidates)
            k = tl.load(k_ptr + b).to(tl.int32)
            sel = cand & (rank < k)
        elif RULE == 1:  # every candidate >= threshold, at least the most confident
            sel = cand & ((c >= value) | (rank == 0))
        else:  # the n most confident, largest n with (n + 1) * (1 - c_n) < factor, at least one
            n = rank + 1
            good = cand & ((n + 1).to(tl.float32) * (1.0 - c) < value)
            count = tl.maximum(tl.max(tl.where(good, n, 0), axis=0), 1)
            sel = cand & (rank < count)
        start = tl.load(start_ptr + b)
        tok = tl.load(tok_ptr + b * tok_stride_b + i, mask=ok, other=0)
        tl.store(canvas_ptr + b * canvas_stride_b + start + i, tok.to(canvas_ptr.dtype.element_ty), mask=ok & sel)
        tl.store(chosen_ptr + b * chosen_stride_b + i, sel.to(tl.int8), mask=ok)


def _check(conf, tokens, k, block_start, canvas, rule: str, value):
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
    if conf.dim() != 2 or tokens.shape != conf.shape:
        raise ValueError(f"conf and tokens must both be [B, L], got {tuple(conf.shape)} and {tuple(tokens.shape)}")
    B, L = conf.shape
    if block_start.shape != (B,) or (rule == "topk" and (k is None or k.shape != (B,))):
        raise ValueError(f"block_start (and k for top-k) must have shape [{B}]")
    if canvas.dim() != 2 or canvas.shape[0] != B:
        raise ValueError(f"canvas must be [B, T] with B = {B}, got {tuple(canvas.shape)}")
    if rule != "topk" and value is None:
        raise ValueError(f"the {rule} rule needs its value")
    if len({t.device for t in (conf, tokens, block_start, canvas)}) != 1:
        raise ValueError("conf, tokens, block_start and canvas must be on one device")


def unmask_triton(conf, tokens, k, block_start, canvas, rule: str = "topk", value: float | None = None):
    """Commit in place into canvas [B, T]; returns the chosen mask [B, L] (bool). The caller guarantees
    block_start + L <= T for every row (or that positions past T are not candidates)."""
    if triton is None:
        raise RuntimeError("the triton unmask kernel needs the `triton` package")
    _check(conf, tokens, k, block_start, canvas, rule, value)
    B, L = conf.shape
    chosen = torch.zeros((B, L), dtype=torch.int8, device=conf.device)
    if B == 0 or L == 0:
        return chosen.bool()
    k = k if k is not None else torch.zeros(B, dtype=torch.long, device=conf.device)
    _unmask_kernel[(B,)](
        conf, conf.stride(0), tokens, tokens.stride(0), k, block_start, canvas, canvas.stride(0),
        chosen, chosen.stride(0), L, float(value or 0.0),
        RULE=RULES[rule], BLOCK_L=max(16, triton.next_power_of_2(L)),
    )
    return chosen.bool()


def unmask_torch(conf, tokens, k, block_start, canvas, rule: str = "topk", value: float | None = None):
    """The same contract in torch (the reference and the CPU path)."""
    _check(conf, tokens, k, block_start, canvas, rule, value)
    B, L = conf.shape
    c = conf.float()
    cand = c > -torch.inf
    pos = torch.arange(L, device=conf.device)
    ahead = (c[:, None, :] > c[:, :, None]) | ((c[:, None, :] == c[:, :, None]) & (pos[None, None, :] < pos[None, :, None]))
    rank = (ahead & cand[:, None, :]).sum(-1)
    if rule == "topk":
        sel = cand & (rank < k[:, None])
    elif rule == "threshold":
        sel = cand & ((c >= value) | (rank == 0))
    else:
        n = rank + 1
        good = cand & ((n + 1).float() * (1 - c) < value)
        count = torch.where(good, n, 0).amax(-1).clamp(min=1)
        sel = cand & (rank < count[:, None])
    cols = block_start[:, None] + pos[None, :]
    rows = torch.arange(B, device=conf.device)[:, None].expand(B, L)
    canvas[rows[sel], cols[sel]] = tokens[sel].to(canvas.dtype)
    return sel
