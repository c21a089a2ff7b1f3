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
launchers, and the pure-torch implementation beside them (the torch backend, and in float64 the
reference the tests measure the others against).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

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

    @triton.jit
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
        FUSE_HEAD: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PENALTY: tl.constexpr,
        HAS_SUPPRESS: tl.constexpr, HAS_BEGIN: tl.constexpr, SAMPLE: tl.constexpr, HAS_VALID: tl.constexpr,
        ROUNDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0).to(tl.int64)
        pid_s = tl.program_id(1).to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N
        if HAS_VALID:
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
        if HAS_PENALTY or HAS_SUPPRESS or HAS_BEGIN:
            bmap = tl.load(map_ptr + rows, mask=row_ok, other=0)
        if HAS_PENALTY:
            pen = tl.load(pen_ptr + rows, mask=row_ok, other=1.0)
            pen_on = row_ok & (pen != 1.0)  # rows without a penalty never read their bitmap

        best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        best_id = tl.zeros((BLOCK_M,), tl.int64)
        best_x = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_M,), tl.float32)

        # a program whose rows are all invalid does no work
        t_lo = pid_s * tiles_per_split
        t_hi = tl.where(tl.max(row_ok.to(tl.int32), axis=0) > 0, t_lo + tiles_per_split, t_lo)
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
                    acc += tl.dot(h, tl.trans(w))
                if HAS_BIAS:
                    acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                # round as the unfused head would store its logits, so both variants see the same values
                x = tl.where(ok, acc.to(out_dtype).to(tl.float32), float("-inf"))
            else:
                x = tl.load(x_ptr + rows[:, None] * x_stride_n + cols[None, :], mask=ok,
                            other=float("-inf")).to(tl.float32)
            if HAS_PENALTY:
                word = tl.load(seen_ptr + bmap[:, None] * seen_stride_r + (cols // 32)[None, :],
                               mask=pen_on[:, None] & col_ok[None, :], other=0)
                seen = ((word >> (cols % 32)[None, :]) & 1) != 0
                penalized = tl.where(x > 0, x / pen[:, None], x * pen[:, None]).to(out_dtype).to(tl.float32)
                x = tl.where(seen, penalized, x)
            if HAS_SUPPRESS:
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
            if HAS_BEGIN:
                xc = tl.where(_bit_set(beg_ptr + bmap[:, None] * beg_stride_r, cols[None, :], ok), float("-inf"), x)
            else:
                xc = x
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
        part_score_ptr, part_id_ptr, part_x_ptr, part_m_ptr, part_s_ptr,
        out_id_ptr, out_conf_ptr, N, n_splits,
        BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        j = tl.arange(0, BLOCK_S)
        ok = (rows < N)[:, None] & (j < n_splits)[None, :]
        at = rows[:, None] * n_splits + j[None, :]
        score = tl.load(part_score_ptr + at, mask=ok, other=float("-inf"))
        ids = tl.load(part_id_ptr + at, mask=ok, other=0)
        xs = tl.load(part_x_ptr + at, mask=ok, other=float("-inf"))
        m = tl.load(part_m_ptr + at, mask=ok, other=float("-inf"))
        s = tl.load(part_s_ptr + at, mask=ok, other=0.0)
        win = tl.argmax(score, axis=1)  # first split on ties: it holds the smaller ids
        pick = j[None, :] == win[:, None]
        best_id = tl.sum(tl.where(pick, ids, 0), axis=1)
        best_x = tl.sum(tl.where(pick, xs, 0.0), axis=1)
        m_all = tl.max(m, axis=1)
        shift = tl.where(m_all == float("-inf"), 0.0, m_all)
        total = tl.sum(s * tl.exp(m - shift[:, None]), axis=1)
        conf = tl.exp(best_x - shift) / total
        tl.store(out_id_ptr + rows, best_id, mask=rows < N)
        tl.store(out_conf_ptr + rows, conf.to(out_conf_ptr.dtype.element_ty), mask=rows < N)


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
class SampleParams:
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
        key = (n, vocab, str(device))
        if key not in self._resolved:
            self._resolved[key] = _Resolved.build(self, n, vocab, device)
        return self._resolved[key]


@dataclass
class _Resolved:
    """SampleParams as the kernels read them: [N] tensors, bitmaps with their row strides (0: one
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
    def build(cls, p: SampleParams, n: int, vocab: int, device) -> "_Resolved":
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
def _splits(n_row_blocks: int, n_tiles: int, device) -> tuple[int, int]:
    """Split each row's vocabulary so that the grid has a few programs per SM (a handful of rows alone
    would leave most of the GPU idle); returns (splits, tiles per split)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    want = max(1, min(n_tiles, triton.cdiv(4 * sms, n_row_blocks)))
    per = triton.cdiv(n_tiles, want)
    return triton.cdiv(n_tiles, per), per


