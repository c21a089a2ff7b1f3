"""Bidirectional flash attention (forward only) for the ModernBERT forward (model/modernbert.py).

Why a kernel: a masked diffusion LM re-runs the encoder every denoising step, and the torch path
materialises a [B, H, Q, T] score matrix plus a [B, 1, Q, T] boolean mask per layer. This kernel
streams key tiles through an online softmax instead, reads keys/values straight from a slotted
KV store (batch row b uses slot ``slots[b]``, so no gather copy), and, on ModernBERT's sliding
layers, skips key tiles that lie entirely outside the query tile's window.

Semantics (shared by the kernel and `attention_reference`): key j of row b is attendable from a
query at absolute position p iff ``j < T and key_valid[b, j] and (half_window is None or
|p - j| <= half_window)``. A query with no attendable key gets a zero output (never NaN).

Layout: the kernel, its plan and launcher, compile_plans, the torch backend (SDPA with an explicit
mask) and the reference. Contract and tiles: docs/kernels.md. triton is optional: the torch paths
work where it is not installed.
"""

import math

import torch
import torch.nn.functional as F

from .launch import Launch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: only the torch reference is available
    triton = None
    tl = None

if triton is not None:

    # half_window is a plain runtime int: no "== 1" specialisation into a constexpr.
    @triton.jit(do_not_specialize=["half_window"])
    def _attention_fwd_kernel(
        q_ptr, q_stride_b, q_stride_h, q_stride_m,
        k_ptr, k_stride_s, k_stride_h, k_stride_n,
        v_ptr, v_stride_s, v_stride_h, v_stride_n,
        o_ptr, o_stride_b, o_stride_h, o_stride_m,
        slots_ptr, slots_stride,
        pos_ptr, pos_stride_b, pos_stride_m,
        valid_ptr, valid_stride_b, valid_stride_n,
        H, Q, T, half_window, qk_scale,
        SLIDING: tl.constexpr, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # 64-bit program ids: slot * k_stride_s can exceed 2**31 on a large KV store. Batch x heads on
        # grid axis 0 (up to 2**31 - 1 programs; axis 1 stops at 65,535, which 64 rows x 12 heads x ...
        # would reach at large batches), query tiles on axis 1.
        pid_bh = tl.program_id(0).to(tl.int64)
        pid_m = tl.program_id(1).to(tl.int64)
        b = pid_bh // H
        h = pid_bh % H
        slot = tl.load(slots_ptr + b * slots_stride).to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        m_mask = offs_m < Q

        q_tile = tl.load(q_ptr + b * q_stride_b + h * q_stride_h
                         + offs_m[:, None] * q_stride_m + offs_d[None, :],
                         mask=m_mask[:, None], other=0.0)

        lo = 0
        hi = T
        if SLIDING:
            # Rows past Q re-read the last query's position, so min/max only see real queries.
            pos = tl.load(pos_ptr + b * pos_stride_b + tl.minimum(offs_m, Q - 1) * pos_stride_m)
            pos = pos.to(tl.int64)
            # Clamping to [-w-1, T+w] changes no query's key set (nothing attendable lies beyond)
            # and keeps arbitrary positions of padded queries from overflowing in the range math.
            w = half_window.to(tl.int64)
            pos = tl.minimum(tl.maximum(pos, -w - 1), T + w)
            lo = tl.maximum(tl.min(pos, axis=0) - w, 0)
            lo = ((lo // BLOCK_N) * BLOCK_N).to(tl.int32)
            hi = tl.minimum(tl.max(pos, axis=0) + w + 1, T).to(tl.int32)
            # clamped (and w <= T, see plan_attention), positions and distances fit in 32 bits: the per-key
            # mask below keeps no 64-bit values live across the loop, and compares without an abs (both
            # forms put a few bytes on the stack on sm_80 for some tiles: bench/gpu_compile_check.py)
            pos = pos.to(tl.int32)
            w = w.to(tl.int32)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        k_base = k_ptr + slot * k_stride_s + h * k_stride_h
        v_base = v_ptr + slot * v_stride_s + h * v_stride_h
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_mask = offs_n < T
            key_ok = tl.load(valid_ptr + b * valid_stride_b + offs_n * valid_stride_n,
                             mask=n_mask, other=0) != 0
            # K is loaded already transposed ([HEAD_DIM, BLOCK_N]) for the q @ k^T product.
            k_t = tl.load(k_base + offs_n[None, :] * k_stride_n + offs_d[:, None],
                          mask=n_mask[None, :], other=0.0)
            # Invalid keys' V is never read: unwritten cache slots may hold NaN, and 0 * NaN = NaN.
            v_tile = tl.load(v_base + offs_n[:, None] * v_stride_n + offs_d[None, :],
                             mask=key_ok[:, None], other=0.0)

            # "ieee" only matters for fp32 inputs (no TF32 rounding); fp16/bf16 use tensor cores.
            s = tl.dot(q_tile, k_t, input_precision="ieee") * qk_scale  # log2 domain
            allowed = key_ok[None, :]
            if SLIDING:
                dist = pos[:, None] - offs_n[None, :]
                allowed = allowed & (dist <= w) & (dist >= -w)
            s = tl.where(allowed, s, float("-inf"))

            # Online softmax. A row with no allowed key so far keeps m = -inf; shifting by 0
            # instead avoids (-inf) - (-inf) = NaN, and exp2(-inf) = 0 keeps it empty.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_shift[:, None])
            alpha = tl.exp2(m_i - m_shift)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision="ieee")
            m_i = m_new

        # Fully masked rows have acc == 0 and l == 0: divide by 1 to emit zeros.
        out = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(o_ptr + b * o_stride_b + h * o_stride_h
                 + offs_m[:, None] * o_stride_m + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=m_mask[:, None])


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _is_pow2(n):
    return n > 0 and n & (n - 1) == 0


def _check_inputs(q, k_cache, v_cache, slots, q_pos, key_valid, half_window):
    """Shape/dtype/device validation shared by the kernel launcher and the reference."""
    if q.dim() != 4 or k_cache.dim() != 4:
        raise ValueError(f"q must be [B, H, Q, D] and k_cache [S, H, P, D]; got {tuple(q.shape)} "
                         f"and {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    B, H, Q, D = q.shape
    _, Hk, P, Dk = k_cache.shape
    if Hk != H or Dk != D:
        raise ValueError(f"k_cache heads/head dim ({Hk}, {Dk}) do not match q ({H}, {D})")
    if slots.shape != (B,) or slots.dtype.is_floating_point or slots.dtype == torch.bool:
        raise ValueError(f"slots must be an integer tensor of shape [{B}]; got "
                         f"{tuple(slots.shape)} {slots.dtype}")
    if q_pos.shape != (B, Q) or q_pos.dtype.is_floating_point or q_pos.dtype == torch.bool:
        raise ValueError(f"q_pos must be an integer tensor of shape [{B}, {Q}]; got "
                         f"{tuple(q_pos.shape)} {q_pos.dtype}")
    if key_valid.dim() != 2 or key_valid.shape[0] != B or key_valid.dtype != torch.bool:
        raise ValueError(f"key_valid must be a bool tensor of shape [{B}, T]; got "
                         f"{tuple(key_valid.shape)} {key_valid.dtype}")
    if key_valid.shape[1] > P:
        raise ValueError(f"key_valid covers T={key_valid.shape[1]} keys but the cache holds only P={P}")
    if half_window is not None and (isinstance(half_window, bool) or not isinstance(half_window, int)
                                    or half_window < 0):
        raise ValueError(f"half_window must be None or a non-negative int; got {half_window!r}")
    devices = {t.device for t in (q, k_cache, v_cache, slots, q_pos, key_valid)}
    if len(devices) != 1:
        raise ValueError(f"all inputs must be on one device; got {sorted(map(str, devices))}")


def attention_triton(q, k_cache, v_cache, slots, q_pos, key_valid, half_window=None, scale=None):
    """Masked bidirectional attention with the Triton kernel; see the module docstring.

    q [B, H, Q, D], k_cache/v_cache [S, H, P, D] (row b reads slot slots[b]), q_pos [B, Q] int,
    key_valid [B, T] bool with T <= P. Returns [B, H, Q, D] in q's dtype; tiles are the launcher's
    (`plan_attention`). Slot indices are not range-checked (that
    would need a device sync): they must lie in [0, S).
    """
    if triton is None:
        raise RuntimeError("attention_triton needs triton; attention_torch runs without it")
    _check_inputs(q, k_cache, v_cache, slots, q_pos, key_valid, half_window)
    B, H, Q, D = q.shape
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache and v_cache must share one of {_DTYPES}; got "
                         f"{q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    if not (_is_pow2(D) and 16 <= D <= 128):
        raise ValueError(f"head dim must be a power of two in [16, 128]; got {D}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        # Copying a whole KV store behind the caller's back would be a silent cost: refuse.
        raise ValueError("k_cache and v_cache must have a unit stride in the head dim")
    if q.stride(-1) != 1:
        q = q.contiguous()  # small, per-call tensor: a copy is cheap
    out = torch.empty((B, H, Q, D), dtype=q.dtype, device=q.device)
    if out.numel():
        plan_attention(q, k_cache, v_cache, slots, q_pos, key_valid, half_window, scale, out).run()
    return out


def plan_attention(q, k_cache, v_cache, slots, q_pos, key_valid, half_window, scale, out) -> Launch:
    """The launch for checked inputs (see `attention_triton`): 64-key tiles, query tiles of 16 to 64
    rows (short queries waste no rows), 32 x 32 in float32."""
    B, H, Q, D = q.shape
    T = key_valid.shape[1]
    block_m = min(64, max(16, triton.next_power_of_2(Q)))
    block_n = 64
    if q.dtype == torch.float32:
        # float32 operands are twice the registers (and their IEEE products run on FMA units): 32 x 32
        # tiles keep them below the ceiling, larger ones spill (bench/gpu_compile_check.py)
        block_m, block_n = min(block_m, 32), min(block_n, 32)
    scale = D ** -0.5 if scale is None else float(scale)
    valid = key_valid.view(torch.uint8)  # bytes instead of i1 pointers: plain, portable loads
    return Launch(_attention_fwd_kernel, (B * H, triton.cdiv(Q, block_m)), (
        q, q.stride(0), q.stride(1), q.stride(2),
        k_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache, v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out, out.stride(0), out.stride(1), out.stride(2),
        slots, slots.stride(0),
        q_pos, q_pos.stride(0), q_pos.stride(1),
        valid, valid.stride(0), valid.stride(1),
        # a window past T keys reaches every key as one of T does: clamped, the kernel's range math and
        # its 32-bit distances hold for any window
        H, Q, T, 0 if half_window is None else min(half_window, T), scale * math.log2(math.e)),
        # 16-row query tiles in 2 warps: a 16-row tile has little work for four, and with four ptxas keeps
        # a few bytes on the stack for some of them (half precision on sm_90 with triton 3.9; float32 at
        # head dim 16 on sm_80 with triton 3.6 and 3.9); bench/gpu_compile_check.py
        dict(SLIDING=half_window is not None, HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n,
             num_warps=2 if block_m == 16 else 4, enable_fp_fusion=True))


def compile_plans(sms: int = 132, batch: int = 64, heads: int = 12, head_dim: int = 64, length: int = 2048,
                  half_window: int = 64) -> list[Launch]:
    """Every configuration the launcher can choose at the model's shapes, on meta tensors: bfloat16,
    float16 and float32 (a forced Triton backend on a float32 model), global and sliding layers, queries
    of one block (the cached steps: 1 to 64 positions) and of the whole canvas, keys read from the
    per-row stores of a full forward or from the K/V pool's slots."""
    meta = torch.device("meta")
    out = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for window in (None, half_window):
            for Q in (1, 16, 32, 64, length):
                for pool in (False, True):
                    slots_n = 2 * batch if pool else batch
                    kv = torch.empty(slots_n, heads, length, head_dim, dtype=dtype, device=meta)
                    q = torch.empty(batch, Q, heads, head_dim, dtype=dtype, device=meta).transpose(1, 2)
                    launch = plan_attention(
                        q, kv, kv, torch.empty(batch, dtype=torch.long, device=meta),
                        torch.empty(batch, Q, dtype=torch.long, device=meta),
                        torch.empty(batch, length, dtype=torch.bool, device=meta), window, None,
                        torch.empty(batch, heads, Q, head_dim, dtype=dtype, device=meta))
                    out.append(launch.labelled(f"{str(dtype)[6:]} {'sliding' if window else 'global'} Q={Q} "
                                               f"{'pool' if pool else 'rows'}"))
    return out


def attention_torch(q, k_store, v_store, slots, q_pos, key_valid, half_window, scale, mask=None):
    """The torch backend: SDPA over the rows' keys with an explicit [B, 1, Q, T] mask (the same contract
    as `attention_triton`; k_store/v_store are per row [B, H, T, D] when slots is None, else the pool
    [S, H, P, D] read through slots). `mask` reuses one built by `attention_mask` for the same
    positions (a forward builds one per layer kind)."""
    T = key_valid.shape[1]
    if slots is not None:
        k_store, v_store = k_store[slots, :, :T], v_store[slots, :, :T]
    if mask is None:
        mask = attention_mask(q_pos, key_valid, half_window)
    return F.scaled_dot_product_attention(q, k_store, v_store, attn_mask=mask, scale=scale)


def attention_mask(q_pos, key_valid, half_window):
    """Boolean [B, 1, Q, T]: key valid, and within +-half_window of the query on sliding layers."""
    m = key_valid[:, None, None, :]
    if half_window is not None:
        keys = torch.arange(key_valid.shape[1], device=key_valid.device)
        near = (q_pos[:, :, None] - keys[None, None, :]).abs() <= half_window
        m = m & near[:, None, :, :]
    return m


def attention_reference(q, k_cache, v_cache, slots, q_pos, key_valid, half_window=None, scale=None,
                        *, compute_dtype=None):
    """Plain torch attention with an explicit [B, 1, Q, T] mask (same interface as attention_triton).

    Computes in float32 (float64 for float64 inputs) unless ``compute_dtype`` says otherwise; tests
    pass the inputs' low precision to measure the rounding error of a naive implementation.
    """
    _check_inputs(q, k_cache, v_cache, slots, q_pos, key_valid, half_window)
    T = key_valid.shape[1]
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    k = k_cache[slots.long(), :, :T].to(compute_dtype)
    v = v_cache[slots.long(), :, :T].to(compute_dtype)
    v = v.masked_fill(~key_valid[:, None, :, None], 0.0)  # like the kernel: never read invalid V

    mask = attention_mask(q_pos.long(), key_valid, half_window).expand(q.shape[0], 1, q.shape[2], T)

    scores = (q.to(compute_dtype) @ k.transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    probs = probs.masked_fill(~mask.any(dim=-1, keepdim=True), 0.0)  # all -inf rows: NaN -> 0
    return (probs @ v).to(q.dtype)
