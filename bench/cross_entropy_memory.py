"""Peak memory and time of the fused linear cross-entropy against the plain torch path (linear, then
F.cross_entropy), forward + backward, each in a fresh process so one allocator's history cannot leak into
the other's figure. Peak = resident-set high-water mark above the process's memory after the inputs
exist (CPU) or the CUDA allocator's peak above the allocated inputs (GPU).

    .venv/bin/python bench/cross_entropy_memory.py                  # N=2048, V=256,000, H=768, float32, CPU
    .venv/bin/python bench/cross_entropy_memory.py --n 8192 --device cuda --dtype bfloat16

Prints a table; the last line is one JSON document (also written with --save FOLDER).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one(impl: str, n: int, v: int, h: int, dtype: str, device: str) -> dict:
    import torch
    import torch.nn.functional as F

    from diffutron_engine.bench.measure import PeakMemory
    from diffutron_engine.backends import cross_entropy as fused_linear_cross_entropy

    dt = getattr(torch, dtype)
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, generator=g, device=device).to(dt).requires_grad_()
    weight = (torch.randn(v, h, generator=g, device=device) * 0.02).to(dt).requires_grad_()
    bias = torch.zeros(v, device=device, dtype=dt, requires_grad=True)
    target = torch.randint(0, v, (n,), generator=g, device=device)
    # gradients of the inputs exist in both cases: allocate them before measuring
    for t in (hidden, weight, bias):
        t.grad = torch.zeros_like(t)

    def run():
        if impl == "fused":
            loss = fused_linear_cross_entropy(hidden, weight, target, bias=bias, reduction="mean")
        else:
            loss = F.cross_entropy(F.linear(hidden, weight, bias).float(), target)
        loss.backward()
        return float(loss)

    with PeakMemory(device) as mem:
        t = time.perf_counter()
        loss = run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
    return {"impl": impl, "loss": loss, "seconds": seconds, "peak_mb": mem.peak}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=256_000)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--save", metavar="FOLDER")
    ap.add_argument("--_one", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._one:
        print(json.dumps(one(args._one, args.n, args.vocab, args.hidden, args.dtype, args.device)))
        return 0
    rows = []
    for impl in ("fused", "torch"):
        cmd = [sys.executable, os.path.abspath(__file__), "--_one", impl, "--n", str(args.n), "--vocab",
               str(args.vocab), "--hidden", str(args.hidden), "--dtype", args.dtype, "--device", args.device]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if out.returncode != 0:
            print(out.stderr[-2000:], file=sys.stderr)
            return 1
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    fused, plain = rows
    print(f"fused linear cross-entropy vs torch, forward + backward: N={args.n} V={args.vocab} H={args.hidden} "
          f"{args.dtype} on {args.device}")
    print(f"{'impl':<8} {'seconds':>9} {'peak MB':>9} {'loss':>10}")
    for r in rows:
        print(f"{r['impl']:<8} {r['seconds']:9.2f} {r['peak_mb']:9.0f} {r['loss']:10.5f}")
    report = {"config": vars(args) | {"_one": None}, "rows": rows,
              "memory_ratio": plain["peak_mb"] / max(fused["peak_mb"], 1e-9),
              "time_ratio": fused["seconds"] / plain["seconds"]}
    print(f"memory: torch / fused = {report['memory_ratio']:.1f}x; time: fused / torch = {report['time_ratio']:.2f}")
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        path = os.path.join(args.save, f"{time.strftime('%Y-%m-%d')}-{args.device}-cross-entropy-n{args.n}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=1)
        os.replace(path + ".tmp", path)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
