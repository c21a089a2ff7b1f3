"""Fused linear + cross-entropy for training: loss and gradients without the [N, V] logits.

Why: with a 256,000-token vocabulary the plain path (``logits = h @ W.T; F.cross_entropy``) holds
N x V logits, their log-softmax and their gradient at once: at N = 8192 that is 4 GiB per copy in
bfloat16. Here logits only ever exist as one bounded block (``chunk_rows x V`` elements), and the
gradients are computed during the forward pass, so nothing of size N x V survives it.

Algorithm (two passes, each block's logits come from a torch matmul in the inputs' dtype, i.e. with
fp32 accumulation, and every softmax statistic is computed in fp32):
  1. row chunks: z = h[rows] @ W.T + b; a kernel streams each row's vocabulary tiles through an online
     max / log-sum-exp and writes lse_i and loss_i = s_i * (lse_i - z_i[target_i]).
  2. vocabulary slices (only when a gradient is needed): z = h @ W[cols].T + b[cols]; a kernel
     overwrites z in place with dL/dz = s_i * (softmax(z_i) - onehot(target_i)) using lse from pass 1;
     then grad_W[cols] = g.T @ h and grad_b[cols] = sum_i g are written once (one GEMM over all rows:
     each element rounded once, exactly like the plain path), and grad_h accumulates g @ W[cols] in
     fp32 ([N, H] is small).
Slicing pass 2 by vocabulary rather than by rows costs one extra logits GEMM but avoids what a
row-chunked backward needs: an fp32 [V, H] accumulator (786 MB at H = 768) updated once per chunk,
whose traffic would cost more than that GEMM. s_i = row_weight_i (0 on ignored rows), divided by the
number of non-ignored rows for reduction="mean" (0 rows: the loss is 0, not NaN).

backward only scales the stored gradients by the incoming scalar (in place, so once: a second
backward through the same loss raises). Under torch.no_grad, or when no input needs a gradient,
pass 2 is skipped: that is also the perplexity evaluation path.

Layout: the Triton kernels, their plans and launchers, compile_plans, the torch versions of the two
passes (the CPU backend, same algorithm, in-place ops on the block), the autograd.Function, the two
backends' entry points (`linear_cross_entropy_triton`, `linear_cross_entropy_torch`: one signature;
diffutron_engine.backends chooses between them), and the plain torch reference. triton is optional:
without it the torch backend still works. See docs/kernels.md.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from .launch import Launch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch backend below needs no triton
    triton = None
    tl = None

if triton is not None:

    @triton.jit
    def _ce_lse_kernel(
        z_ptr, z_stride,  # [R, V] logits block (one row per program), unit stride along V
        target_ptr, scale_ptr,  # [R] int64 target, [R] fp32 row scale (0 for ignored rows)
        loss_ptr, lse_ptr,  # [R] fp32 outputs
        V,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        z_row = z_ptr + row * z_stride
        cols = tl.arange(0, BLOCK_V)
        # Per-lane running max and sum of exp(z - max): no cross-lane reduction inside the loop.
        m = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            x = tl.load(z_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            # A lane that has seen only -inf keeps m = -inf; shift it by 0 so exp gives 0, not NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.exp(x - shift)
            m = m_new
        m_row = tl.max(m, axis=0)
        lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))

        t = tl.load(target_ptr + row)
        hit = (t >= 0) & (t < V)  # ignored rows (any target) have scale 0: their loss is 0
        z_t = tl.load(z_row + t, mask=hit, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + row)
        tl.store(loss_ptr + row, scale * (lse - z_t))
        tl.store(lse_ptr + row, lse)

    @triton.jit
    def _ce_grad_kernel(
        z_ptr, z_stride,  # [N, W] logits of vocabulary columns [col0, col0 + W), overwritten by dL/dz
        target_ptr, lse_ptr, scale_ptr,  # [N] int64, [N] fp32, [N] fp32
        col0, W,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        mask = cols < W
        ptrs = z_ptr + row * z_stride + cols
        z = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + row)
        scale = tl.load(scale_ptr + row)
        t = tl.load(target_ptr + row)
        # z - lse <= 0 (up to rounding), so exp never overflows and 0-scaled rows give exact zeros.
        g = scale * (tl.exp(z - lse) - tl.where(cols + col0 == t, 1.0, 0.0))
        tl.store(ptrs, g.to(z_ptr.dtype.element_ty), mask=mask)


# Tiles: the loss pass loops over a whole row, the gradient pass is one tile per program.
LSE_BLOCK_V = 4096
GRAD_BLOCK_V = 1024
# Default bound on one block of logits (pass 1: chunk_rows x V, pass 2: N x slice): 128 MiB in the
# inputs' dtype, i.e. 256 rows of a 256,000 vocabulary in bfloat16. Big enough that every GEMM stays
# efficient (M, N, K all >= 256), small next to the 4+ GiB tensors of the plain path.
LOGITS_BLOCK_BYTES = 128 * 2**20
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check_block(z, target, *vectors):
    """Launcher checks: a [R, W] block with unit stride along W, and [R] int64/fp32 row vectors."""
    if triton is None:
        raise RuntimeError("linear_cross_entropy_triton needs triton installed")
    if z.dim() != 2 or z.stride(1) != 1 or z.dtype not in _DTYPES:
        raise ValueError(f"logits block must be a [R, W] {_DTYPES} tensor with unit stride along W; "
                         f"got {tuple(z.shape)} strides {z.stride()} {z.dtype}")
    if z.device.type != "cuda" and not _interpreting():
        raise ValueError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                         f"interpreter); got {z.device}")
    rows = z.shape[0]
    if target.shape != (rows,) or target.dtype != torch.int64 or not target.is_contiguous():
        raise ValueError(f"target must be a contiguous int64 [{rows}] tensor; got {tuple(target.shape)} "
                         f"{target.dtype}")
    for v in vectors:
        if v.shape != (rows,) or v.dtype != torch.float32 or not v.is_contiguous():
            raise ValueError(f"row vectors must be contiguous float32 [{rows}]; got {tuple(v.shape)} {v.dtype}")
    if any(t.device != z.device for t in (target, *vectors)):
        raise ValueError("the logits block and its row vectors must be on one device")


def plan_lse(z, target, scale, loss_out, lse_out) -> Launch:
    """Pass 1's launch on a block of logits z [R, V] (one row per program, the row's tiles in a loop)."""
    block = min(LSE_BLOCK_V, triton.next_power_of_2(z.shape[1]))
    return Launch(_ce_lse_kernel, (z.shape[0],), (z, z.stride(0), target, scale, loss_out, lse_out, z.shape[1]),
                  dict(BLOCK_V=block, num_warps=8 if block >= 2048 else 4, enable_fp_fusion=True))


def plan_grad(z, col0, target, lse, scale) -> Launch:
    """Pass 2's launch on a vocabulary slice z [N, W] (one tile per program)."""
    block = min(GRAD_BLOCK_V, triton.next_power_of_2(z.shape[1]))
    return Launch(_ce_grad_kernel, (z.shape[0], triton.cdiv(z.shape[1], block)),
                  (z, z.stride(0), target, lse, scale, col0, z.shape[1]),
                  dict(BLOCK_V=block, num_warps=4, enable_fp_fusion=True))


