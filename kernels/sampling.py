"""Fused token choice over the vocabulary: penalty, suppression, temperature, Gumbel-max, argmax and the
chosen token's confidence, in one sweep over vocabulary tiles per row, with no probability tensor.

Why: the reference sampler materializes softmax(logits) and float64 noise over N x 256,000 entries at
every step, several times the cost of reading the logits once. Here each row is read once (or, in the
LM-head variant, the logits are computed tile by tile and never stored), and per row only a running
(best score, its id, its logit) and an online log-sum-exp survive.

Semantics (the engine's sampler contract, same as the oracle's step), per row, with that row's own
temperature, penalty, seen ids, suppressed and begin-suppressed ids (rows of one call may differ in all):
  x       = logits, with the repetition penalty on the row's seen ids (x > 0: x / p, else x * p, rounded
            to the logits' dtype as the oracle's in-place update is) and suppressed ids set to -inf;
  choice  = argmax(x) at temperature 0 (first maximum on ties, as torch.argmax), else
            argmax(x + tau * g) with g a standard Gumbel draw per (row, vocabulary id);
  conf    = softmax(x') at the choice, x' = x with the begin-suppressed ids at -inf (0 if the choice is
            one of them), in the logits' dtype; for rows with random confidence, a uniform draw instead
            (float32: the output is then float32 for every row, which holds both exactly).
Rows marked invalid (`valid`) are skipped: no work, unspecified outputs (the engine pads its candidate
rows to a fixed count and marks the padding invalid).
Random numbers are counter based: Philox-4x32-10 keyed by the request's 64-bit seed, counters (vocabulary
id, canvas position, the request's step, stream). A draw depends on nothing else: not on the batch, the
tile order or the backend, and replays identically under CUDA graphs. The same generator is implemented
in torch here and in csrc/sampler.cpp, so every backend draws the same numbers.

Layout: the Triton kernels (partial sweep over a split of the vocabulary, then a merge per row), their
plans and launchers (and the C++ launcher), the configurations they compile for (compile_plans), and
the pure-torch implementation (the torch backend, and in float64 the reference the tests measure the
others against). Contract, tiles and precision: docs/kernels.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .launch import Launch

try:  # triton is optional: the torch implementation below works without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

# Philox-4x32 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11).
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
# Counter c0 of the uniform draw used as confidence by random remasking: no vocabulary id reaches it.
RANDOM_CONF_COUNTER = 0xFFFFFFFF
# Below this, -log(1 - w) is evaluated by its series: 1 - w would lose w's low bits in float32.
SERIES_BELOW = 0.01

if triton is not None:

    @triton.jit
    def _philox_first_word(c0, c1, c2, c3, k0, k1, ROUNDS: tl.constexpr):
        """First output word of Philox-4x32 on uint32 counters (c0..c3) and key (k0, k1)."""
        # 32 x 32 -> 64-bit products (the compiler emits one widening multiply for each; tl.umulhi would
        # too, but is very slow in the CPU interpreter the tests run)
        for _ in tl.static_range(ROUNDS):
            p0 = c0.to(tl.uint64) * 0xD2511F53
            p1 = c2.to(tl.uint64) * 0xCD9E8D57
            hi0 = (p0 >> 32).to(tl.uint32)
            lo0 = p0.to(tl.uint32)
            hi1 = (p1 >> 32).to(tl.uint32)
            lo1 = p1.to(tl.uint32)
            c0 = hi1 ^ c1 ^ k0
            c1 = lo1
            c2 = hi0 ^ c3 ^ k1
            c3 = lo0
            k0 = k0 + 0x9E3779B9
            k1 = k1 + 0xBB67AE85
        return c0

    @triton.jit
    def _gumbel(bits):
        """Gumbel draw from 32 random bits: w in (0, 1), E = -log(1 - w) (series for small w), g = -log E."""
        w = (bits.to(tl.float32) + 0.5) * 2.3283064365386963e-10
        w = tl.minimum(w, 0.99999994)
        e = tl.where(w < 0.01, w * (1.0 + w * (0.5 + w * 0.3333333333333333)), -tl.log(1.0 - w))
        return -tl.log(e)

    @triton.jit
    def _bit_set(bits_ptr, cols, mask):
        """Whether vocabulary id `cols` is in the bitmap (int32 words, bit c % 32 of word c // 32)."""
        word = tl.load(bits_ptr + cols // 32, mask=mask, other=0)
        return ((word >> (cols % 32)) & 1) != 0

    # The feature switches are runtime ints, not constexprs: one compiled program per (dtype, SAMPLE,
    # FUSE_HEAD) serves every mix of requests (each switch costs one uniform branch per tile), so the
    # programs the GPU compiles, and bench/gpu_compile_check.py checks, stay few.
    @triton.jit(do_not_specialize=["has_bias", "has_penalty", "has_suppress", "has_begin", "has_valid"])
    def _sample_partial_kernel(
        x_ptr, x_stride_n,                    # logits [N, V], or hidden [N, H] when FUSE_HEAD
        w_ptr, w_stride_v, b_ptr,             # decoder weight [V, H] and bias [V] (FUSE_HEAD only)
        temp_ptr, pen_ptr, valid_ptr,         # [N] float32, float32, int8: per-row temperature, penalty, work
        seed_ptr, pos_ptr, step_ptr, stream_ptr,  # [N] int64 each: the Philox key and counters
        map_ptr,                              # [N] int64: the row of the bitmaps each row reads
        seen_ptr, seen_stride_r,              # seen-id bitmaps [R, W] int32
        sup_ptr, sup_stride_r,                # suppressed-id bitmaps [R, W] (stride 0: one for all rows)
        beg_ptr, beg_stride_r,                # begin-suppressed-id bitmaps [R, W] (stride 0: one for all)
        part_score_ptr, part_id_ptr, part_x_ptr, part_m_ptr, part_s_ptr,  # [N, SPLITS] partials
        N, V, H, tiles_per_split, n_splits,
        has_bias, has_penalty, has_suppress, has_begin, has_valid,
        FUSE_HEAD: tl.constexpr, SAMPLE: tl.constexpr, DOT_PRECISION: tl.constexpr,
        ROUNDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0).to(tl.int64)
        pid_s = tl.program_id(1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        if has_valid != 0:
            row_ok = row_ok & (tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0)
        out_dtype = x_ptr.dtype.element_ty  # logits (or the LM head's output) carry the model's dtype

        if SAMPLE:
            temp = tl.load(temp_ptr + rows, mask=row_ok, other=0.0)
            seed = tl.load(seed_ptr + rows, mask=row_ok, other=0)
            k0 = (seed & 0xFFFFFFFF).to(tl.uint32)[:, None]
            k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)[:, None]
            c1 = tl.load(pos_ptr + rows, mask=row_ok, other=0).to(tl.uint32)[:, None]
            c2 = tl.load(step_ptr + rows, mask=row_ok, other=0).to(tl.uint32)[:, None]
            c3 = tl.load(stream_ptr + rows, mask=row_ok, other=0).to(tl.uint32)[:, None]
            # rows at temperature 0 in a program of greedy rows skip the draws entirely
            any_sample = tl.max(tl.where(row_ok, temp, 0.0), axis=0) > 0.0
        bmap = tl.load(map_ptr + rows, mask=row_ok, other=0)
        pen = tl.load(pen_ptr + rows, mask=row_ok, other=1.0)
        pen_on = row_ok & (pen != 1.0)  # rows without a penalty never read their bitmap

        best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        best_id = tl.zeros((BLOCK_M,), tl.int64)
        best_x = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_M,), tl.float32)

        # a program whose rows are all invalid does no work (an empty loop); the last split stops at
        # the vocabulary's last tile
        t_lo = pid_s * tiles_per_split
        t_hi = tl.where(tl.max(row_ok.to(tl.int32), axis=0) > 0,
                        tl.minimum(t_lo + tiles_per_split, tl.cdiv(V, BLOCK_V)), t_lo)
        for t in range(t_lo, t_hi):
            cols = t * BLOCK_V + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            ok = row_ok[:, None] & col_ok[None, :]
            if FUSE_HEAD:
                acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
                for k0_ in range(0, H, BLOCK_K):
                    ks = k0_ + tl.arange(0, BLOCK_K)
                    h = tl.load(x_ptr + rows[:, None] * x_stride_n + ks[None, :],
                                mask=row_ok[:, None] & (ks[None, :] < H), other=0.0)
                    w = tl.load(w_ptr + cols[:, None] * w_stride_v + ks[None, :],
                                mask=col_ok[:, None] & (ks[None, :] < H), other=0.0)
                    # float32: "ieee" (no TF32 rounding), as the unfused head's matmul computes by default
                    acc += tl.dot(h, tl.trans(w), input_precision=DOT_PRECISION)
                if has_bias != 0:
                    acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                # round as the unfused head would store its logits, so both variants see the same values
                x = tl.where(ok, acc.to(out_dtype).to(tl.float32), float("-inf"))
            else:
                x = tl.load(x_ptr + rows[:, None] * x_stride_n + cols[None, :], mask=ok,
                            other=float("-inf")).to(tl.float32)
            if has_penalty != 0:
                word = tl.load(seen_ptr + bmap[:, None] * seen_stride_r + (cols // 32)[None, :],
                               mask=pen_on[:, None] & col_ok[None, :], other=0)
                seen = ((word >> (cols % 32)[None, :]) & 1) != 0
                penalized = tl.where(x > 0, x / pen[:, None], x * pen[:, None]).to(out_dtype).to(tl.float32)
                x = tl.where(seen, penalized, x)
            if has_suppress != 0:
                x = tl.where(_bit_set(sup_ptr + bmap[:, None] * sup_stride_r, cols[None, :], ok), float("-inf"), x)
            score = x
            if SAMPLE:
                if any_sample:
                    c0 = tl.broadcast_to(cols.to(tl.uint32)[None, :], (BLOCK_M, BLOCK_V))
                    bits = _philox_first_word(c0, tl.broadcast_to(c1, (BLOCK_M, BLOCK_V)),
                                              tl.broadcast_to(c2, (BLOCK_M, BLOCK_V)),
                                              tl.broadcast_to(c3, (BLOCK_M, BLOCK_V)),
                                              tl.broadcast_to(k0, (BLOCK_M, BLOCK_V)),
                                              tl.broadcast_to(k1, (BLOCK_M, BLOCK_V)), ROUNDS)
                    # temperature 0 rows: x + 0 * g == x exactly (g is finite), the greedy choice
                    score = x + temp[:, None] * _gumbel(bits)
            xc = x
            if has_begin != 0:
                xc = tl.where(_bit_set(beg_ptr + bmap[:, None] * beg_stride_r, cols[None, :], ok), float("-inf"), x)
            # running choice: strictly greater keeps the first maximum across tiles (torch's tie rule)
            t_best = tl.max(score, axis=1)
            t_arg = tl.argmax(score, axis=1)
            t_x = tl.sum(tl.where(tl.arange(0, BLOCK_V)[None, :] == t_arg[:, None], xc, 0.0), axis=1)
            better = t_best > best
            best = tl.where(better, t_best, best)
            best_id = tl.where(better, t * BLOCK_V + t_arg.to(tl.int64), best_id)
            best_x = tl.where(better, t_x, best_x)
            # online log-sum-exp of xc; a shift of 0 while everything is still -inf avoids inf - inf
            m_new = tl.maximum(m, tl.max(xc, axis=1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(xc - shift[:, None]), axis=1)
            m = m_new

        out = rows * n_splits + pid_s
        tl.store(part_score_ptr + out, best, mask=row_ok)
        tl.store(part_id_ptr + out, best_id, mask=row_ok)
        tl.store(part_x_ptr + out, best_x, mask=row_ok)
        tl.store(part_m_ptr + out, m, mask=row_ok)
        tl.store(part_s_ptr + out, s, mask=row_ok)

    @triton.jit
    def _sample_merge_kernel(
        part_score_ptr, part_id_ptr, part_x_ptr, part_m_ptr, part_s_ptr,  # [N, n_splits] each
        out_id_ptr, out_conf_ptr, N, n_splits,
        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """Per row, the best split's choice and the log-sum-exp over the splits, read BLOCK_S splits at
        a time (bounded tiles whatever the split count: no spills)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < N
        best = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        best_id = tl.zeros((BLOCK_R,), tl.int64)
        best_x = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        total = tl.zeros((BLOCK_R,), tl.float32)
        for j0 in range(0, n_splits, BLOCK_S):
            j = j0 + tl.arange(0, BLOCK_S)
            ok = row_ok[:, None] & (j < n_splits)[None, :]
            at = rows[:, None] * n_splits + j[None, :]
            score = tl.load(part_score_ptr + at, mask=ok, other=float("-inf"))
            # first split on ties (it holds the smaller ids); a later chunk must be strictly better
            win = tl.argmax(score, axis=1)
            pick = tl.arange(0, BLOCK_S)[None, :] == win[:, None]
            c_best = tl.max(score, axis=1)
            c_id = tl.sum(tl.where(pick, tl.load(part_id_ptr + at, mask=ok, other=0), 0), axis=1)
            c_x = tl.sum(tl.where(pick, tl.load(part_x_ptr + at, mask=ok, other=float("-inf")), 0.0), axis=1)
            better = c_best > best
            best = tl.where(better, c_best, best)
            best_id = tl.where(better, c_id, best_id)
            best_x = tl.where(better, c_x, best_x)
            pm = tl.load(part_m_ptr + at, mask=ok, other=float("-inf"))
            ps = tl.load(part_s_ptr + at, mask=ok, other=0.0)
            m_new = tl.maximum(m, tl.max(pm, axis=1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            total = total * tl.exp(m - shift) + tl.sum(ps * tl.exp(pm - shift[:, None]), axis=1)
            m = m_new
        shift = tl.where(m == float("-inf"), 0.0, m)
        conf = tl.exp(best_x - shift) / total  # rows past N divide 0 by 0: never stored
        tl.store(out_id_ptr + rows, best_id, mask=row_ok)
        tl.store(out_conf_ptr + rows, conf.to(out_conf_ptr.dtype.element_ty), mask=row_ok)


# ----------------------------------------------------------------------------------------------- params
@dataclass(frozen=True)
class SampleFlags:
    """Which features any row of a call uses. The kernels are specialized on them (a greedy batch never
    runs the random-number code); the engine knows them from its requests without reading the device."""

    sample: bool = False  # some row has temperature > 0
    penalty: bool = False  # some row has a repetition penalty != 1
    suppress: bool = False  # some row has suppressed ids
    begin: bool = False  # some row has begin-suppressed ids
    random: bool = False  # some row uses random confidences (random remasking)


@dataclass
class SamplingTensors:
    """What the sampler needs besides the logits, for N rows. Every per-row value is one number for all
    rows or a tensor [N]; the engine passes tensors (rows of many requests) and `flags`.

    temperature, penalty: float32 values. seeds/positions/steps/streams: [N] int64, the Philox key and
    counters (needed when a row samples or uses random confidences). Bitmaps over the vocabulary (bit
    v % 32 of int32 word v // 32), row `row_request[i]` for logits row i: `seen` (the repetition
    penalty's ids: a list of id tensors, one per bitmap row, or a bitmap [R, W]), `suppress` and
    `begin_suppress` (ids shared by all rows, or a bitmap [R, W]). random_confidence: bool or [N] bool.
    valid: [N] bool, rows to compute (None: all). flags: see SampleFlags (derived when not given; that
    reads tensors back from the device, which the engine avoids by giving them).
    """

    temperature: float | torch.Tensor = 0.0
    penalty: float | torch.Tensor = 1.0
    seeds: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    steps: torch.Tensor | None = None
    streams: torch.Tensor | None = None
    seen: list[torch.Tensor] | torch.Tensor | None = None
    row_request: torch.Tensor | None = None
    suppress: tuple[int, ...] | torch.Tensor = ()
    begin_suppress: tuple[int, ...] | torch.Tensor = ()
    random_confidence: bool | torch.Tensor = False
    valid: torch.Tensor | None = None
    flags: SampleFlags | None = None
    _resolved: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for name, low, strict in (("temperature", 0.0, False), ("penalty", 0.0, True)):
            v = getattr(self, name)
            if not isinstance(v, torch.Tensor):
                v = float(v)
                if (v <= low) if strict else (v < low):
                    raise ValueError(f"{'repetition penalty' if name == 'penalty' else name} must be "
                                     f"{'>' if strict else '>='} {low:g}, got {v}")
                setattr(self, name, v)
        if not isinstance(self.suppress, torch.Tensor):
            self.suppress = tuple(int(i) for i in self.suppress)
        if not isinstance(self.begin_suppress, torch.Tensor):
            self.begin_suppress = tuple(int(i) for i in self.begin_suppress)
        if self.flags is None:
            self.flags = SampleFlags(sample=_any(self.temperature, lambda t: t > 0),
                                     penalty=_any(self.penalty, lambda t: t != 1.0),
                                     suppress=_any_ids(self.suppress), begin=_any_ids(self.begin_suppress),
                                     random=_any(self.random_confidence, lambda t: t))
        f = self.flags
        if (f.sample or f.random) and self.seeds is None:
            raise ValueError("sampling at temperature > 0 (or random confidences) needs per-row seeds")
        if f.penalty and (self.seen is None or self.row_request is None):
            raise ValueError("a repetition penalty needs `seen` ids per request and `row_request` per row")

    @property
    def sample(self) -> bool:
        return self.flags.sample

    @property
    def has_penalty(self) -> bool:
        return self.flags.penalty

    def resolve(self, n: int, vocab: int, device) -> "_Resolved":
        """Everything as tensors on `device` (made once per (n, vocab, device))."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            # 'cuda' and 'cuda:0' are one device: one key, or every call would rebuild (and copy) its params
            device = torch.device("cuda", torch.cuda.current_device())
        key = (n, vocab, str(device))
        if key not in self._resolved:
            self._resolved[key] = _Resolved.build(self, n, vocab, device)
        return self._resolved[key]


@dataclass
class _Resolved:
    """SamplingTensors as the kernels read them: [N] tensors, bitmaps with their row strides (0: one
    bitmap for every row), and dummies for the features no row uses."""

    flags: SampleFlags
    temperature: torch.Tensor
    penalty: torch.Tensor
    valid: torch.Tensor | None
    seeds: torch.Tensor
    positions: torch.Tensor
    steps: torch.Tensor
    streams: torch.Tensor
    maps: torch.Tensor
    seen: torch.Tensor
    seen_stride: int
    suppress: torch.Tensor
    suppress_stride: int
    begin: torch.Tensor
    begin_stride: int
    random: torch.Tensor | None

    @classmethod
    def build(cls, p: SamplingTensors, n: int, vocab: int, device) -> "_Resolved":
        f = p.flags
        words = (vocab + 31) // 32
        dummy = torch.zeros(1, words, dtype=torch.int32, device=device)

        def per_row(v, dtype, name):
            if isinstance(v, torch.Tensor):
                t = v.to(device=device, dtype=dtype).contiguous()  # kernels index rows with stride 1
                if t.shape != (n,):
                    raise ValueError(f"per-row {name} must have shape [{n}], got {tuple(t.shape)}")
                return t
            return torch.full((n,), v, dtype=dtype, device=device)

        counters = [per_row(0 if t is None else t, torch.long, "seeds/positions/steps/streams")
                    for t in (p.seeds, p.positions, p.steps, p.streams)]

        def bitmap(v, name):
            """(bitmap [R, W], row stride) from ids shared by all rows, a list of id sets, or a bitmap."""
            if isinstance(v, torch.Tensor) and v.dtype == torch.int32 and v.dim() in (1, 2):
                b = v.to(device)
                if b.shape[-1] != words:
                    raise ValueError(f"{name} bitmap must have {words} words per row for vocab {vocab}, "
                                     f"got {b.shape[-1]}")
                return (b, 0) if b.dim() == 1 else (b, b.stride(0))
            if isinstance(v, (list, tuple)) and v and isinstance(v[0], (torch.Tensor, list, tuple)):
                b = torch.stack([id_bitmap(ids, vocab) for ids in v]).to(device)
                return b, b.stride(0)
            return id_bitmap(v, vocab).to(device), 0

        seen, seen_stride = bitmap(p.seen, "seen") if f.penalty else (dummy, 0)
        sup, sup_stride = bitmap(p.suppress, "suppress") if f.suppress else (dummy, 0)
        beg, beg_stride = bitmap(p.begin_suppress, "begin_suppress") if f.begin else (dummy, 0)
        maps = per_row(0 if p.row_request is None else p.row_request, torch.long, "row_request")
        valid = None if p.valid is None else per_row(p.valid, torch.bool, "valid")
        random = per_row(p.random_confidence, torch.bool, "random_confidence") if f.random else None
        return cls(flags=f, temperature=per_row(p.temperature, torch.float32, "temperature"),
                   penalty=per_row(p.penalty, torch.float32, "penalty"), valid=valid,
                   seeds=counters[0], positions=counters[1], steps=counters[2], streams=counters[3], maps=maps,
                   seen=seen, seen_stride=seen_stride, suppress=sup, suppress_stride=sup_stride,
                   begin=beg, begin_stride=beg_stride, random=random)

    def bits(self, which: str, rows: slice, vocab: int) -> torch.Tensor:
        """Bool [rows, V]: which ids of bitmap `which` ("seen", "suppress", "begin") each row has."""
        table, stride = getattr(self, which), getattr(self, f"{which}_stride")
        words = table[self.maps[rows]] if stride else table.reshape(1, -1).expand(rows.stop - rows.start, -1)
        shifts = torch.arange(32, device=table.device, dtype=torch.int32)
        return ((words[:, :, None] >> shifts) & 1).reshape(words.shape[0], -1)[:, :vocab].bool()

    def with_random_confidence(self, conf: torch.Tensor) -> torch.Tensor:
        """conf with the rows that use random confidences replaced by their uniform draw (float32 then)."""
        if self.random is None:
            return conf
        u = random_confidence(self.seeds, self.positions, self.steps, self.streams)
        return torch.where(self.random, u, conf.float())


def _any(v, pred) -> bool:
    if isinstance(v, torch.Tensor):
        return bool(pred(v).any()) if v.numel() else False
    return bool(pred(v))


def _any_ids(v) -> bool:
    if isinstance(v, torch.Tensor):
        return bool((v != 0).any()) if v.dtype == torch.int32 else v.numel() > 0
    return len(v) > 0


def id_bitmap(ids, vocab: int) -> torch.Tensor:
    """int32 words with bit (v % 32) of word (v // 32) set for every id v in `ids` (ids >= vocab: error).
    Built on the host with numpy (admissions build a few per request)."""
    if isinstance(ids, torch.Tensor):
        arr = ids.detach().to("cpu", torch.long).numpy().ravel()
    else:
        arr = np.asarray(ids if isinstance(ids, (list, tuple)) else list(ids), dtype=np.int64).ravel()
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab):
        raise ValueError(f"token ids must lie in [0, {vocab}), got {int(arr.min())}..{int(arr.max())}")
    words = np.zeros((vocab + 31) // 32, dtype=np.uint32)
    np.bitwise_or.at(words, arr >> 5, np.left_shift(np.uint32(1), (arr & 31).astype(np.uint32)))
    # the words hold bit patterns up to 2^32 - 1: reinterpret them as int32
    return torch.from_numpy(words.view(np.int32))


# ----------------------------------------------------------------------------------------------- launchers
# Tiles (fixed: the engine's shapes are what the GPU compiles and the compile check checks).
# Logits: one row per program (a row's own temperature, penalty and validity decide its work; the
# vocabulary split keeps the GPU busy), 2,048 ids per tile in 8 warps: 8 per thread, Philox included.
SAMPLE_BLOCK_V = 2048
# Fused head: 64 rows (tensor cores need >= 16; 64 reads the weight once for up to 64 rows), 64 ids,
# 64 of the hidden dimension per step; float32 halves rows and ids and takes 16 of the hidden dimension,
# sampling halves rows and ids again. Wider tiles put the epilogue (penalty, suppression, Philox on every
# logit) into spills with triton 3.6 or 3.9 on some target: bench/gpu_compile_check.py.
HEAD_BLOCK_M, HEAD_BLOCK_V, HEAD_BLOCK_K = 64, 64, 64
# Merge: rows x splits read per step.
MERGE_BLOCK_R, MERGE_BLOCK_S = 16, 32  # 32 rows spill on sm_100 with triton 3.9


def _splits(n_row_blocks: int, n_tiles: int, sms: int) -> tuple[int, int]:
    """Split each row's vocabulary so that the grid has a few programs per SM (a handful of rows alone
    would leave most of the GPU idle); returns (splits, tiles per split)."""
    want = max(1, min(n_tiles, triton.cdiv(4 * sms, n_row_blocks)))
    per = triton.cdiv(n_tiles, want)
    return triton.cdiv(n_tiles, per), per


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def plan_sample(x, weight, bias, vocab: int, r: "_Resolved", ids, conf, sms: int,
                dot_precision: str = "ieee") -> list[Launch]:
    """The two launches (partial sweeps over vocabulary splits, then the per-row merge) for rows x
    (logits [N, V], or hidden [N, H] with the decoder weight [V, H] and bias), params resolved, outputs
    ids [N] and conf [N]; `sms`: the GPU's SM count (sets the split)."""
    n, device = x.shape[0], x.device
    fuse = weight is not None
    f = r.flags
    block_m, block_v, block_k = (HEAD_BLOCK_M, HEAD_BLOCK_V, HEAD_BLOCK_K) if fuse else (1, SAMPLE_BLOCK_V, 16)
    if fuse and x.dtype == torch.float32:
        # IEEE float32 products run on FMA units with both operand tiles in registers
        block_m, block_v, block_k = block_m // 2, block_v // 2, block_k // 4
    if fuse and f.sample:
        # Philox's state for every logit of the tile: a quarter of the tile stays in registers
        block_m, block_v = max(16, block_m // 2), max(16, block_v // 2)
    row_blocks = triton.cdiv(n, block_m)
    n_splits, per_split = _splits(row_blocks, triton.cdiv(vocab, block_v), sms)
    parts = [torch.empty(n, n_splits, dtype=dt, device=device)
             for dt in (torch.float32, torch.long, torch.float32, torch.float32, torch.float32)]
    # a stand-in when absent (never read): of valid's own type, so that both calls give one program
    valid = (r.valid if r.valid is not None else r.temperature).view(torch.int8)
    partial = Launch(_sample_partial_kernel, (row_blocks, n_splits), (
        x, x.stride(0),
        weight if fuse else x, weight.stride(0) if fuse else 0, bias if bias is not None else x,
        r.temperature, r.penalty, valid,
        r.seeds, r.positions, r.steps, r.streams, r.maps,
        r.seen, r.seen_stride, r.suppress, r.suppress_stride, r.begin, r.begin_stride,
        *parts,
        n, vocab, x.shape[1] if fuse else 0, per_split, n_splits,
        int(bias is not None), int(f.penalty), int(f.suppress), int(f.begin), int(r.valid is not None)),
        # no FMA contraction: x + temperature * g rounds twice, as in the torch and C++ backends, so
        # every backend draws the same token
        dict(FUSE_HEAD=fuse, SAMPLE=f.sample, DOT_PRECISION=dot_precision, ROUNDS=PHILOX_ROUNDS,
             BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=8, enable_fp_fusion=False,
             # fused head: left alone, ptxas holds it to 128 registers and spills (sm_80 to sm_100); 240
             # gives it room, below the ceiling
             **({"maxnreg": 240} if fuse else {})))
    merge = Launch(_sample_merge_kernel, (triton.cdiv(n, MERGE_BLOCK_R),), (*parts, ids, conf, n, n_splits),
                   dict(BLOCK_R=MERGE_BLOCK_R, BLOCK_S=MERGE_BLOCK_S, num_warps=4))
    return [partial, merge]


def _run(x, weight, bias, vocab: int, p: SamplingTensors, sms: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    if triton is None:
        raise RuntimeError("the triton sampler needs the `triton` package (pip install triton)")
    n, device = x.shape[0], x.device
    ids = torch.empty(n, dtype=torch.long, device=device)
    conf = torch.empty(n, dtype=x.dtype, device=device)
    if n == 0:
        return ids, conf
    r = p.resolve(n, vocab, device)
    for launch in plan_sample(x, weight, bias, vocab, r, ids, conf, sms or _sm_count(device)):
        launch.run()
    return ids, r.with_random_confidence(conf)


def _check_logits(logits: torch.Tensor, contiguous_rows: bool = False) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if contiguous_rows and logits.shape[0] and logits.stride(1) != 1:
        raise ValueError("logits rows must be contiguous (stride 1 along the vocabulary)")


def sample_triton(logits: torch.Tensor, p: SamplingTensors, sms: int | None = None):
    """Token choice and confidence for each row of logits [N, V] (any V): one partial sweep over
    vocabulary splits, then a merge. `sms` overrides the SM count the split is sized for (tests use it
    to exercise several splits on small vocabularies)."""
    _check_logits(logits, contiguous_rows=True)
    return _run(logits, None, None, logits.shape[1], p, sms)


def _check_head(hidden, weight, bias):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] must agree on H, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    if hidden.dtype != weight.dtype or (bias is not None and bias.dtype != hidden.dtype):
        raise ValueError(f"hidden ({hidden.dtype}), weight ({weight.dtype}) and bias must share a dtype")
    if hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the fused head computes in float32, float16 or bfloat16, got {hidden.dtype}")
    if hidden.stride(1) != 1 or weight.stride(1) != 1 or (bias is not None and not bias.is_contiguous()):
        raise ValueError("hidden, weight and bias must be contiguous along their last dimension")


def sample_head_triton(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: SamplingTensors,
                       sms: int | None = None):
    """As `sample_triton` on logits = hidden @ weight.T + bias, computed tile by tile and never stored
    (hidden [N, H], weight [V, H] with rows contiguous, bias [V] or None). Products accumulate in
    float32; float32 inputs multiply in IEEE float32 (no TF32), like the unfused head's matmul."""
    _check_head(hidden, weight, bias)
    return _run(hidden, weight, bias, weight.shape[0], p, sms)


def sample_cpp(logits: torch.Tensor, p: SamplingTensors) -> tuple[torch.Tensor, torch.Tensor]:
    """The sampler contract on float32 CPU logits, through the C++ extension (csrc/sampler.cpp): the
    CPU backend. Raises when the extension was not built."""
    if logits.dim() != 2 or logits.device.type != "cpu" or logits.dtype != torch.float32:
        raise ValueError(f"the C++ sampler needs float32 CPU logits [N, V], got {logits.dtype} "
                         f"{tuple(logits.shape)} on {logits.device}")
    try:
        from .. import _C
    except ImportError as exc:
        raise RuntimeError("the C++ extension diffutron_engine._C is not built (pip install -e ., or "
                           "python setup.py build_ext --inplace)") from exc
    n, v = logits.shape
    ids = torch.empty(n, dtype=torch.long)
    conf = torch.empty(n, dtype=torch.float32)
    if n == 0:
        return ids, conf
    r = p.resolve(n, v, "cpu")
    f = r.flags
    valid = None if r.valid is None else r.valid.contiguous().view(torch.int8)

    def addr(t, on=True):
        return t.contiguous().data_ptr() if on and t is not None else 0

    # every argument is contiguous already (made so by resolve) except possibly views the caller gave
    temperature, penalty, seeds, positions, steps, streams, maps = (
        t.contiguous() for t in (r.temperature, r.penalty, r.seeds, r.positions, r.steps, r.streams, r.maps))
    _C.fused_sample(
        logits.data_ptr(), n, v, logits.stride(0), logits.stride(1), temperature.data_ptr(), penalty.data_ptr(),
        addr(valid), seeds.data_ptr(), positions.data_ptr(), steps.data_ptr(), streams.data_ptr(), maps.data_ptr(),
        addr(r.seen, f.penalty), r.seen_stride, addr(r.suppress, f.suppress), r.suppress_stride,
        addr(r.begin, f.begin), r.begin_stride, ids.data_ptr(), conf.data_ptr())
    return ids, r.with_random_confidence(conf)


def compile_plans(sms: int = 132, vocab: int = 256_000, hidden: int = 768) -> list[Launch]:
    """Every configuration the launchers can choose at the model's shapes, on meta tensors: logits and
    the fused head, float32 / bfloat16 / float16, greedy and sampling, one row to a full batch of
    candidates (64 x 2,048), with every per-row feature on (they are runtime switches)."""
    meta = torch.device("meta")
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for sample in (False, True):
            for n in (1, 64, 64 * 2048):
                flags = SampleFlags(sample=sample, penalty=True, suppress=True, begin=True, random=False)
                p = SamplingTensors(temperature=torch.empty(n, device=meta), penalty=torch.empty(n, device=meta),
                                    seeds=torch.empty(n, dtype=torch.long, device=meta),
                                    positions=torch.empty(n, dtype=torch.long, device=meta),
                                    steps=torch.empty(n, dtype=torch.long, device=meta),
                                    seen=torch.empty(64, (vocab + 31) // 32, dtype=torch.int32, device=meta),
                                    row_request=torch.empty(n, dtype=torch.long, device=meta),
                                    suppress=torch.empty((vocab + 31) // 32, dtype=torch.int32, device=meta),
                                    begin_suppress=torch.empty((vocab + 31) // 32, dtype=torch.int32, device=meta),
                                    valid=torch.empty(n, dtype=torch.bool, device=meta), flags=flags)
                r = p.resolve(n, vocab, meta)
                ids, conf = torch.empty(n, dtype=torch.long, device=meta), torch.empty(n, dtype=dtype, device=meta)
                label = f"{str(dtype)[6:]} {'sample' if sample else 'greedy'} N={n}"
                logits = torch.empty(n, vocab, dtype=dtype, device=meta)
                out += [pl.labelled(label) for pl in plan_sample(logits, None, None, vocab, r, ids, conf, sms)]
                h = torch.empty(n, hidden, dtype=dtype, device=meta)
                w = torch.empty(vocab, hidden, dtype=dtype, device=meta)
                b = torch.empty(vocab, dtype=dtype, device=meta)
                out += [pl.labelled("head " + label) for pl in plan_sample(h, w, b, vocab, r, ids, conf, sms)]
    return out


# ----------------------------------------------------------------------------------------------- torch
def _mul_hi_lo(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of m * x for uint32 values held in int64. The 64-bit product wraps
    around in int64, which keeps every bit: the low word is its low 32 bits, the high word bits 32..63
    (masked, since the arithmetic shift of a negative int64 fills with ones). The known-answer tests in
    tests/kernels/test_kernel_sampling.py check this against the published Philox vectors."""
    prod = x * m
    return (prod >> 32) & 0xFFFFFFFF, prod & 0xFFFFFFFF


def philox_first_word(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS) -> torch.Tensor:
    """First word of Philox-4x32 (the kernels' generator) on int64 tensors holding uint32 values."""
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(c0, c1, c2, c3, k0, k1)
    for _ in range(rounds):
        hi0, lo0 = _mul_hi_lo(c0, PHILOX_M0)
        hi1, lo1 = _mul_hi_lo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + PHILOX_W0) & 0xFFFFFFFF, (k1 + PHILOX_W1) & 0xFFFFFFFF
    return c0


def _key(seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return seeds & 0xFFFFFFFF, (seeds >> 32) & 0xFFFFFFFF


def uniform_from_bits(bits: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """w in (0, 1) from 32 random bits, as the kernels compute it."""
    w = (bits.to(torch.float32) + 0.5) * 2.0**-32
    return w.clamp(max=0.99999994).to(dtype)


def gumbel_from_bits(bits: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Standard Gumbel draws from 32 random bits: -log(-log(1 - w)), with -log(1 - w) by its series for
    small w (the kernels' float32 formula; in float64 the same numbers more precisely)."""
    w = uniform_from_bits(bits, torch.float32).to(dtype)
    e = torch.where(w < SERIES_BELOW, w * (1.0 + w * (0.5 + w * (1.0 / 3.0))), -torch.log(1.0 - w))
    return -torch.log(e)


def random_confidence(seeds, positions, steps, streams) -> torch.Tensor:
    """The uniform draw that random remasking uses as each row's confidence (float32 [N])."""
    k0, k1 = _key(seeds)
    bits = philox_first_word(torch.full_like(positions, RANDOM_CONF_COUNTER), positions & 0xFFFFFFFF,
                             steps & 0xFFFFFFFF, streams & 0xFFFFFFFF, k0, k1)
    return uniform_from_bits(bits)


def sample_torch(logits: torch.Tensor, p: SamplingTensors, compute_dtype=torch.float32, chunk: int = 4,
                 conf_dtype=None):
    """The same contract in torch, a few rows at a time so no [N, V] temporary exists beyond the
    logits. Confidences come out in conf_dtype (default: the logits' dtype; float32 when a row uses
    random confidences). compute_dtype and conf_dtype float64 give the reference the tests measure the
    kernels against. Invalid rows are computed too (their outputs are unspecified by the contract)."""
    _check_logits(logits)
    n, vocab = logits.shape
    device = logits.device
    r = p.resolve(n, vocab, device)
    f = r.flags
    ids = torch.empty(n, dtype=torch.long, device=device)
    conf = torch.empty(n, dtype=conf_dtype or logits.dtype, device=device)
    vocab_ids = torch.arange(vocab, device=device)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        rows = slice(a, b)
        x = logits[a:b].to(compute_dtype, copy=True)  # never write into the caller's logits
        if f.penalty:
            v = logits[a:b]  # the oracle updates the logits in place, in their dtype
            pen = r.penalty[a:b, None]
            penalized = torch.where(v > 0, v / pen, v * pen).to(logits.dtype).to(compute_dtype)
            x = torch.where(r.bits("seen", rows, vocab) & (pen != 1.0), penalized, x)
        if f.suppress:
            x = x.masked_fill(r.bits("suppress", rows, vocab), -torch.inf)
        if f.sample:
            k0, k1 = _key(r.seeds[a:b, None])
            bits = philox_first_word(vocab_ids[None, :], r.positions[a:b, None] & 0xFFFFFFFF,
                                     r.steps[a:b, None] & 0xFFFFFFFF, r.streams[a:b, None] & 0xFFFFFFFF, k0, k1)
            # temperature 0 rows: x + 0 * g == x exactly (g is finite), the greedy choice
            temp = r.temperature[a:b, None].to(compute_dtype)
            choice = (x + temp * gumbel_from_bits(bits, compute_dtype)).argmax(dim=-1)
            del bits
        else:
            choice = x.argmax(dim=-1)
        if f.begin:
            x = x.masked_fill(r.bits("begin", rows, vocab), -torch.inf)
        ids[a:b] = choice
        conf[a:b] = torch.softmax(x, dim=-1).gather(-1, choice[:, None]).squeeze(-1).to(conf.dtype)
    return ids, r.with_random_confidence(conf)


def sample_reference(logits: torch.Tensor, p: SamplingTensors):
    """float64 reference of the sampler contract (ids, and confidences in float64)."""
    ids, conf = sample_torch(logits, p, compute_dtype=torch.float64, conf_dtype=torch.float64)
    return ids, conf.double()
