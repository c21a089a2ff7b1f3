"""Commit step of the denoiser for a whole batch in one launch: per row, choose among the still-masked
positions of the current block (top-k by confidence with k from the schedule, or the threshold / factor
rules of parallel decoding, always at least one; each row its own rule), write the chosen tokens into
the canvas, set their bits in the row's seen-id bitmap (the repetition penalty's state), and report
which positions were committed. Contract and rules: docs/kernels.md ("unmask").

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

How the kernel ranks: each position's confidence becomes an int32 key with the same order; one bitonic
sort of the row's keys (tl.sort, in registers) gives the confidences by rank, hence the factor rule's
count and the key at rank n - 1 (the cut). The n most confident are the keys above the cut and, among
the keys equal to it, the lowest positions (a prefix sum in position order). No L x L comparison matrix
(which does not fit a program beyond L = 1,024): any L up to MAX_BLOCK, without spills.

Layout: the Triton kernel, its plan and launcher, the configurations it compiles for (compile_plans),
the torch implementation (the reference, and the backend off CUDA).
"""

from __future__ import annotations

import torch

from .launch import Launch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

TOPK, THRESHOLD, FACTOR = 0, 1, 2
RULES = {"topk": TOPK, "threshold": THRESHOLD, "factor": FACTOR}
# The longest block one program ranks: the model's context (8,192 positions for ModernBERT/mmBERT), the
# largest block the engine accepts (`infill` without a block size commits over the whole canvas).
MAX_BLOCK = 8192

if triton is not None:

    @triton.jit
    def _order_key(conf_ptr, i, ok):
        """(confidence, candidate, key) per position. Key: the float's bits as an int32 with the float's
        order (negative floats have their magnitude bits flipped); non-candidates below every candidate."""
        c = tl.load(conf_ptr + i, mask=ok, other=float("-inf")).to(tl.float32)
        cand = c > float("-inf")  # NaN is no candidate either
        bits = c.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        return c, cand, tl.where(cand, key, -2147483648)

    @triton.jit
    def _first_n_at_least(key, cut, n):
        """The n positions ranked first among keys >= cut: every key above the cut, then the lowest
        positions holding the cut itself (ties rank the lower position first)."""
        above = key > cut
        at = (key == cut).to(tl.int32)
        return above | ((at != 0) & (tl.cumsum(at, axis=0) <= n - tl.sum(above.to(tl.int32), axis=0)))

    # has_seen is a runtime flag (one program with and without the bitmap): never specialized to a constant
    @triton.jit(do_not_specialize=["has_seen"])
    def _unmask_kernel(
        conf_ptr, conf_stride_b,
        tok_ptr, tok_stride_b,
        k_ptr, rule_ptr, value_ptr, start_ptr, rows_ptr,
        canvas_ptr, canvas_stride_r,
        seen_ptr, seen_stride_r,
        chosen_ptr, chosen_stride_b,
        L, unseen0, unseen1, has_seen,
        BLOCK_L: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, BLOCK_L)
        ok = i < L
        conf_row = conf_ptr + b * conf_stride_b
        rule = tl.load(rule_ptr + b)
        value = tl.load(value_ptr + b)
        k = tl.load(k_ptr + b).to(tl.int32)

        # Phase 1: sort the keys and reduce the ranking to scalars (how many to take, the key at that
        # rank); nothing of size L outlives it, so large blocks keep their registers.
        _, cand, key = _order_key(conf_row, i, ok)
        n_cand = tl.sum(cand.to(tl.int32), axis=0)
        ranked = tl.sort(key, descending=True)  # ranked[r]: key of the (r + 1)-th most confident
        r = tl.arange(0, BLOCK_L)
        # factor rule: the n most confident, largest n with (n + 1) * (1 - c_n) < factor, at least one
        c_r = tl.where(ranked < 0, ranked ^ 0x7FFFFFFF, ranked).to(tl.float32, bitcast=True)
        good = (r < n_cand) & ((r + 2).to(tl.float32) * (1.0 - c_r) < value)
        count = tl.maximum(tl.max(tl.where(good, r + 1, 0), axis=0), 1)
        # top-k takes k, factor `count`; threshold at least the most confident (rank 0)
        n_take = tl.minimum(tl.where(rule == 0, k, tl.where(rule == 2, count, 1)), BLOCK_L)
        # (n_take <= 0, top-k with k = 0: a cut above every key, so nothing passes)
        cut = tl.where(n_take > 0, tl.sum(tl.where(r == n_take - 1, ranked, 0), axis=0), 2147483647)

        # Phase 2: the keys again (a reload from cache, cheaper than keeping them live), the selection.
        # n past the candidates: the cut is a non-candidate's key and every candidate passes.
        c, cand, key = _order_key(conf_row, i, ok)
        first = _first_n_at_least(key, cut, n_take)
        sel = cand & tl.where(rule == 1, first | (c >= value), first)

        row = tl.load(rows_ptr + b).to(tl.int64)
        start = tl.load(start_ptr + b)
        tok = tl.load(tok_ptr + b * tok_stride_b + i, mask=ok, other=0)
        tl.store(canvas_ptr + row * canvas_stride_r + start + i, tok.to(canvas_ptr.dtype.element_ty), mask=ok & sel)
        if has_seen != 0:
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