def _launch(x, weight, bias, vocab: int, p: SampleParams, block_m: int, block_v: int, block_k: int,
            conf_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    if triton is None:
        raise RuntimeError("the triton sampler needs the `triton` package (pip install triton)")
    n, device = x.shape[0], x.device
    ids = torch.empty(n, dtype=torch.long, device=device)
    conf = torch.empty(n, dtype=conf_dtype, device=device)
    if n == 0:
        return ids, conf
    r = p.resolve(n, vocab, device)
    f = r.flags
    row_blocks = triton.cdiv(n, block_m)
    n_tiles = triton.cdiv(vocab, block_v)
    n_splits, per_split = _splits(row_blocks, n_tiles, device)
    parts = [torch.empty(n, n_splits, dtype=dt, device=device)
             for dt in (torch.float32, torch.long, torch.float32, torch.float32, torch.float32)]
    fuse = weight is not None
    valid = r.valid.view(torch.int8) if r.valid is not None else r.temperature  # a dummy when absent
    _sample_partial_kernel[(row_blocks, n_splits)](
        x, x.stride(0),
        weight if fuse else x, weight.stride(0) if fuse else 0, bias if bias is not None else x,
        r.temperature, r.penalty, valid,
        r.seeds, r.positions, r.steps, r.streams, r.maps,
        r.seen, r.seen_stride, r.suppress, r.suppress_stride, r.begin, r.begin_stride,
        *parts,
        n, vocab, x.shape[1] if fuse else 0, per_split, n_splits,
        FUSE_HEAD=fuse, HAS_BIAS=bias is not None, HAS_PENALTY=f.penalty, HAS_SUPPRESS=f.suppress,
        HAS_BEGIN=f.begin, SAMPLE=f.sample, HAS_VALID=r.valid is not None, ROUNDS=PHILOX_ROUNDS,
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k,
        num_warps=8 if fuse or block_v >= 2048 else 4,
    )
    block_r = min(1024, max(16, triton.next_power_of_2(n)))  # many rows per program: the merge is tiny
    _sample_merge_kernel[(triton.cdiv(n, block_r),)](*parts, ids, conf, n, n_splits, BLOCK_R=block_r,
                                                     BLOCK_S=max(16, triton.next_power_of_2(n_splits)))
    return ids, r.with_random_confidence(conf)


def _check_logits(logits: torch.Tensor, contiguous_rows: bool = False) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if contiguous_rows and logits.shape[0] and logits.stride(1) != 1:
        raise ValueError("logits rows must be contiguous (stride 1 along the vocabulary)")


def sample_triton(logits: torch.Tensor, p: SampleParams, block_v: int | None = None, block_m: int = 1):
    """Token choice and confidence for each row of logits [N, V] (any V), one launch plus a merge.
    One row per program by default (the vocabulary split keeps the GPU busy, and a row's own
    temperature, penalty and validity decide its work); block_m > 1 packs rows, which suits many short
    rows (the interpreter's statistical tests)."""
    _check_logits(logits, contiguous_rows=True)
    block_v = block_v or 2048
    return _launch(logits, None, None, logits.shape[1], p, block_m, block_v, 16, logits.dtype)


def sample_head_triton(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, p: SampleParams,
                       block_v: int | None = None, block_k: int | None = None):
    """As `sample_triton` on logits = hidden @ weight.T + bias, computed tile by tile and never stored
    (hidden [N, H], weight [V, H] with rows contiguous, bias [V] or None)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, H] and weight [V, H] must agree on H, got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    if hidden.stride(1) != 1 or weight.stride(1) != 1 or (bias is not None and not bias.is_contiguous()):
        raise ValueError("hidden, weight and bias must be contiguous along their last dimension")
    n = hidden.shape[0]
    # tensor cores need >= 16 rows per tile; one row block up to 64 rows reads the weight once
    block_m = max(16, min(64, triton.next_power_of_2(max(n, 1))))
    return _launch(hidden, weight, bias, weight.shape[0], p, block_m, block_v or 128, block_k or 64, hidden.dtype)


# ----------------------------------------------------------------------------------------------- torch
def _mul_hi_lo(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of m * x for uint32 values held in int64. The 64-bit product wraps
    around in int64, which keeps every bit: the low word is its low 32 bits, the high word bits 32..63
    (masked, since the arithmetic shift of a negative int64 fills with ones). The known-answer tests in
    tests/test_kernel_sampling.py check this against the published Philox vectors."""
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


def sample_torch(logits: torch.Tensor, p: SampleParams, compute_dtype=torch.float32, chunk: int = 4,
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


def sample_reference(logits: torch.Tensor, p: SampleParams):
    """float64 reference of the sampler contract (ids, and confidences in float64)."""
    ids, conf = sample_torch(logits, p, compute_dtype=torch.float64, conf_dtype=torch.float64)
    return ids, conf.double()
