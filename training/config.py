"""Training configuration: one dataclass, validated on construction, read from YAML with command-line
overrides on top, and presets that follow the Diffutron paper's recipes.

Precedence: preset < YAML file < --set key=value overrides (and the CLI's named flags); a resumed run
starts from its checkpoint's settings (train_config.json) below all of them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import typing
from dataclasses import dataclass, field

from ..bounded import show
from ..errors import DiffutronError


TASKS = ("cpt", "sft")
OBJECTIVES = ("mlm", "mdlm")
OPTIMIZERS = ("adamw", "paged_adamw_8bit")
PRECISIONS = ("auto", "float32", "bfloat16")
STRATEGIES = ("ddp", "fsdp")
# Bounds far above any real run that keep absurd values (max_steps=1e20) from reaching the loop: a
# billion optimizer steps, and about a million rows per micro-batch, accumulation steps or LoRA rank.
MAX_STEPS = 10**9
MAX_COUNT = 2**20
MAX_CONFIG_BYTES = 2**20  # a YAML file of settings is a few hundred bytes


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
        # Every value is converted to its declared type first, whatever its source (a YAML file, where
        # YAML 1.1 reads 1e-4 as a string; --set; flags; Python), then every range is checked: each bad
        # value is one DiffutronError naming the field, the value and what is allowed.
        for f in dataclasses.fields(self):
            setattr(self, f.name, _convert(f.name, getattr(self, f.name), _FIELD_TYPES[f.name]))

        def bad(msg):
            raise DiffutronError(f"invalid training config: {msg}")

        def need(name, ok, allowed):
            if not ok:
                bad(f"{name} must be {allowed}, got {show(getattr(self, name))}")

        for name, choices in (("task", TASKS), ("objective", OBJECTIVES), ("optimizer", OPTIMIZERS),
                              ("strategy", STRATEGIES), ("precision", PRECISIONS)):
            need(name, getattr(self, name) in choices, f"one of {', '.join(choices)}")
        if self.strategy == "fsdp" and self.resume:
            bad("resuming an FSDP run is not supported yet: resume with strategy ddp (checkpoints are plain)")
        need("mlm_probability", 0 < self.mlm_probability < 1, "in (0, 1), e.g. 0.15")
        need("t_min", 0 < self.t_min < 1, "in (0, 1), e.g. 0.001")
        need("max_length", 8 <= self.max_length <= 1_048_576, "an integer in [8, 1048576] (tokens per row)")
        for name, most in (("batch_size", MAX_COUNT), ("grad_accum", MAX_COUNT), ("lora_r", MAX_COUNT),
                           ("lora_alpha", MAX_COUNT), ("save_every", MAX_STEPS), ("keep_last", MAX_STEPS),
                           ("log_every", MAX_STEPS)):
            need(name, 1 <= getattr(self, name) <= most, f"an integer in [1, {most}]")
        need("eval_every", 0 <= self.eval_every <= MAX_STEPS, f"an integer in [0, {MAX_STEPS}] (0: only at the end)")
        need("seed", 0 <= self.seed < 2**63, "an integer in [0, 2**63)")
        need("max_steps", self.max_steps is None or 1 <= self.max_steps <= MAX_STEPS,
             f"an integer in [1, {MAX_STEPS}] (or null: epochs decide)")
        need("epochs", 0 < self.epochs <= 1e6, "a number in (0, 1e6]")
        need("lr", self.lr > 0, "a number > 0, e.g. 2e-4")
        need("weight_decay", self.weight_decay >= 0, "a number >= 0, e.g. 0.01")
        need("warmup_ratio", 0 <= self.warmup_ratio < 1, "a number in [0, 1), e.g. 0.05")
        need("clip_grad", self.clip_grad >= 0, "a number >= 0 (0: no clipping)")
        need("lora_dropout", 0 <= self.lora_dropout < 1, "a number in [0, 1)")
        for name in ("model", "output_dir", "text_field", "dataset_split"):
            need(name, bool(getattr(self, name).strip()), "a non-empty string")
        if self.lora and not self.lora_targets:
            bad("lora_targets is empty: name the modules to adapt, e.g. Wqkv,Wo,Wi")
        if self.lora and any("decoder" in t for t in self.lora_targets):
            bad("LoRA must not target the decoder: it is tied to the token embeddings")
        if not self.train_files and not self.dataset:
            bad("no training data: give train_files (text/JSONL/parquet) or a hub dataset")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------ conversion
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _field_types() -> dict:
    import typing

    return typing.get_type_hints(TrainConfig)


def _number(name: str, value, kind: type):
    """An int or a float from any YAML/Python spelling: 3, 3.0, "3", "1e-4", "1_000", 1e3 (an int field
    takes a float only when it is integral: 2.5 steps is an error, 1e3 is 1000)."""
    what = "an integer" if kind is int else "a number"

    def bad(detail=""):
        return DiffutronError(f"invalid training config: {name} must be {what}{detail}, got {show(value)}")

    v = value
    if isinstance(v, bool):
        raise bad()
    if isinstance(v, str):
        text = v.strip().replace("_", "")
        try:  # (ValueError too for more digits than Python converts: 4,300 by default)
            v = int(text) if kind is int and text.lstrip("+-").isdigit() else float(text)
        except ValueError:
            raise bad() from None
    if kind is float and isinstance(v, int):
        try:  # a Python int beyond float's range (10**400) is not a finite number either
            v = float(v)
        except OverflowError:
            raise bad(" (finite)") from None
    if not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise bad(" (finite)")
    if kind is int:
        if isinstance(v, float) and not v.is_integer():
            raise bad()
        return int(v)
    return float(v)


def _convert(name: str, value, typ):
    """value converted to the declared type `typ` (int, float, bool, str, list[str], or X | None)."""
    args = typing.get_args(typ)
    if type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
            return None
        typ = next(a for a in args if a is not type(None))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise DiffutronError(f"invalid training config: {name} must be true or false, got {show(value)}")
    if typ in (int, float):
        return _number(name, value, typ)
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # a path or name spelled as a number
            return str(value)
        raise DiffutronError(f"invalid training config: {name} must be a string, got {show(value)}")
    if typing.get_origin(typ) is list:
        if isinstance(value, str):  # a comma-separated list: "Wqkv,Wo" or a single "Wqkv"
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list) or not all(
                isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
            raise DiffutronError(f"invalid training config: {name} must be a list of strings (or one comma-"
                                 f"separated string), got {show(value)}")
        return [str(v) for v in value]
    raise AssertionError(f"no converter for {name}: {typ}")  # a new field type: add it here


_FIELD_TYPES = _field_types()


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

    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise DiffutronError(f"{show(text)} is nested too deeply to read") from None
    except (yaml.YAMLError, ValueError, TypeError) as exc:  # YAML's own, and its constructors' (2020-99-99)
        raise DiffutronError(f"{show(text)} is not a valid value ({first_line(exc)}); quote strings, write "
                             "lists as [a, b] or a,b") from None


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name when it has none."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if lines and "int_max_str_digits" in lines[0]:  # Python's own advice is for programmers, not this file
        return f"a number longer than {sys.get_int_max_str_digits():,} digits"
    return lines[0][:200] if lines else type(exc).__name__


def load_config(preset: str | None = None, path: str | None = None, overrides: dict | None = None) -> TrainConfig:
    """preset < YAML file < overrides (flags and --set)."""
    return TrainConfig(**gather(preset, path, overrides))


def gather(preset: str | None = None, path: str | None = None, overrides: dict | None = None) -> dict:
    """The layered settings, names checked, values not yet converted (load_config converts them)."""
    values: dict = {}
    if preset:
        if preset not in PRESETS:
            raise DiffutronError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    if path:
        values.update(read_config_file(path))
    values.update(overrides or {})
    known = [f.name for f in dataclasses.fields(TrainConfig)]
    bad_keys = [k for k in values if not isinstance(k, str)]
    if bad_keys:
        raise DiffutronError(f"setting names must be strings, got {show(bad_keys[0])}")
    unknown = sorted(set(values) - set(known))
    if unknown:
        hints = [k + (f" (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else "")
                 for k in unknown]
        raise DiffutronError(f"unknown setting(s): {', '.join(hints)}; known: {', '.join(sorted(known))}")
    return values


def read_config_file(path: str) -> dict:
    """The settings of a YAML file: a mapping, or one DiffutronError saying why not."""
    import yaml

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)  # bounded: --config /dev/zero must not read forever
    except FileNotFoundError:
        raise DiffutronError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise DiffutronError(f"config file {path} is a folder; give a YAML file") from None
    except OSError as exc:
        raise DiffutronError(f"cannot read config file {path}: {exc.strerror or first_line(exc)}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise DiffutronError(f"config file {path} is larger than {MAX_CONFIG_BYTES // 2**20} MiB; give a YAML file "
                             "of settings")
    try:
        data = yaml.safe_load(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DiffutronError(f"config file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset "
                             f"{exc.start}); give a UTF-8 YAML file") from None
    except RecursionError:
        raise DiffutronError(f"config file {path} is nested too deeply to read") from None
    except (yaml.YAMLError, ValueError, TypeError) as exc:  # YAML's own, and its constructors' (2020-99-99)
        raise DiffutronError(f"config file {path} is not valid YAML: {first_line(exc)}") from None
    if data is None:  # an empty file: no settings
        return {}
    if not isinstance(data, dict):
        raise DiffutronError(f"config file {path} must hold a mapping of settings, not a {type(data).__name__}")
    return data
