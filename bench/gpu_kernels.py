"""Kernel benchmarks for the GPU suite: each compares our kernel with the torch path it replaces, in the
same run, and reports derived figures (GB/s against the card's measured copy bandwidth, TFLOP/s, peak
memory). On CUDA the timer is triton.testing.do_bench (median); on CPU (the suite's self-test, tiny
shapes, Triton interpreter) a median of perf_counter rounds.

On the meta device (bench/record_launches.py) every benchmark goes through its calls once without
timing, checking or reading back anything: the Triton launches it would make at its shapes are recorded
(kernels/recorder.py) and not run, so the compile check compiles the launches of a full run without a GPU.

The sampler is timed twice: its public call (sample_triton: output allocation, the parameters' cache
lookup, the launch plan) and its two launches alone, planned once with parameters resolved on the
logits' own device and replayed from a CUDA graph (triton.testing.do_bench_cudagraph), so that a kernel
of a few microseconds is not measured as its launch overhead. The graph timing cycles through copies of
the logits larger than twice the L2 cache, so the kernel reads them from memory as the copy does.
"""

from __future__ import annotations

import inspect
import statistics
import time

import torch
import torch.nn.functional as F


def _real(device) -> bool:
    """Whether tensors on `device` hold data (not meta): only then is anything timed, compared or read."""
    return torch.device(device).type != "meta"


def _generator(device: str, seed: int = 0):
    """A seeded generator on `device` (None on meta, where nothing is drawn)."""
    return torch.Generator(device=device).manual_seed(seed) if _real(device) else None


def timeit(fn, device: str, rounds: int = 5) -> float:
    """Median seconds of fn() (on meta: fn() once, NaN)."""
    if not _real(device):
        fn()
        return float("nan")
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def timeit_graph(fn, device: str, rounds: int = 5) -> tuple[float, str]:
    """Median seconds of fn() without host work: on CUDA fn's launches captured in a CUDA graph and
    replayed (do_bench where do_bench_cudagraph is missing or the capture fails), on CPU as timeit.
    Returns (seconds, the timer used)."""
    if not device.startswith("cuda"):
        return timeit(fn, device, rounds), "perf_counter"
    import triton.testing as tt

    bench = getattr(tt, "do_bench_cudagraph", None)
    if bench is not None:
        try:
            # a triton whose graph timer has no return_mode: its default (the mean) is said in the row
            median = "return_mode" in inspect.signature(bench).parameters
            ms = bench(fn, rep=100, return_mode="median") if median else bench(fn, rep=100)
            return ms / 1e3, "cudagraph" if median else "cudagraph (mean)"
        except Exception as exc:  # capture refused: the launch-inclusive timer, said so in the row
            torch.cuda.synchronize()
            return timeit(fn, device), f"do_bench (graph capture failed: {type(exc).__name__})"
    return timeit(fn, device), "do_bench"


def l2_bytes(device: str) -> int:
    """The GPU's L2 cache size (0 on CPU; 64 MiB when torch does not say)."""
    if not device.startswith("cuda"):
        return 0
    return int(getattr(torch.cuda.get_device_properties(torch.device(device)), "L2_cache_size", 0) or 64 * 2**20)