def _lse_pass_triton(z, target, scale, loss_out, lse_out):
    _check_block(z, target, scale, loss_out, lse_out)
    plan_lse(z, target, scale, loss_out, lse_out).run()


def _grad_pass_triton(z, col0, target, lse, scale):
    _check_block(z, target, lse, scale)
    plan_grad(z, col0, target, lse, scale).run()


def compile_plans(sms: int = 132, rows: int = 8192, vocab: int = 256_000, hidden: int = 768) -> list[Launch]:
    """The launches of a training step at the model's shapes (N = 8,192 masked positions, V = 256,000),
    on meta tensors: float32 / bfloat16 / float16 blocks of pass 1 (chunk rows x V) and pass 2 (N x
    slice width, as `_loss_and_grads` sizes them), and a vocabulary smaller than one tile."""
    meta = torch.device("meta")
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        size = torch.empty(0, dtype=dtype).element_size()
        chunk = max(1, LOGITS_BLOCK_BYTES // (vocab * size))
        width = min(vocab, _round_up(max(64, chunk * vocab // rows), 64))
        for v, r, w in ((vocab, chunk, width), (1000, 7, 1000)):
            f32 = dict(dtype=torch.float32, device=meta)
            target = torch.empty(r, dtype=torch.long, device=meta)
            out.append(plan_lse(torch.empty(r, v, dtype=dtype, device=meta), target, torch.empty(r, **f32),
                                torch.empty(r, **f32), torch.empty(r, **f32)).labelled(f"{str(dtype)[6:]} V={v}"))
            n = rows if v == vocab else r
            target = torch.empty(n, dtype=torch.long, device=meta)
            out.append(plan_grad(torch.empty(n, w, dtype=dtype, device=meta), 0, target, torch.empty(n, **f32),
                                 torch.empty(n, **f32)).labelled(f"{str(dtype)[6:]} slice {w}"))
    return out


def _lse_pass_torch(z, target, scale, loss_out, lse_out):
    """Same as _ce_lse_kernel. Destroys z (pass 2 recomputes the logits it needs)."""
    z_t = z.gather(1, target.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1).float()
    x = z if z.dtype == torch.float32 else z.float()  # fp32 math, as the kernel; a block-sized temp
    m = x.amax(dim=1, keepdim=True)
    lse = x.sub_(m).exp_().sum(dim=1).log_().add_(m.squeeze(1))
    lse_out.copy_(lse)
    loss_out.copy_(scale * (lse - z_t))


def _grad_pass_torch(z, col0, target, lse, scale):
    """Same as _ce_grad_kernel, in place on z (through one fp32 copy for half-precision blocks)."""
    x = z if z.dtype == torch.float32 else z.float()
    x.sub_(lse[:, None]).exp_().mul_(scale[:, None])
    col = target - col0
    hit = (col >= 0) & (col < z.shape[1])  # no nonzero(): no device sync
    x.scatter_add_(1, col.clamp(0, z.shape[1] - 1)[:, None], torch.where(hit, -scale, 0.0)[:, None])
    if x is not z:
        z.copy_(x)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _loss_rows(hidden, weight, bias, target, scale, chunk_rows, passes):
    """Pass 1 alone: the fp32 per-row losses s_i * (lse_i - z_i[target_i]) and lse, [N] each. passes:
    the backend's (loss pass, gradient pass)."""
    lse_pass = passes[0]
    n = hidden.shape[0]
    loss_rows = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for r0 in range(0, n, chunk_rows):
        r1 = min(n, r0 + chunk_rows)
        lse_pass(F.linear(hidden[r0:r1], weight, bias), target[r0:r1], scale[r0:r1], loss_rows[r0:r1], lse[r0:r1])
    return loss_rows, lse


def _loss_and_grads(hidden, weight, bias, target, scale, chunk_rows, passes, need_h, need_w, need_b):
    """Both passes. Returns the fp32 loss and (grad_h, grad_W, grad_b), None where not needed."""
    grad_pass = passes[1]
    n, v = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    loss_rows, lse = _loss_rows(hidden, weight, bias, target, scale, chunk_rows, passes)
    loss = loss_rows.sum()
    if not (need_h or need_w or need_b):
        return loss, (None, None, None)
    if n == 0:  # no rows: zero gradients (and no empty kernel grids)
        return loss, tuple(torch.zeros_like(t) if need else None
                           for t, need in ((hidden, need_h), (weight, need_w), (bias, need_b)))

    # Pass 2 blocks hold as many elements as pass 1's: [n, width], width a multiple of 64 (aligned
    # GEMM leading dimensions), slices of equal size so that no tiny last GEMM is left over.
    width = max(64, chunk_rows * v // n)
    width = min(v, _round_up(-(-v // -(-v // width)), 64))
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.empty_like(bias) if need_b else None
    grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=dev) if need_h else None
    for c0 in range(0, v, width):
        c1 = min(v, c0 + width)
        w_slice = weight[c0:c1]
        g = F.linear(hidden, w_slice, None if bias is None else bias[c0:c1])
        grad_pass(g, c0, target, lse, scale)
        if need_w:
            torch.mm(g.t(), hidden, out=grad_w[c0:c1])
        if need_b:
            grad_b[c0:c1] = g.sum(dim=0, dtype=torch.float32)
        if need_h:
            if g.dtype == torch.float32:
                grad_h.addmm_(g, w_slice)
            else:
                grad_h += g @ w_slice  # [n, H] half-precision temp, summed in fp32
        del g
    if need_h and grad_h.dtype != hidden.dtype:
        grad_h = grad_h.to(hidden.dtype)
    return loss, (grad_h, grad_w, grad_b)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, scale, chunk_rows, passes):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        loss, grads = _loss_and_grads(hidden, weight, bias, target, scale, chunk_rows, passes,
                                      need_h, need_w, need_b and bias is not None)
        ctx.grads = grads
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("the fused linear cross-entropy: its gradients were computed in forward and "
                               "already consumed by a first backward; it cannot be backpropagated twice")
        grads, ctx.grads = ctx.grads, None
        # In place: these are our own tensors, and a copy of grad_W would be [V, H] more memory.
        grad_h, grad_w, grad_b = (None if g is None else g.mul_(grad_loss) for g in grads)
        return grad_h, grad_w, grad_b, None, None, None, None


def _check_inputs(hidden, weight, target, bias, row_weight, reduction):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, H] and weight [V, H]; got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    n, v = hidden.shape[0], weight.shape[0]
    if v == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    dtypes = {hidden.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) != 1 or hidden.dtype not in _DTYPES:
        raise ValueError(f"hidden, weight and bias must share one of {_DTYPES}; got {hidden.dtype}, "
                         f"{weight.dtype}, {None if bias is None else bias.dtype}")
    if bias is not None and bias.shape != (v,):
        raise ValueError(f"bias must have shape [{v}]; got {tuple(bias.shape)}")
    if target.shape != (n,) or target.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"target must be an int64 (or int32) tensor of shape [{n}]; got "
                         f"{tuple(target.shape)} {target.dtype}")
    if row_weight is not None and (row_weight.shape != (n,) or not row_weight.dtype.is_floating_point):
        raise ValueError(f"row_weight must be a float tensor of shape [{n}]; got {tuple(row_weight.shape)} "
                         f"{row_weight.dtype}")
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none'; got {reduction!r}")
    tensors = [t for t in (hidden, weight, target, bias, row_weight) if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all inputs must be on one device; got {sorted({str(t.device) for t in tensors})}")


def linear_cross_entropy_triton(hidden, weight, target, bias=None, row_weight=None, ignore_index=-100,
                                reduction="sum", chunk_rows=None) -> torch.Tensor:
    """The fused linear cross-entropy (`_fused_linear_cross_entropy`) with the Triton passes: CUDA
    tensors, or CPU tensors under TRITON_INTERPRET=1."""
    if triton is None:
        raise RuntimeError("linear_cross_entropy_triton needs triton installed")
    return _fused_linear_cross_entropy(hidden, weight, target, bias, row_weight, ignore_index, reduction, chunk_rows,
                                       (_lse_pass_triton, _grad_pass_triton))


def linear_cross_entropy_torch(hidden, weight, target, bias=None, row_weight=None, ignore_index=-100,
                               reduction="sum", chunk_rows=None) -> torch.Tensor:
    """The fused linear cross-entropy (`_fused_linear_cross_entropy`) with the torch passes (any device)."""
    return _fused_linear_cross_entropy(hidden, weight, target, bias, row_weight, ignore_index, reduction, chunk_rows,
                                       (_lse_pass_torch, _grad_pass_torch))


def _fused_linear_cross_entropy(hidden, weight, target, bias, row_weight, ignore_index, reduction, chunk_rows,
                                passes) -> torch.Tensor:
    """Scalar fp32 loss sum_i s_i * (logsumexp(z_i) - z_i[target_i]), z = hidden @ weight.T + bias.

    hidden [N, H], weight [V, H], bias [V] (one float dtype), target [N] int, row_weight [N] float
    (not differentiated; default 1). Rows with target == ignore_index contribute 0 loss and 0
    gradient. reduction "sum", or "mean" = the sum divided by the number of non-ignored rows (row
    weights do not change that count; no such row: 0), or "none": the [N] fp32 per-row losses, for
    evaluation only (no gradient: it raises when one is wanted). chunk_rows bounds each block of logits to
    chunk_rows x V elements (default: LOGITS_BLOCK_BYTES in the inputs' dtype). passes: the backend's
    (loss pass, gradient pass); which backend runs is diffutron_engine.backends' choice (Ops.cross_entropy).
    Out-of-range targets raise (one device sync per call).
    """
    _check_inputs(hidden, weight, target, bias, row_weight, reduction)
    n, v = hidden.shape[0], weight.shape[0]
    target = target.to(torch.int64).contiguous()
    valid = target != ignore_index
    # (meta tensors hold no targets to check: the compile check's recordings plan a call on them)
    if target.device.type != "meta" and bool((valid & ((target < 0) | (target >= v))).any()):
        raise ValueError(f"targets must lie in [0, {v}) or equal ignore_index={ignore_index}")
    weights = torch.ones(n, device=hidden.device) if row_weight is None else row_weight.detach().float()
    scale = torch.where(valid, weights, 0.0)  # where, not *: NaN/inf weights on ignored rows vanish
    if reduction == "mean":
        scale = scale / valid.sum().clamp_min(1)
    scale = scale.contiguous()
    if chunk_rows is None:
        rows = max(1, LOGITS_BLOCK_BYTES // (v * hidden.element_size()))
        chunk_rows = -(-n // -(-n // rows)) if n else 1  # equal chunks, none larger than `rows`
    elif isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int or None; got {chunk_rows!r}")

    grad_wanted = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if reduction == "none" and grad_wanted:
        raise ValueError("reduction='none' (per-row losses) is for evaluation: it has no gradient; run it "
                         "under torch.no_grad(), or use 'sum' or 'mean' to train")
    # the GEMMs run in the inputs' dtype (meta tensors have no autocast to switch off)
    with torch.autocast(hidden.device.type, enabled=False) if hidden.device.type != "meta" else contextlib.nullcontext():
        if reduction == "none":  # evaluation: the fp32 per-row losses (0 on ignored rows), no sum
            return _loss_rows(hidden, weight, bias, target, scale, chunk_rows, passes)[0]
        if not grad_wanted:  # evaluation: loss pass only
            return _loss_and_grads(hidden, weight, bias, target, scale, chunk_rows, passes, *(False,) * 3)[0]
        return _FusedLinearCrossEntropy.apply(hidden, weight, bias, target, scale, chunk_rows, passes)


def linear_cross_entropy_reference(hidden, weight, target, bias=None, row_weight=None, ignore_index=-100,
                                   reduction="sum", *, compute_dtype=None) -> torch.Tensor:
    """The plain path: full logits, F.cross_entropy(reduction='none') * row_weight, same semantics.

    Computes in float32 (float64 for float64 inputs) unless ``compute_dtype`` says otherwise; tests
    pass the inputs' own half precision to measure the rounding error of the naive path.
    """
    if compute_dtype is None:
        compute_dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = F.linear(hidden.to(compute_dtype), weight.to(compute_dtype),
                      None if bias is None else bias.to(compute_dtype))
    target = target.long()
    valid = target != ignore_index
    loss = F.cross_entropy(logits, target, reduction="none", ignore_index=ignore_index)
    if row_weight is not None:
        loss = loss * torch.where(valid, row_weight.detach().to(loss.dtype), 0.0)
    if reduction == "none":
        return loss
    total = loss.sum()
    if reduction == "mean":
        total = total / valid.sum().clamp_min(1)
    return total
