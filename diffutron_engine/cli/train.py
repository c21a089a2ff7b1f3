"""`diffutron-engine train cpt|sft|merge`: continual pre-training and SFT (diffutron_engine.training), and
folding a LoRA adapter into a plain checkpoint. Settings: --preset, then --config YAML, then the named
flags and --set key=value (YAML values). Run under `torchrun --nproc_per_node N` to scale out (DDP, or
`--strategy fsdp` to shard the parameters per layer)."""

from __future__ import annotations

import json
import sys

from ..errors import DiffutronError

# named flags -> config fields (None: not given, the config decides)
_FLAGS = [
    ("--model", "model", str), ("--output-dir", "output_dir", str), ("--max-steps", "max_steps", int),
    ("--epochs", "epochs", float), ("--batch-size", "batch_size", int), ("--grad-accum", "grad_accum", int),
    ("--lr", "lr", float), ("--max-length", "max_length", int), ("--objective", "objective", str),
    ("--optimizer", "optimizer", str), ("--seed", "seed", int), ("--lora-r", "lora_r", int),
    ("--lora-alpha", "lora_alpha", int), ("--save-every", "save_every", int), ("--keep-last", "keep_last", int),
    ("--log-every", "log_every", int), ("--precision", "precision", str), ("--resume", "resume", str),
    ("--strategy", "strategy", str),
]


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="continual pre-training / SFT (LoRA or full), and LoRA merging")
    tsub = p.add_subparsers(dest="train_command", metavar="TASK", parser_class=type(p))
    tsub.required = True
    for task, what in (("cpt", "continual pre-training on text (masked-LM or masked-diffusion loss)"),
                       ("sft", "instruction tuning on (instruction, input, output) rows or chat messages")):
        t = tsub.add_parser(task, help=what)
        t.add_argument("--config", help="YAML file of settings (see diffutron_engine/training/config.py)")
        t.add_argument("--preset", help="paper-cpt, paper-sft-1, paper-sft-2 or tiny-tr")
        t.add_argument("--data", nargs="+", dest="train_files", help="training files (.txt, .jsonl, .json, .parquet)")
        t.add_argument("--eval-data", nargs="+", dest="eval_files", help="held-out text for perplexity")
        t.add_argument("--dataset", help="a hub dataset name (online)")
        for flag, _, typ in _FLAGS:
            t.add_argument(flag, type=typ, default=None)
        t.add_argument("--lora", dest="lora", action="store_true", default=None, help="train LoRA adapters")
        t.add_argument("--no-lora", dest="lora", action="store_false", help="train all weights")
        t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config field")
        t.set_defaults(func=run, task=task)
    m = tsub.add_parser("merge", help="fold a LoRA adapter into a plain checkpoint the engine loads")
    m.add_argument("--adapter", required=True, help="adapter directory (a checkpoint or final/ of a LoRA run)")
    m.add_argument("--out", required=True, help="output directory (written atomically; an existing one only when "
                   "empty or an earlier merge's output)")
    m.add_argument("--base", help="base model: hub id, local folder or bundled name (default: the adapter's "
                   "base_model_name_or_path)")
    m.add_argument("--force", action="store_true", help="replace an existing --out that is not an earlier merge's "
                   "output (never one holding the adapter or the base)")
    m.set_defaults(func=run_merge)


def _overrides(args) -> dict:
    from ..training.config import parse_value

    out = {"task": args.task}
    for name in ("train_files", "eval_files", "dataset", "lora"):
        if getattr(args, name) is not None:
            out[name] = getattr(args, name)
    for _, field, _ in _FLAGS:
        if getattr(args, field) is not None:
            out[field] = getattr(args, field)
    for item in args.set:
        if "=" not in item:
            raise DiffutronError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        if not key.strip():
            raise DiffutronError(f"--set expects KEY=VALUE with a setting name before '=', got {item!r}")
        try:
            out[key.strip().replace("-", "_")] = parse_value(value)
        except DiffutronError as exc:
            raise DiffutronError(f"--set {key.strip()}: {exc}") from None
    return out


def _quiet_libraries() -> None:
    """Library deprecation notices and progress bars are not the user's business: stderr carries our
    progress lines and, on bad input, one error line."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def run(args) -> int:
    from ..training.config import TrainConfig, gather

    given = gather(args.preset, args.config, _overrides(args))
    if given.get("resume"):  # a resumed run keeps its checkpoint's settings unless they are given again
        from ..training.checkpoints import saved_config

        saved = saved_config(str(given.get("output_dir", TrainConfig.output_dir)), str(given["resume"])) or {}
        known = {f for f in TrainConfig.__dataclass_fields__} - {"resume", "output_dir"}
        given = {**{k: v for k, v in saved.items() if k in known}, **given}
    cfg = TrainConfig(**given)  # converted and checked before torch is imported: bad settings fail fast
    _quiet_libraries()
    from ..training.trainer import Trainer

    result = Trainer(cfg, log=lambda s: print(s, file=sys.stderr)).train()
    print(json.dumps(result))
    return 0


def run_merge(args) -> int:
    _quiet_libraries()
    from ..training.merge import merge_lora

    out = merge_lora(args.adapter, args.out, args.base, force=args.force)
    print(json.dumps({"merged": out}))
    return 0
