"""Commit step of the denoiser for a whole batch in one launch: per row, choose among the still-masked
positions of the current block (top-k by confidence with k from the schedule, or the threshold / factor
rules of parallel decoding, always at least one; each row its own rule), write the chosen tokens into
the canvas, set their bits in the row's seen-id bitmap (the repetition penalty's state), and report
which positions were committed.

Why a kernel: the choice is tiny (a block is 32 positions) but, done per request in Python, it costs a
host round trip and a handful of launches per row at every step; here it is one launch for the batch,
with no host synchronization, so a step can be captured in a CUDA graph.

Inputs are block-local: conf [B, L] (-inf where a position is not a candidate: already committed, past
the row's block, or padding), tokens [B, L] (the sampler's choice per candidate), k [B] (the schedule's
count; read by top-k rows only), rule [B] (TOPK / THRESHOLD / FACTOR) and value [B] (the threshold or
the factor), block_start [B] (canvas column of block position 0), rows [B] (the canvas row, and seen
bitmap row, of each batch row: the engine's slots). The ranking is by confidence, ties to the lower
position (a total order, so "the k most confident" is always well defined). A committed token sets its
bit in seen[rows[b]] unless it is one of `unseen` (the mask and EOS ids, which the penalty ignores).
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
        k_ptr, rule_ptr, value_ptr, start_ptr, rows_ptr,
        canvas_ptr, canvas_stride_r,
        seen_ptr, seen_stride_r,
        chosen_ptr, chosen_stride_b,
        L, unseen0, unseen1,
        HAS_SEEN: tl.constexpr, BLOCK_L: tl.constexpr,
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
        rule = tl.load(rule_ptr + b)
        value = tl.load(value_ptr + b)
        # top-k, k from the schedule (never more than the candidates)
        k = tl.load(k_ptr + b).to(tl.int32)
        sel_topk = rank < k
        # every candidate >= threshold, at least the most confident
        sel_threshold = (c >= value) | (rank == 0)
        # the n most confident, largest n with (n + 1) * (1 - c_n) < factor, at least one
        n = rank + 1
        good = cand & ((n + 1).to(tl.float32) * (1.0 - c) < value)
        count = tl.maximum(tl.max(tl.where(good, n, 0), axis=0), 1)
        sel_factor = rank < count
        sel = cand & tl.where(rule == 0, sel_topk, tl.where(rule == 1, sel_threshold, sel_factor))

        row = tl.load(rows_ptr + b).to(tl.int64)
        start = tl.load(start_ptr + b)
        tok = tl.load(tok_ptr + b * tok_stride_b + i, mask=ok, other=0)
        tl.store(canvas_ptr + row * canvas_stride_r + start + i, tok.to(canvas_ptr.dtype.element_ty), mask=ok & sel)
        if HAS_SEEN:
            tok32 = tok.to(tl.int32)
            bit = tl.full((BLOCK_L,), 1, tl.int32) << (tok32 % 32)
            keep = ok & sel & (tok32 != unseen0) & (tok32 != unseen1)
            tl.atomic_or(seen_ptr + row * seen_stride_r + tok32 // 32, bit, mask=keep)
        tl.store(chosen_ptr + b * chosen_stride_b + i, sel.to(tl.int8), mask=ok)


def _prepare(conf, tokens, k, block_start, canvas, rule, value, rows, seen):
    """Checks, and the per-row rule codes [B] int32, values [B] float32, k, block starts and canvas
    rows [B]."""
    if isinstance(rule, str):
        if rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {rule!r}")
        if rule != "topk" and value is None:
            raise ValueError(f"the {rule} rule needs its value")
    if conf.dim() != 2 or tokens.shape != conf.shape:
        raise ValueError(f"conf and tokens must both be [B, L], got {tuple(conf.shape)} and {tuple(tokens.shape)}")
    B, L = conf.shape
    device = conf.device
    if k is None:
        if not isinstance(rule, str) or rule == "topk":
            raise ValueError(f"block_start and k for top-k must have shape [{B}]")
        k = torch.zeros(B, dtype=torch.long, device=device)
    if block_start.shape != (B,) or k.shape != (B,):
        raise ValueError(f"block_start and k for top-k must have shape [{B}]")
    if rows is not None and rows.shape != (B,):
        raise ValueError(f"rows must have shape [{B}], got {tuple(rows.shape)}")
    if canvas.dim() != 2 or (rows is None and canvas.shape[0] != B):
        raise ValueError(f"canvas must be [B, T] (or [S, T] with rows), got {tuple(canvas.shape)}")
    if seen is not None and (seen.dim() != 2 or seen.dtype != torch.int32 or seen.shape[0] != canvas.shape[0]):
        raise ValueError("seen must be an int32 bitmap [S, W] with one row per canvas row")
    tensors = (conf, tokens, k, block_start, canvas) + tuple(t for t in (rows, seen) if t is not None)
    if len({t.device for t in tensors}) != 1:
        raise ValueError("conf, tokens, k, block_start, canvas, rows and seen must be on one device")
    if isinstance(rule, str):
        rule = torch.full((B,), RULES[rule], dtype=torch.int32, device=device)
    if not isinstance(value, torch.Tensor):
        value = torch.full((B,), float(value or 0.0), dtype=torch.float32, device=device)
    if rule.shape != (B,) or value.shape != (B,):
        raise ValueError(f"rule and value must be one per row ([{B}]), got {tuple(rule.shape)} and {tuple(value.shape)}")
    rows = rows if rows is not None else torch.arange(B, device=device)
    # the kernel reads one element per row: column views of the caller's state become contiguous
    return (rule.to(torch.int32).contiguous(), value.to(torch.float32).contiguous(), k.contiguous(),
            block_start.contiguous(), rows.contiguous())


def unmask_triton(conf, tokens, k, block_start, canvas, rule="topk", value=None, rows=None, seen=None,
                  unseen: tuple[int, ...] = ()):
    """Commit in place into canvas rows `rows` (default: row b for batch row b); returns the chosen mask
    [B, L] (bool). rule / value: one rule name and value for every row, or [B] tensors of rule codes
    (TOPK, THRESHOLD, FACTOR) and values. The caller guarantees block_start + L <= T for every row (or
    that positions past T are not candidates)."""
    if triton is None:
        raise RuntimeError("the triton unmask kernel needs the `triton` package")
    rule, value, k, block_start, rows = _prepare(conf, tokens, k, block_start, canvas, rule, value, rows, seen)
    B, L = conf.shape
    chosen = torch.zeros((B, L), dtype=torch.int8, device=conf.device)
    if B == 0 or L == 0:
        return chosen.bool()
    unseen = tuple(unseen) + (-1, -1)
    _unmask_kernel[(B,)](
        conf, conf.stride(0), tokens, tokens.stride(0), k, rule, value, block_start, rows,
        canvas, canvas.stride(0), seen if seen is not None else chosen, seen.stride(0) if seen is not None else 0,
        chosen, chosen.stride(0), L, unseen[0], unseen[1],
        HAS_SEEN=seen is not None, BLOCK_L=max(16, triton.next_power_of_2(L)),
    )
    return chosen.bool()


def unmask_torch(conf, tokens, k, block_start, canvas, rule="topk", value=None, rows=None, seen=None,
                 unseen: tuple[int, ...] = ()):
    """The same contract in torch (the reference and the CPU path): a fixed number of ops whatever the
    batch, no host synchronization."""
    one_rule = rule if isinstance(rule, str) else None  # one rule for every row: compute only it
    rule, value, k, block_start, rows = _prepare(conf, tokens, k, block_start, canvas, rule, value, rows, seen)
    B, L = conf.shape
    c = conf.float()
    cand = c > -torch.inf
    pos = torch.arange(L, device=conf.device)
    ahead = (c[:, None, :] > c[:, :, None]) | ((c[:, None, :] == c[:, :, None]) & (pos[None, None, :] < pos[None, :, None]))
    rank = (ahead & cand[:, None, :]).sum(-1)
    sel = {}
    if one_rule in (None, "topk"):
        sel[TOPK] = rank < k[:, None]
    if one_rule in (None, "threshold"):
        sel[THRESHOLD] = (c >= value[:, None]) | (rank == 0)
    if one_rule in (None, "factor"):
        n = rank + 1
        good = cand & ((n + 1).float() * (1 - c) < value[:, None])
        count = torch.where(good, n, 0).amax(-1, keepdim=True).clamp(min=1)
        sel[FACTOR] = rank < count
    if one_rule is None:
        r = rule[:, None]
        sel = cand & torch.where(r == TOPK, sel[TOPK], torch.where(r == THRESHOLD, sel[THRESHOLD], sel[FACTOR]))
    else:
        sel = cand & sel[RULES[one_rule]]

    cols = (block_start[:, None] + pos[None, :]).clamp(max=canvas.shape[1] - 1)
    rr = rows[:, None].repeat(1, L)  # materialized: the same ops whatever B and L
    # The write as an added difference: chosen positions receive (token - current), the others 0, so
    # positions named twice (clamped past the end, padding rows sharing a canvas row) add nothing and
    # the result does not depend on the order of the writes; no data-dependent shapes.
    delta = torch.where(sel, tokens.to(canvas.dtype) - canvas[rr, cols], 0)
    canvas.index_put_((rr.reshape(-1), cols.reshape(-1)), delta.reshape(-1), accumulate=True)
    if seen is not None:
        _set_seen_bits(seen, rr, tokens, sel, unseen)
    return sel


def _set_seen_bits(seen, rr, tokens, sel, unseen) -> None:
    """seen[rr, tok // 32] |= 1 << (tok % 32) for the committed tokens, in a fixed number of ops.

    torch has no scatter-OR, so the bits are added instead: a token committed twice in one row counts
    once, and a bit already set is not added again, so every word receives distinct unset bits, whose
    sum is their OR. int32 words never overflow on the way: each addition sets one more unset bit."""
    B, L = tokens.shape
    tok = tokens.long()
    keep = sel.clone()
    for u in unseen:
        keep &= tok != u
    earlier = torch.ones(L, L, dtype=torch.bool, device=tok.device).tril(-1)  # [i, j]: j before i
    dup = ((tok[:, :, None] == tok[:, None, :]) & keep[:, None, :] & earlier).any(-1)
    keep &= ~dup
    word, shift = tok // 32, tok % 32
    already = (seen[rr, word].long() >> shift) & 1
    bits = torch.where(keep & (already == 0), torch.ones_like(tok) << shift, 0)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)  # bit 31 as int32
    seen.index_put_((rr.reshape(-1), word.reshape(-1)), bits.reshape(-1), accumulate=True)