def plan_unmask(conf, tokens, k, block_start, canvas, rule, value, rows, seen, unseen, chosen) -> Launch:
    """The launch for prepared inputs (see `unmask_triton`); `chosen` [B, L] int8 receives the result."""
    B, L = conf.shape
    if L > MAX_BLOCK:
        raise ValueError(f"the unmask kernel ranks blocks of up to {MAX_BLOCK} positions, got {L}")
    if conf.stride(1) != 1 or tokens.stride(1) != 1 or canvas.stride(1) != 1:
        raise ValueError("conf, tokens and canvas must be contiguous along their last dimension")
    block = max(16, triton.next_power_of_2(L))
    unseen = tuple(unseen) + (-1, -1)
    if rule.dtype != torch.int32 or (seen is not None and seen.dtype != torch.int32):
        raise ValueError("rule and seen must be int32 (`rule` stands in for an absent seen bitmap)")
    return Launch(_unmask_kernel, (B,), (
        conf, conf.stride(0), tokens, tokens.stride(0), k, rule, value, block_start, rows,
        # without a bitmap the kernel never touches seen_ptr, but its atomic_or is still compiled (has_seen is
        # a runtime flag): the stand-in must be int32 like the bitmap, so `rule` ([B] int32) stands in
        canvas, canvas.stride(0), seen if seen is not None else rule, seen.stride(0) if seen is not None else 0,
        chosen, chosen.stride(0), L, unseen[0], unseen[1], int(seen is not None)),
        # the sort keeps a few values per position live: 8 positions per thread from 2,048 on, 16 at
        # 8,192 (32 warps would cap a thread at 64 registers and spill) keep them in registers: no
        # spills up to MAX_BLOCK (bench/gpu_compile_check.py); floats are not
        # contracted, so the factor rule's comparison rounds as in torch
        dict(BLOCK_L=block, num_warps=min(16, max(4, block // 256)),
             enable_fp_fusion=False))


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
    if B and L:
        plan_unmask(conf.contiguous(), tokens.contiguous(), k, block_start, canvas, rule, value, rows, seen,
                    unseen, chosen).run()
    return chosen.bool()


def compile_plans(sms: int = 132, batch: int = 64, length: int = 2048, vocab: int = 256_000) -> list[Launch]:
    """Every configuration the launcher can choose for the engine's inputs, on meta tensors: one block
    size per BLOCK_L up to MAX_BLOCK (the engine's blocks are powers of two), odd sizes and a single
    position where blocks usually are, each with and without the seen bitmap (a runtime flag: both calls
    must give one program, which they do only when the stand-in has the bitmap's type); the grid does not
    depend on the GPU (`sms` is unused)."""
    meta = torch.device("meta")
    out = []
    seen = torch.empty(batch, (vocab + 31) // 32, dtype=torch.int32, device=meta)
    for L in [1, 31, 32, 33] + [2**e for e in range(6, MAX_BLOCK.bit_length())]:
        for bitmap in (seen, None):  # with and without a repetition penalty in the batch
            per_row = torch.empty(batch, dtype=torch.long, device=meta)
            out.append(plan_unmask(
                torch.empty(batch, L, device=meta), torch.empty(batch, L, dtype=torch.long, device=meta), per_row,
                per_row, torch.empty(batch, max(length, L), dtype=torch.long, device=meta),
                torch.empty(batch, dtype=torch.int32, device=meta), torch.empty(batch, device=meta), per_row,
                bitmap, (4, 2), torch.empty(batch, L, dtype=torch.int8, device=meta),
            ).labelled(f"L={L}" + ("" if bitmap is not None else " no-seen")))
    return out


# ----------------------------------------------------------------------------------------------- torch
def unmask_torch(conf, tokens, k, block_start, canvas, rule="topk", value=None, rows=None, seen=None,
                 unseen: tuple[int, ...] = ()):
    """The same contract in torch (the reference and the CPU path): a fixed number of ops whatever the
    batch, no host synchronization, O(L log L) per row (a sort, no L x L matrix)."""
    one_rule = rule if isinstance(rule, str) else None  # one rule for every row: compute only it
    rule, value, k, block_start, rows = _prepare(conf, tokens, k, block_start, canvas, rule, value, rows, seen)
    B, L = conf.shape
    c = conf.float()
    cand = c > -torch.inf
    c = c.masked_fill(~cand, -torch.inf)  # NaN is no candidate
    pos = torch.arange(L, device=conf.device)
    # a stable descending sort ranks equal confidences lower position first
    ranked, order = torch.sort(c, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, pos.expand(B, L))
    sel = {}
    if one_rule in (None, "topk"):
        sel[TOPK] = rank < k[:, None]
    if one_rule in (None, "threshold"):
        sel[THRESHOLD] = (c >= value[:, None]) | (rank == 0)
    if one_rule in (None, "factor"):
        n_cand = cand.sum(1, keepdim=True)
        good = (pos[None, :] < n_cand) & ((pos[None, :] + 2).float() * (1 - ranked) < value[:, None])
        count = torch.where(good, pos[None, :] + 1, 0).amax(-1, keepdim=True).clamp(min=1)
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
    # repeats of a token within the row, after its first kept occurrence: sort the kept tokens (the
    # others get distinct negative keys), a stable sort puts equal tokens side by side in position order
    pos = torch.arange(L, device=tok.device)
    key = torch.where(keep, tok, -1 - pos[None, :])
    ordered, order = torch.sort(key, dim=1, stable=True)
    repeat = torch.zeros_like(keep)
    repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
    keep &= ~torch.zeros_like(keep).scatter_(1, order, repeat)
    word, shift = tok // 32, tok % 32
    already = (seen[rr, word].long() >> shift) & 1
    bits = torch.where(keep & (already == 0), torch.ones_like(tok) << shift, 0)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)  # bit 31 as int32
    seen.index_put_((rr.reshape(-1), word.reshape(-1)), bits.reshape(-1), accumulate=True)
