#!/usr/bin/env python3
"""Record every Triton launch that the GPU suite and the engine make, without a GPU, for the compile check.

    python bench/record_launches.py --out build/launches/recorded.jsonl
    python bench/record_launches.py --out FILE --skip tests        # the engine matrix and benchmarks only
    python bench/gpu_compile_check.py --recorded FILE              # then compile what was recorded

Three sources, each appending to FILE through kernels/recorder.py:
- engine: the engine on the golden model with every op forced to Triton (the interpreter), in float32,
  bfloat16 and float16, for every cache mode, with and without the fused LM head; each engine first runs
  a batch with no per-row feature (greedy top-k, no penalty: the engine's default step), then a batch
  that mixes every feature (sampling, repetition penalty, suppressed and begin-suppressed ids, CFG, the
  threshold and factor rules, random remasking), with more requests than rows so that rows join and leave;
- benchmarks: the GPU suite's kernel benchmarks (bench/gpu_kernels.py) at their real shapes on meta
  tensors, recorded and not run;
- tests: the GPU suite's test tier (the tests bench/gpu_suite selects by its marker) under the interpreter, in a child
  process with DIFFUTRON_RECORD_LAUNCHES set.
The FILE is replaced only when every source succeeded (written beside it, then renamed). Prints one JSON
line: launches recorded per source, distinct kernels, seconds.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("engine", "benchmarks", "tests")
TESTS_TIMEOUT = 900
GOLDEN_MODEL = os.path.join(ROOT, "tests", "data", "golden", "mdlm-tiny", "model")


def _gpu_suite():
    loader = importlib.machinery.SourceFileLoader("gpu_suite", os.path.join(ROOT, "bench", "gpu_suite"))
    spec = importlib.util.spec_from_loader("gpu_suite", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def engine_matrix(path: str, log) -> None:
    import torch

    from diffutron_engine.backends import force_backend
    from diffutron_engine.config import CACHE_MODES, SamplingParams
    from diffutron_engine.engine import Engine
    from diffutron_engine.kernels import recorder
    from diffutron_engine.loading import load_model

    short = dict(max_new_tokens=4, block_size=2, steps=4, early_stop=False)
    plain = SamplingParams(**short)
    mixed = [
        SamplingParams(**short, temperature=0.8, seed=1),
        SamplingParams(**short, repetition_penalty=1.3, suppress_tokens=[5, 6], begin_suppress_tokens=[7]),
        SamplingParams(**short, cfg_scale=0.5),
        SamplingParams(**short, threshold=0.3),
        SamplingParams(**short, factor=1.0, temperature=0.5, seed=2),
        SamplingParams(**short, remasking="random", seed=3),
    ]
    prompts = [[5, 17, 23, 40, 41, 42], [7, 8, 9], [11, 12], [13, 14, 15, 16], [20, 21, 22], [30]]
    with recorder.recording(path):
        for dtype in ("float32", "bfloat16", "float16"):
            lm = load_model(GOLDEN_MODEL, dtype=dtype, device="cpu")
            for cache in CACHE_MODES:
                for fused in (False, True):
                    t = time.monotonic()
                    with force_backend("triton"):
                        # fewer rows than requests: rows finish, free their slot and new ones join
                        eng = Engine(lm.model, lm.tokenizer, max_batch=3, cache=cache, fused_head=fused)
                    eng.generate(prompts[:2], plain)
                    eng.generate(prompts, mixed)
                    log(f"[record] engine {dtype} cache={cache} fused_head={fused}: {time.monotonic() - t:.1f} s")
            del lm
    torch.set_default_dtype(torch.float32)


def benchmarks(path: str, log) -> None:
    """The GPU suite's kernel benchmarks at their full shapes, on meta tensors: recorded, not run."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import gpu_kernels as gk

    from diffutron_engine.kernels import recorder

    with recorder.recording(path, execute=False):
        for name, fn in gk.runs("meta", quick=False).items():
            t = time.monotonic()
            fn()
            log(f"[record] benchmark {name} (meta): {time.monotonic() - t:.1f} s")


def tests(path: str, log) -> None:
    env = dict(os.environ, DIFFUTRON_RECORD_LAUNCHES=path, HF_HUB_OFFLINE="1", TRITON_INTERPRET="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *_gpu_suite().gpu_test_args()]
    t = time.monotonic()
    try:  # a hung test must not hang the compile check: 4 minutes on 2 cores, 15 allowed
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=TESTS_TIMEOUT, start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        tail = exc.output if isinstance(exc.output, str) else (exc.output or b"").decode(errors="replace")
        raise RuntimeError(f"the GPU tier's tests did not finish in {TESTS_TIMEOUT} s:\n{tail[-3000:]}") from None
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    log(f"[record] tests (marked {_gpu_suite().GPU_MARKER}): {tail} in {time.monotonic() - t:.1f} s")
    if proc.returncode != 0:
        raise RuntimeError(f"the GPU tier's tests failed under the interpreter: {tail}\n{proc.stdout[-3000:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the JSONL file of recorded launches (replaced when done)")
    ap.add_argument("--skip", default="", help=f"comma-separated sources to skip: {','.join(SOURCES)}")
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(SOURCES):
        print(f"error: unknown source(s) {', '.join(sorted(skip - set(SOURCES)))}; sources are {', '.join(SOURCES)}",
              file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    if os.path.isdir(out) or not os.path.isdir(os.path.dirname(out)):
        print(f"error: --out {args.out!r} must be a file in an existing folder", file=sys.stderr)
        return 2
    os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton: kernels run on CPU tensors
    os.environ.pop("DIFFUTRON_RECORD_LAUNCHES", None)  # this script decides where each source records
    sys.path.insert(0, ROOT)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    partial = out + ".partial"
    if os.path.exists(partial):
        os.remove(partial)  # our own leftover from an interrupted run
    t0, counts = time.monotonic(), {}
    for name, fn in (("engine", engine_matrix), ("benchmarks", benchmarks), ("tests", tests)):
        if name in skip:
            continue
        before = _count(partial)
        try:
            fn(partial, log)
        except Exception as exc:  # the previous recording is left as it was
            traceback.print_exc()
            print(f"error: recording {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        counts[name] = _count(partial) - before
    if not os.path.exists(partial):
        open(partial, "w").close()
    os.replace(partial, out)
    from diffutron_engine.kernels import recorder

    kernels = sorted({rec["kernel"].split(":")[1] for rec in recorder.read(out)})
    print(json.dumps({"out": out, "launches": counts, "kernels": kernels, "seconds": round(time.monotonic() - t0, 1)}))
    return 0


def _count(path: str) -> int:
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if line.strip())


if __name__ == "__main__":
    sys.exit(main())