def peak_bytes(fn, device: str) -> int | None:
    """Peak CUDA memory allocated while fn() runs, above what was allocated before (None on CPU)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


# ------------------------------------------------------------------------------------------ copy
def copy_bandwidth(device: str, mbytes: int = 1024) -> dict:
    """Device-to-device copy, bytes read + written per second: the roofline the sampler is held to."""
    n = mbytes * 2**20 // 4
    a = torch.empty(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    s = timeit(lambda: b.copy_(a), device)
    return {"bytes": 2 * a.numel() * 4, "seconds": s, "GB/s": 2 * a.numel() * 4 / s / 1e9}


# ------------------------------------------------------------------------------------------ sampler
def torch_sampler_chain(logits, temperature: float, penalty: float, seen, suppress, gen=None):
    """The reference sampler's per-step chain on [N, V] logits (penalty, suppression, float64 Gumbel
    noise, argmax, softmax, gather), as the engine would run it without the fused kernel."""
    x = logits.clone()
    if penalty != 1.0:
        v = x.gather(1, seen)
        x.scatter_(1, seen, torch.where(v > 0, v / penalty, v * penalty))
    if suppress:
        x[:, list(suppress)] = -torch.inf
    if temperature > 0:
        noise = torch.rand(x.shape, dtype=torch.float64, device=x.device, generator=gen)
        ids = (x.double() - temperature * torch.log(-torch.log(noise))).argmax(-1)
    else:
        ids = x.argmax(-1)
    return ids, torch.softmax(x.float(), -1).gather(-1, ids[:, None]).squeeze(-1)


def presolved_sampler(xs: list, weight, bias, vocab: int, p) -> tuple:
    """The sampler's launches alone: params resolved on the inputs' own device and the launches planned
    once for each input of `xs` (copies of one input, cycled through from call to call so that a graph
    of many calls reads each from memory). Returns (fn, ids, conf): fn runs the next input's launches
    into ids and conf."""
    from diffutron_engine.kernels.sampling import _sm_count, plan_sample

    x = xs[0]
    n, device = x.shape[0], x.device
    r = p.resolve(n, vocab, device)
    ids = torch.empty(n, dtype=torch.long, device=device)
    conf = torch.empty(n, dtype=x.dtype, device=device)
    plans = [plan_sample(xi, weight, bias, vocab, r, ids, conf, _sm_count(device)) for xi in xs]
    calls = [0]

    def fn():
        for launch in plans[calls[0] % len(plans)]:
            launch.run()
        calls[0] += 1

    return fn, ids, conf


def _copies(device: str, nbytes: int, cap: int = 8) -> int:
    """How many copies of an input of nbytes a timing loop cycles through so that they exceed twice the
    L2 cache (1 on CPU or for inputs that large already)."""
    l2 = l2_bytes(device)
    return 1 if not l2 or nbytes >= 2 * l2 else min(cap, 1 + -(-2 * l2 // nbytes))


def sampler(device: str, n: int = 64, vocab: int = 256_000, dtype=torch.bfloat16, copy_gbs: float | None = None,
            hidden: int = 768) -> list[dict]:
    from diffutron_engine.kernels.sampling import SamplingTensors, sample_head_triton, sample_triton

    g = _generator(device)
    logits = (torch.randn(n, vocab, device=device, generator=g) * 3).to(dtype)
    # the penalty's seen ids are drawn on the host, where the params' bitmaps are built from them anyway
    seen_ids = torch.randint(0, vocab, (n, 64), generator=torch.Generator().manual_seed(1))
    seen = seen_ids.to(device)
    nbytes = logits.numel() * logits.element_size()
    copies = [logits] + [logits.clone() for _ in range(_copies(device, nbytes) - 1)]
    rows = []
    for mode, kw in (("greedy", {}), ("penalty+suppress", dict(penalty=1.2, suppress=(0, 1, 2, 3))),
                     ("temperature 0.7", dict(temperature=0.7))):
        p = SamplingTensors(seeds=torch.arange(n), positions=torch.arange(n), steps=torch.zeros(n, dtype=torch.long),
                            seen=[seen_ids[i] for i in range(n)] if "penalty" in kw else None,
                            row_request=torch.arange(n) if "penalty" in kw else None, **kw)
        # bitmaps and per-row tensors on the logits' own device (the engine keeps them there), so that
        # no timed call builds or copies them
        p.resolve(n, vocab, logits.device)
        t_kernel = timeit(lambda: sample_triton(logits, p), device)
        kernel_only, k_ids, _ = presolved_sampler(copies, None, None, vocab, p)
        t_launches, timer = timeit_graph(kernel_only, device)
        t_torch = timeit(lambda: torch_sampler_chain(logits, kw.get("temperature", 0.0), kw.get("penalty", 1.0),
                                                     seen, kw.get("suppress", ())), device)
        ids, _ = sample_triton(logits, p)
        kernel_only()  # the next copy: the same values, so the same tokens
        if _real(device):
            assert torch.equal(k_ids, ids), f"sampler {mode}: the pre-resolved launches and the call chose differently"
        if not p.sample and _real(device):
            ref, _ = torch_sampler_chain(logits, 0.0, kw.get("penalty", 1.0), seen, kw.get("suppress", ()))
            assert torch.equal(ids, ref), f"sampler {mode}: kernel and torch chain chose different tokens"
        gbs = nbytes / t_launches / 1e9
        rows.append({"kernel": "sampler", "case": f"{mode} N={n} V={vocab} {str(dtype).split('.')[-1]}",
                     "ours_ms": t_kernel * 1e3, "kernel_ms": t_launches * 1e3, "kernel_timer": timer,
                     "torch_ms": t_torch * 1e3, "speedup": t_torch / t_kernel, "GB/s": gbs,
                     "pct_copy_bw": None if not copy_gbs else 100 * gbs / copy_gbs, "logits_copies": len(copies),
                     "resolved_params": len(getattr(p, "_resolved", {}))})
    del copies
    # the fused LM head: logits never stored, against cuBLAS linear + the fused sampler
    h = torch.randn(n, hidden, device=device, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, device=device, generator=g) * 0.05).to(dtype)
    b = torch.zeros(vocab, device=device, dtype=dtype)
    p = SamplingTensors()
    p.resolve(n, vocab, h.device)
    t_fused = timeit(lambda: sample_head_triton(h, w, b, p), device)
    head_only, _, _ = presolved_sampler([h], w, b, vocab, p)
    t_head, timer = timeit_graph(head_only, device)
    t_split = timeit(lambda: sample_triton(F.linear(h, w, b), p), device)
    t_torch = timeit(lambda: torch_sampler_chain(F.linear(h, w, b), 0.0, 1.0, None, ()), device)
    rows.append({"kernel": "sampler+head", "case": f"greedy N={n} V={vocab} H={hidden}", "ours_ms": t_fused * 1e3,
                 "kernel_ms": t_head * 1e3, "kernel_timer": timer, "torch_ms": t_torch * 1e3,
                 "speedup": t_torch / t_fused, "linear+kernel_ms": t_split * 1e3,
                 "TFLOP/s": 2 * n * vocab * hidden / t_head / 1e12})
    return rows


# ------------------------------------------------------------------------------------------ attention
def attention(device: str, dtype=torch.bfloat16, shapes=None) -> list[dict]:
    """The runner's shapes: full forwards of canvases (Q = T) and the dual cache's block recompute
    (Q = 32 against T keys in the pool), global and sliding (+-64) layers."""
    from diffutron_engine.kernels.attention import attention_triton

    shapes = shapes or [(1, 192, 192), (64, 192, 192), (1, 32, 192), (64, 32, 192), (8, 32, 1024)]
    heads, dim = 12, 64
    rows = []
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None
    for B, Q, T in shapes:
        for window in (None, 64):
            g = _generator(device)
            q = torch.randn(B, heads, Q, dim, device=device, generator=g).to(dtype)
            k = torch.randn(B, heads, T, dim, device=device, generator=g).to(dtype)
            v = torch.randn(B, heads, T, dim, device=device, generator=g).to(dtype)
            slots = torch.arange(B, device=device)
            q_pos = (torch.arange(Q, device=device) + (T - Q) // 2).expand(B, Q).contiguous()
            valid = torch.ones(B, T, dtype=torch.bool, device=device)
            kpos = torch.arange(T, device=device)
            mask = valid[:, None, None, :]
            if window:
                mask = mask & ((q_pos[:, :, None] - kpos[None, None, :]).abs() <= window)[:, None]
            t_ours = timeit(lambda: attention_triton(q, k, v, slots, q_pos, valid, window), device)
            t_sdpa = timeit(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), device)
            out = attention_triton(q, k, v, slots, q_pos, valid, window)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
            err = (out.float() - ref).abs().max().item() if _real(device) else None
            keys = T if not window else min(T, 2 * window + 1)
            flops = 4 * B * heads * Q * keys * dim  # QK^T and PV over the attended keys
            row = {"kernel": "attention", "case": f"B={B} Q={Q} T={T} {'sliding' if window else 'global'}",
                   "ours_ms": t_ours * 1e3, "torch_ms": t_sdpa * 1e3, "speedup": t_sdpa / t_ours,
                   "TFLOP/s": flops / t_ours / 1e12, "max_err_vs_fp32": err}
            if flash_attn_func is not None and window is None and Q == T:
                qf, kf, vf = (x.transpose(1, 2).contiguous() for x in (q, k, v))
                row["flash_attn_ms"] = timeit(lambda: flash_attn_func(qf, kf, vf), device) * 1e3
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ cross-entropy
def cross_entropy(device: str, n: int = 8192, vocab: int = 256_000, hidden: int = 768, dtype=torch.bfloat16) -> list[dict]:
    """Loss + gradients (hidden, weight, bias): fused linear cross-entropy vs linear + F.cross_entropy."""
    from diffutron_engine.kernels.cross_entropy import linear_cross_entropy_triton

    g = _generator(device)
    h = torch.randn(n, hidden, device=device, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device, generator=g) * 0.02).to(dtype).requires_grad_()
    b = torch.zeros(vocab, device=device, dtype=dtype, requires_grad=True)
    target = torch.randint(0, vocab, (n,), device=device, generator=g)

    def fused():
        # the Triton kernels wherever this runs (the self-test, meta tensors)
        linear_cross_entropy_triton(h, w, target, bias=b, reduction="mean").backward()

    def plain():
        F.cross_entropy(F.linear(h, w, b).float(), target).backward()

    rows = []
    for name, fn in (("fused", fused), ("torch", plain)):
        rows.append({"impl": name, "seconds": timeit(fn, device, rounds=3), "peak_bytes": peak_bytes(fn, device)})
        h.grad = w.grad = b.grad = None
    fused_row, torch_row = rows
    out = {"kernel": "cross_entropy", "case": f"fwd+bwd N={n} V={vocab} H={hidden} {str(dtype).split('.')[-1]}",
           "ours_ms": fused_row["seconds"] * 1e3, "torch_ms": torch_row["seconds"] * 1e3,
           "time_ratio": fused_row["seconds"] / torch_row["seconds"]}
    if fused_row["peak_bytes"] is not None:
        out.update(ours_peak_mb=fused_row["peak_bytes"] / 2**20, torch_peak_mb=torch_row["peak_bytes"] / 2**20,
                   memory_ratio=torch_row["peak_bytes"] / max(fused_row["peak_bytes"], 1))
    return [out]


# ------------------------------------------------------------------------------------------ the runs
def runs(device: str, quick: bool, copy_gbs: float | None = None) -> dict:
    """The GPU suite's kernel benchmarks, name -> call: at the model's shapes (a full run), or tiny ones
    for the suite's self-test (quick). The suite times them on its device; bench/record_launches.py runs
    the full ones on meta tensors to record their launches."""
    if quick:
        half = torch.float16 if device == "cpu" else torch.bfloat16  # the interpreter's bfloat16 dot is wrong
        return {"sampler": lambda: sampler(device, n=4, vocab=3000, dtype=torch.float32, copy_gbs=copy_gbs, hidden=32),
                "attention": lambda: attention(device, dtype=half, shapes=[(1, 16, 40), (2, 8, 40)]),
                "cross_entropy": lambda: cross_entropy(device, n=64, vocab=1000, hidden=32, dtype=torch.float32)}
    return {"sampler": lambda: sampler(device, n=64, vocab=256_000, dtype=torch.bfloat16, copy_gbs=copy_gbs),
            "attention": lambda: attention(device, dtype=torch.bfloat16),
            "cross_entropy": lambda: cross_entropy(device, n=8192, vocab=256_000, hidden=768, dtype=torch.bfloat16)}
