"""Figures for the training path's guarantees, on a tiny random ModernBERT (seconds on a CPU):
  - resume: a run stopped after 3 of 6 steps and resumed gives the loss curve of an uninterrupted run;
  - scale-out: `torchrun --nproc_per_node 2` (gloo) with batch 4 gives the curve of 1 process, batch 8.
Prints both curves side by side; the last line is one JSON document.

    .venv/bin/python bench/training_checks.py [--data training/data/tr/heldout.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def losses(out: str) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f if '"loss"' in line]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.path.join(ROOT, "training", "data", "tr", "heldout.txt"))
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    from diffutron_engine.models.random_weights import build_random_checkpoint
    from diffutron_engine.training.config import TrainConfig
    from diffutron_engine.training.trainer import Trainer

    tmp = tempfile.mkdtemp(prefix="diffutron-training-checks-")
    model = build_random_checkpoint(os.path.join(tmp, "model"), size="tiny", seed=0)
    base = dict(model=model, train_files=[args.data], max_length=32, batch_size=4, max_steps=6, lr=1e-3, lora_r=4,
                lora_alpha=8, save_every=2, log_every=1, objective="mdlm", seed=3)
    quiet = lambda s: None  # noqa: E731
    Trainer(TrainConfig(output_dir=os.path.join(tmp, "full"), **base), log=quiet).train()
    Trainer(TrainConfig(output_dir=os.path.join(tmp, "cut"), **base), log=quiet).train(stop_after=3)
    Trainer(TrainConfig(output_dir=os.path.join(tmp, "cut"), resume="latest", **base), log=quiet).train()
    full, resumed = losses(os.path.join(tmp, "full")), losses(os.path.join(tmp, "cut"))

    common = ["-m", "diffutron_engine.cli.main", "train", "cpt", "--model", model, "--data", args.data,
              "--max-length", "32", "--max-steps", "6", "--lr", "1e-3", "--lora-r", "4", "--lora-alpha", "8",
              "--log-every", "1", "--save-every", "100", "--objective", "mdlm", "--seed", "5"]
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for cmd in ([sys.executable, *common, "--batch-size", "8", "--output-dir", os.path.join(tmp, "one")],
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
                 *common, "--batch-size", "4", "--output-dir", os.path.join(tmp, "two")]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
    one, two = losses(os.path.join(tmp, "one")), losses(os.path.join(tmp, "two"))

    print(f"{'step':>4} {'uninterrupted':>14} {'stop@3+resume':>14}   {'1 proc b8':>10} {'2 procs b4':>10}")
    for i in range(6):
        print(f"{i + 1:>4} {full[i]:14.6f} {resumed[i]:14.6f}   {one[i]:10.6f} {two[i]:10.6f}")
    report = {"uninterrupted": full, "resumed": resumed, "one_process": one, "two_processes": two,
              "resume_max_abs_diff": max(abs(a - b) for a, b in zip(full, resumed)),
              "ddp_max_rel_diff": max(abs(a - b) / abs(a) for a, b in zip(one, two))}
    print(f"resume: max |diff| = {report['resume_max_abs_diff']:.2e}; 2 processes: max relative diff = "
          f"{report['ddp_max_rel_diff']:.2e}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
