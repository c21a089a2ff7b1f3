"""Training configuration: one dataclass, validated on construction, read from YAML with command-line
overrides on top, and presets that follow the Diffutron paper's recipes.

Precedence: preset < YAML file < --set key=value overrides (and the CLI's named flags).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import DiffutronError

TASKS = ("cpt", "sft")
OBJECTIVES = ("mlm", "mdlm")
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
PRECISIONS = ("auto", "float32", "bfloat16")
STRATEGIES = ("ddp", "fsdp")


@dataclass
class TrainConfig:
    task: str = "cpt"
    model: str = "jhu-clsp/mmBERT-base"  # checkpoint to start from (hub id or local directory)
    output_dir: str = "runs/train"
    # data
    train_files: list[str] = field(default_factory=list)  # .txt (a document per line), .jsonl, .parquet
    eval_files: list[str] = field(default_factory=list)
    dataset: str | None = None  # a hub dataset name (needs the `datasets` package and a network)
    dataset_split: str = "train"
    text_field: str = "text"
    max_length: int = 512
    pack: bool = True  # CPT: concatenate documents into full-length rows (else one padded row each)
    # objective
    objective: str = "mlm"  # mlm: fixed masking probability; mdlm: t ~ U[t_min, 1), weight 1/t
    mlm_probability: float = 0.15
    t_min: float = 1e-3
    # LoRA (peft); never the tied decoder
    lora: bool = True
    lora_r: int = 256
    lora_alpha: int = 256
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: ["Wqkv", "Wo", "Wi"])
    # optimization
    optimizer: str = "adamw"
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    batch_size: int = 8  # per process
    grad_accum: int = 1
    max_steps: int | None = None  # optimizer steps; None: epochs decide
    epochs: float = 1.0
    clip_grad: float = 1.0
    precision: str = "auto"  # auto: bfloat16 autocast on CUDA, float32 on CPU
    strategy: str = "ddp"  # under torchrun: ddp (replicas) or fsdp (parameters sharded per layer, FSDP2)
    seed: int = 0
    # checkpoints and logging
    save_every: int = 500
    keep_last: int = 2
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end (when eval_files are given)
    resume: str | None = None  # "latest" or a checkpoint directory

    def __post_init__(self):
        def bad(msg):
            raise DiffutronError(f"invalid training config: {msg}")

        if self.task not in TASKS:
            bad(f"task must be one of {TASKS}, got {self.task!r}")
        if self.objective not in OBJECTIVES:
            bad(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.optimizer not in OPTIMIZERS:
            bad(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.strategy not in STRATEGIES:
            bad(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.strategy == "fsdp" and self.resume:
            bad("resuming an FSDP run is not supported yet: resume with strategy ddp (checkpoints are plain)")
        if self.precision not in PRECISIONS:
            bad(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0 < self.mlm_probability < 1:
            bad(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if not 0 < self.t_min < 1:
            bad(f"t_min must be in (0, 1), got {self.t_min}")
        if self.max_length < 8:
            bad(f"max_length must be >= 8, got {self.max_length}")
        for name in ("batch_size", "grad_accum", "save_every", "keep_last", "log_every", "lora_r"):
            if getattr(self, name) < 1:
                bad(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            bad(f"max_steps must be >= 1, got {self.max_steps}")
        if self.epochs <= 0:
            bad(f"epochs must be > 0, got {self.epochs}")
        if self.lr <= 0 or not 0 <= self.warmup_ratio < 1 or self.clip_grad < 0:
            bad("lr must be > 0, warmup_ratio in [0, 1), clip_grad >= 0")
        if self.lora and not self.lora_targets:
            bad("lora_targets is empty")
        if self.lora and any("decoder" in t for t in self.lora_targets):
            bad("LoRA must not target the decoder: it is tied to the token embeddings")
        if not self.train_files and not self.dataset:
            bad("no training data: give train_files (text/JSONL/parquet) or a hub dataset")
        if isinstance(self.train_files, str):
            self.train_files = [self.train_files]
        if isinstance(self.eval_files, str):
            self.eval_files = [self.eval_files]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The paper's recipes (docs/model.md). Learning rates the paper does not give are marked.
PRESETS: dict[str, dict] = {
    # LoRA r = alpha = 256 on Wqkv/Wo/Wi; masked-LM; Paged AdamW 8-bit; cosine; batch 64 x 2; length 512
    "paper-cpt": dict(task="cpt", model="jhu-clsp/mmBERT-base", objective="mlm", mlm_probability=0.15, lora=True,
                      lora_r=256, lora_alpha=256, optimizer="paged_adamw_8bit", batch_size=64, grad_accum=2,
                      max_length=512, lr=2e-4, epochs=1.0),  # lr: not in the paper
    # SFT stage 1: LlamaTurk-Instruction-Set, 20 epochs, AdamW, lr 1e-4, batch 16, length 256
    "paper-sft-1": dict(task="sft", objective="mdlm", lora=False, optimizer="adamw", lr=1e-4, batch_size=16,
                        max_length=256, epochs=20.0),
    # SFT stage 2: InstrucTurca, 8 epochs, a larger batch (two A100s: 2 x 16)
    "paper-sft-2": dict(task="sft", objective="mdlm", lora=False, optimizer="adamw", lr=1e-4, batch_size=16,
                        grad_accum=2, max_length=256, epochs=8.0),
    # the bundled demo model: a few million parameters trained from scratch on CPU
    # (many small steps: a model this small leaves the unigram plateau after thousands of updates, not
    # after many tokens; t >= 0.05 caps the 1/t weight at 20, whose spikes stall small batches)
    "tiny-tr": dict(task="cpt", objective="mdlm", t_min=0.05, lora=False, optimizer="adamw", lr=2e-3,
                    weight_decay=0.01, batch_size=16, max_length=64, warmup_ratio=0.05, save_every=500),
}


def parse_value(text: str):
    """A --set value: YAML scalars and lists (so 1e-4, true, [a, b] and null mean what they look like)."""
    import yaml

    return yaml.safe_load(text)


def load_config(preset: str | None = None, path: str | None = None, overrides: dict | None = None) -> TrainConfig:
    values: dict = {}
    if preset:
        if preset not in PRESETS:
            raise DiffutronError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    if path:
        import yaml

        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except FileNotFoundError:
            raise DiffutronError(f"config file not found: {path}") from None
        except yaml.YAMLError as exc:
            raise DiffutronError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise DiffutronError(f"config file {path} must hold a mapping of settings")
        values.update(data)
    values.update(overrides or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DiffutronError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return TrainConfig(**values)
    except TypeError as exc:
        raise DiffutronError(f"invalid training config: {exc}") from None
