"""The engine's flags, declared once for every command that builds an engine (generate, serve): what
they mean is EngineConfig's, and --fast reads config.FAST, the one (engine, request) pair, so that
`generate --fast` and `serve --fast` run the same setting."""

from __future__ import annotations

import argparse

from ..config import CACHE_MODES, DEVICES, DTYPES, FAST, EngineConfig, Preset
from ..loading import DEFAULT_MODEL


def add_model_arguments(group) -> None:
    """--model and --adapter on an argparse (group); model_arguments() reads them."""
    group.add_argument("--model", help=f"hub id, local directory or bundled name (default: the one --adapter "
                       f"names, else {DEFAULT_MODEL})")
    group.add_argument("--adapter", metavar="PATH",
                       help="a LoRA adapter folder (`train cpt|sft` writes one) applied to --model, merged in "
                       "memory; without --model, on the base its adapter_config.json names")


def model_arguments(args: argparse.Namespace) -> tuple[str, str | None]:
    """(the base model, the adapter folder or None) of --model/--adapter, checked before any model loads:
    --adapter must be an adapter folder, and name its base when --model is not given. args.model is set
    to the base."""
    from ..errors import DiffutronError
    from ..loading import check_adapter_path

    adapter = getattr(args, "adapter", None)
    if adapter is None:
        args.model = DEFAULT_MODEL if args.model is None else args.model
        return args.model, None
    adapter = check_adapter_path(adapter, "--adapter")
    if args.model is None:
        from ..training.merge import adapter_base

        args.model = adapter_base(adapter)
        if args.model is None:
            raise DiffutronError(f"--adapter {adapter} names no base model (base_model_name_or_path in its "
                                 "adapter_config.json); give --model")
    return args.model, adapter


def add_engine_arguments(group) -> None:
    """--dtype, --device, --cache, --cuda-graphs, --fused-head and --fast on an argparse (group)."""
    group.add_argument("--dtype", default="auto", choices=DTYPES,
                       help="auto: bfloat16 on a GPU that has it, else float16 there; float32 on CPU")
    group.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)} or cuda:N (default: auto)")
    group.add_argument("--cache", choices=CACHE_MODES, help="K/V reuse across the steps of a block (default: none)")
    group.add_argument("--cuda-graphs", action="store_true", default=None,
                       help="replay each step from a CUDA graph (CUDA only; ignored on CPU)")
    group.add_argument("--fused-head", action="store_true", default=None,
                       help="the LM head inside the Triton sampler, logits never stored (where it runs)")
    group.add_argument("--fast", action="store_true",
                       help=f"the best measured fast setting: {FAST.describe()} (the engine's part fixed, the "
                       "request's part every request's default; explicit flags win)")


def preset(args: argparse.Namespace) -> Preset:
    """The preset the flags ask for: FAST with --fast, else none."""
    return FAST if getattr(args, "fast", False) else Preset()


def engine_config(args: argparse.Namespace, max_batch: int) -> EngineConfig:
    """EngineConfig from the flags: defaults < --fast's engine part < explicit flags."""
    base = EngineConfig(max_batch=max_batch, dtype=args.dtype, device=args.device)
    return preset(args).engine_config(base, cache=args.cache, cuda_graphs=args.cuda_graphs,
                                      fused_head=args.fused_head)


def request_defaults(args: argparse.Namespace) -> dict:
    """SamplingParams fields every request starts from: --fast's request part."""
    return dict(preset(args).request)
