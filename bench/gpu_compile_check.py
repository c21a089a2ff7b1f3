#!/usr/bin/env python3
"""Compile every Triton kernel of the engine for real GPUs, without a GPU.

    python bench/gpu_compile_check.py                    # sm_80, sm_90, sm_100; all kernels
    python bench/gpu_compile_check.py --targets 90 --kernels unmask --jobs 2
    python bench/gpu_compile_check.py --recorded build/launches/recorded.jsonl   # plans + what really ran
    make gpu-compile-check [TRITON_SPEC=triton==3.6.0]   # records, then the above, optionally another triton

The CPU interpreter that the test suite runs the kernels in accepts programs the real compiler rejects
(tiles over Triton's size limit, register pressure, spills). This check takes the launches each
launcher plans (every kernel file's `compile_plans()`: the launcher's own plan function called on meta
tensors over the configurations it can choose at the model's real shapes), specializes their arguments
as Triton's runtime would, adds the launches recorded while the code really ran (`--recorded`: the
GPU tier's tests and an engine run of every mode under the interpreter, the GPU suite's benchmarks on
meta tensors; kernels/recorder.py, bench/record_launches.py), and compiles each distinct configuration
(program) for each target through ptxas
(shipped in the triton wheel). `cuobjdump -res-usage` on the cubin gives registers, the stack frame
(spilled registers live there) and local memory; the kernel's shared memory comes from the compiler.

A configuration fails on a compile error, a compile over --compile-timeout seconds, any stack or local
memory (a spill), or shared memory over the card's per-block limit; and a recorded launch whose argument
types or switches no plan has fails as drift (the plans no longer say what runs). Prints a table, then
one JSON line:
{"triton", "targets", "kernels", "configs", "failures", "spill_bytes", "max_registers", "max_shared_bytes", ...}.
Exit code 1 when anything failed. See docs/kernels.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# per-block shared memory a kernel may use (opt-in maximum), bytes
TARGETS = {80: ("A100", 166912), 90: ("H100/H200", 232448), 100: ("B200", 232448)}
# SMs of the cards above: the sampler's vocabulary split depends on them
SMS = {80: 108, 90: 132, 100: 148}
KERNEL_FILES = ("sampling", "unmask", "attention", "cross_entropy")

_PLANS: list = []  # (kernel file, Launch, ASTSource, options), filled before the worker pool forks


def _compile_one(job):
    """Compile plan `index` for compute capability `cc`; returns a result row (run in a worker)."""
    index, cc, timeout = job
    kernel_file, launch, src, options = _PLANS[index]
    import triton
    from triton.backends.compiler import GPUTarget

    row = {"kernel": launch.name, "file": kernel_file, "config": launch.describe(), "target": f"sm_{cc}"}
    t0 = time.monotonic()

    def on_alarm(signum, frame):
        raise TimeoutError(f"compile took over {timeout} s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(timeout)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
        signal.alarm(0)
        row.update(_resources(compiled.asm["cubin"]), shared=int(compiled.metadata.shared))
        row["tf32"] = bool(re.search(r"\.tf32", compiled.asm.get("ptx", "")))
        row["status"] = "ok"
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a row, the check goes on
        signal.alarm(0)
        row["status"] = "error"
        lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
        # a CompilationError reads "at LINE:COL:", the source, then the cause: keep the place and the cause
        text = lines[0] if len(lines) < 2 else f"{lines[0]} {lines[-1]}"
        cause = getattr(exc, "__cause__", None)
        if cause is not None and str(cause).strip() and str(cause).strip() not in text:
            text += f" ({str(cause).strip().splitlines()[-1]})"
        row["error"] = f"{type(exc).__name__}: {text[:400]}"
    row["seconds"] = round(time.monotonic() - t0, 1)
    limit = TARGETS[cc][1]
    if row["status"] == "ok":
        problems = []
        if row["stack"] or row["local"]:
            problems.append(f"spills ({row['stack']} B stack, {row['local']} B local per thread)")
        if row["shared"] > limit:
            problems.append(f"shared memory {row['shared']} B over the {limit} B limit")
        if problems:
            row["status"] = "fail"
            row["error"] = "; ".join(problems)
    return row


def _source(launch, backend, ASTSource):
    """(ASTSource, options) for a launch, specialized exactly as triton's runtime specializes a call
    with these arguments (types, 16-byte alignment and divisibility, constexprs)."""
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.options)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.options, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), options.__dict__


def _key(src, options, cc) -> str:
    """Identity of the compiled program (two plans with the same key compile to the same binary)."""
    return f"{cc}:{src.hash()}:{sorted(options.items())}"


def _resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{out}")
    return {"registers": int(m[1]), "stack": int(m[2]), "local": int(m[4])}


def collect(kernel_files, sms: int) -> list:
    """(file, Launch) for every plan of the chosen kernel files."""
    import importlib

    import diffutron_engine  # noqa: F401 - maps the source tree's kernels/ as diffutron_engine.kernels

    plans = []
    for name in kernel_files:
        module = importlib.import_module(f"diffutron_engine.kernels.{name}")
        plans += [(name, p) for p in module.compile_plans(sms=sms)]
    return plans


def collect_recorded(paths, kernel_files) -> list:
    """(file, Launch) for every distinct launch recorded in `paths` (kernels/recorder.py) by a kernel of
    the chosen files."""
    import diffutron_engine  # noqa: F401
    from diffutron_engine.kernels import recorder

    out, elsewhere = [], set()
    for launch in recorder.load(paths):
        name = launch.recorded["kernel"].split(":")[0].rsplit(".", 1)[-1]
        if name in kernel_files:
            out.append((name, launch.labelled(f"recorded {_recorded_label(launch)}")))
        elif name not in KERNEL_FILES:
            elsewhere.add(launch.recorded["kernel"])
    if elsewhere:  # a kernel outside the checked files still runs: say so rather than drop it in silence
        print(f"[compile-check] recorded launches of kernels this check does not know: {', '.join(sorted(elsewhere))}",
              file=sys.stderr, flush=True)
    return out


def _recorded_label(launch) -> str:
    """A recorded launch's configuration for the table: its tensors' dtypes in argument order."""
    dtypes = [a["tensor"] for a in launch.recorded["positional"] if isinstance(a, dict) and "tensor" in a]
    return "/".join(dict.fromkeys(dtypes))


def drift(plans, recorded) -> list[dict]:
    """A failure row for every recorded launch whose feature key (argument types, bool and string
    switches: recorder.feature_key) no plan has: the plans no longer describe what runs."""
    from diffutron_engine.kernels import recorder

    planned = {recorder.feature_key(launch) for _, launch in plans}
    rows, reported = [], set()
    for kernel_file, launch in recorded:
        key = recorder.feature_key(launch)
        if key in planned or key in reported:
            continue
        reported.add(key)
        rows.append({"kernel": launch.name, "file": kernel_file, "config": launch.describe(), "target": "-",
                     "status": "drift", "seconds": 0.0,
                     "error": "a recorded launch that no plan makes: " + recorder.closest_difference(key, planned)})
    return rows


def table(rows) -> str:
    head = f"{'kernel':<24} {'target':<7} {'status':<6} {'regs':>4} {'spill B':>7} {'shared B':>8} {'s':>5}  config"
    lines = [head, "-" * len(head)]
    for r in rows:
        spill = r.get("stack", 0) + r.get("local", 0) if "stack" in r else ""
        lines.append(f"{r['kernel']:<24} {r['target']:<7} {r['status']:<6} {r.get('registers', ''):>4} {spill:>7} "
                     f"{r.get('shared', ''):>8} {r['seconds']:>5}  {r['config']}"
                     + (f"\n{'':<24} -> {r['error']}" if r.get("error") else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="80,90,100", help="compute capabilities, comma-separated (80, 90, 100)")
    ap.add_argument("--kernels", default=",".join(KERNEL_FILES), help="kernel files to check, comma-separated")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles in parallel")
    ap.add_argument("--compile-timeout", type=int, default=120,
                    help="seconds one configuration may take to compile (longer is itself a defect)")
    ap.add_argument("--json-out", help="also write the full result (every row) to this file")
    ap.add_argument("--recorded", action="append", default=[], metavar="FILE",
                    help="launches recorded by kernels/recorder.py (DIFFUTRON_RECORD_LAUNCHES=FILE, or "
                         "bench/record_launches.py): compiled beside the plans, and any whose argument types or "
                         "switches no plan has fails as drift; repeatable")
    args = ap.parse_args(argv)

    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 makes the kernels interpreter functions; unset it to compile them",
              file=sys.stderr)
        return 2
    try:
        targets = [int(t) for t in args.targets.split(",") if t.strip()]
    except ValueError:
        print(f"error: --targets must be compute capabilities like 80,90,100, got {args.targets!r}", file=sys.stderr)
        return 2
    unknown = [t for t in targets if t not in TARGETS]
    kernel_files = [k.strip() for k in args.kernels.split(",") if k.strip()]
    bad = [k for k in kernel_files if k not in KERNEL_FILES]
    if unknown or bad or not targets or not kernel_files:
        print(f"error: targets must be among {sorted(TARGETS)} and kernels among {', '.join(KERNEL_FILES)}; got "
              f"--targets {args.targets!r} --kernels {args.kernels!r}", file=sys.stderr)
        return 2
    for path in args.recorded:
        if not os.path.isfile(path):
            print(f"error: --recorded {path!r} is not a file (record one with bench/record_launches.py)",
                  file=sys.stderr)
            return 2
    try:
        import triton
    except ImportError:
        print("error: triton is not installed (pip install triton)", file=sys.stderr)
        return 2
    sys.path.insert(0, ROOT)
    # a fresh cache: every configuration is really compiled (and timed), not read back
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="diffutron-compile-check-")

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    t0 = time.monotonic()
    try:
        recorded = collect_recorded(args.recorded, kernel_files) if args.recorded else []
    except (ValueError, KeyError, ImportError, AttributeError) as exc:
        print(f"error: --recorded: {exc}", file=sys.stderr)
        return 2
    if args.recorded and not recorded:
        print(f"error: no launch of the kernels {', '.join(kernel_files)} was recorded in "
              f"{', '.join(args.recorded)}", file=sys.stderr)
        return 2
    jobs, seen, drifted, from_recording = [], set(), [], set()
    for cc in targets:
        backend = make_backend(GPUTarget("cuda", cc, 32))
        plans = collect(kernel_files, SMS[cc])
        if cc == targets[0]:
            drifted = drift(plans, recorded)
        # plans first: a recorded launch that compiles to a planned program keeps the plan's label
        for origin, (kernel_file, launch) in [("plan", p) for p in plans] + [("recorded", r) for r in recorded]:
            src, options = _source(launch, backend, ASTSource)  # specialized once: keyed here, compiled by a worker
            key = _key(src, options, cc)
            if key not in seen:
                seen.add(key)
                _PLANS.append((kernel_file, launch, src, options))
                jobs.append((len(_PLANS) - 1, cc, args.compile_timeout))
                if origin == "recorded":
                    from_recording.add(key)
    print(f"[compile-check] triton {triton.__version__}: {len(jobs)} configurations on {len(targets)} targets "
          f"({len(from_recording)} only from {len(recorded)} recorded launches), {args.jobs} at a time",
          file=sys.stderr, flush=True)
    for row in drifted:
        print(f"[compile-check] drift: {row['kernel']} {row['config']}: {row['error']}", file=sys.stderr, flush=True)
    with multiprocessing.get_context("fork").Pool(max(1, args.jobs)) as pool:
        rows = []
        for row in pool.imap_unordered(_compile_one, jobs):
            rows.append(row)
            if row["status"] != "ok":
                print(f"[compile-check] {row['kernel']} {row['target']} {row['config']}: {row['error']}",
                      file=sys.stderr, flush=True)
    rows += drifted
    rows.sort(key=lambda r: (r["file"], r["kernel"], r["config"], r["target"]))
    print(table(rows))
    ok = [r for r in rows if "registers" in r]
    summary = {
        "triton": triton.__version__, "targets": [f"sm_{t}" for t in targets], "kernels": len({r["kernel"] for r in rows}),
        "configs": len(rows), "failures": sum(r["status"] != "ok" for r in rows),
        "spill_bytes": sum(r["stack"] + r["local"] for r in ok), "max_registers": max((r["registers"] for r in ok), default=0),
        "max_shared_bytes": max((r["shared"] for r in ok), default=0),
        "tf32_configs": sum(bool(r.get("tf32")) for r in ok), "recorded_launches": len(recorded),
        "recorded_only_configs": len(from_recording), "drift": len(drifted), "seconds": round(time.monotonic() - t0, 1),
    }
    if args.json_out:
        tmp = args.json_out + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"summary": summary, "rows": rows}, f, indent=1)
        os.replace(tmp, args.json_out)
    print(json.dumps(summary))
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
