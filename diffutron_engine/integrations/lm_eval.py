"""lm-evaluation-harness model `diffutron`: Diffutron checkpoints evaluated fast and exactly.

    diffutron-engine eval lm-eval --model_args pretrained=diffutron/DiffutronLM-0.3B-Instruct,mc_num=128 \\
        --tasks ...                       # registers the model, then runs lm-eval's own CLI

    from diffutron_engine.integrations.lm_eval import DiffutronLM   # registers "diffutron" with lm-eval
    lm = DiffutronLM(pretrained=..., mc_num=128, batch_size=32, device="cuda", dtype="bfloat16")
    lm_eval.simple_evaluate(model=lm, tasks=[...])

- `loglikelihood`: the masked-diffusion Monte-Carlo estimate (mc_likelihood.py says how, and when it is
  the same number as dllm's one-request-at-a-time harness: seed_per_request=false, same torch seed and
  request order), with the copies of all requests batched by length up to `token_budget` tokens per
  forward and the LM head only at scored positions. `batch_size` keeps the estimator's meaning: copies per stratified draw.
  `is_check_greedy=True` also runs the harness's greedy check (the masked continuation filled one most
  confident token per step, on the engine, all requests batched); otherwise the flag is False.
- `generate_until`: the engine in exact mode (cache "none"): lm-eval's `until` strings stop and cut the
  answer, `max_gen_toks` replaces `max_new_tokens` (the steps scale with it), greedy unless the task
  samples (`do_sample` with a temperature), requests batched up to `max_batch`.
- `loglikelihood_rolling`: the same estimator over windows: the text's tokens cut into windows of half
  the model's context, window i scored as the continuation of the up to half-context tokens before it
  (none for the first); the sum over windows (an ELBO, like every number here: a lower bound).
- `peft=PATH`: a LoRA adapter folder applied to `pretrained` (loading.load_model's adapter: merged
  in memory, so it scores what its merged checkpoint scores).
- data parallel: under torchrun or accelerate launch (RANK, WORLD_SIZE, LOCAL_RANK) each process scores
  its share of the requests (lm-eval's evaluator splits them by rank and gathers the results on rank 0
  through the rank/world_size/all_gather/gather_object/barrier below, over torch.distributed: gloo on
  CPU, nccl between GPUs, one GPU per LOCAL_RANK).
- noise: by default each request's Monte-Carlo draws come from (seed, its tokens), so its number does
  not depend on the other requests, their order or the number of processes; `seed_per_request=false`
  draws them from torch's generators in request order instead, dllm's harness's numbers
  (mc_likelihood.py, "Noise").
- progress: one tqdm bar per phase (likelihood copies, generation requests, the greedy check) on
  stderr with its ETA, on rank 0; none with disable_tqdm or lm-eval's log level above INFO
  (--verbosity WARNING/ERROR, LMEVAL_LOG_LEVEL).
- chat: `apply_chat_template` renders Diffutron-Instruct's template (loading.render_chat) when lm-eval
  is run with --apply_chat_template.

Unknown model arguments, an mc_num that is not a multiple of batch_size, a request longer than the
context and an empty continuation raise DiffutronError naming the problem.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
import sys

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # an optional extra
    from ..errors import DiffutronError

    raise DiffutronError("lm-evaluation-harness is not installed: pip install 'diffutron-engine[eval]' "
                         f"(or pip install lm_eval) ({exc})") from exc

from ..errors import DiffutronError, StepFailed
from ..loading import DEFAULT_MODEL, DTYPES, load_model, render_chat
from .mc_likelihood import (Scored, check_mc, check_requests, default_token_budget, encode_pair,
                            loglikelihood_batched)

log = logging.getLogger(__name__)

# model arguments and their defaults (dllm's harness defaults for the estimator)
DEFAULTS = dict(
    pretrained=DEFAULT_MODEL, mc_num=128, batch_size=32, device="auto", dtype="auto", is_check_greedy=False,
    max_new_tokens=128, steps=128, block_size=32, temperature=0.0, remasking="low_confidence", seed=0,
    token_budget=None, max_batch=16, max_batch_size=None, trust_remote_code=False, seed_per_request=True,
    peft=None,
)
# accepted and unused: lm-eval passes them to every model (max_batch_size: the engine sizes its own
# forwards; trust_remote_code: Diffutron checkpoints are plain ModernBERT, loaded without remote code)


def _int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DiffutronError(f"model argument {name} must be an integer >= {minimum}, got {value!r}")
    return value


def _bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
        return value.lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise DiffutronError(f"model argument {name} must be true or false, got {value!r}")


def check_names(args) -> None:
    """Refuse model arguments this model does not have, naming the closest one."""
    unknown = sorted(set(args) - set(DEFAULTS))
    if unknown:
        hints = [f"{u!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, DEFAULTS, 1))
                             else "") for u in unknown]
        raise DiffutronError(f"unknown model argument(s) for diffutron: {', '.join(hints)}; known: "
                             f"{', '.join(sorted(DEFAULTS))}")


@register_model("diffutron")
class DiffutronLM(LM):
    def __init__(self, **kwargs):
        super().__init__()
        check_names(kwargs)
        a = {**DEFAULTS, **kwargs}
        if a["batch_size"] in ("auto",) or str(a["batch_size"]).startswith("auto:"):
            a["batch_size"] = DEFAULTS["batch_size"]  # lm-eval's "pick for me": the estimator's default
        self.mc_num, self.batch_size = check_mc(_int("mc_num", a["mc_num"]), _int("batch_size", a["batch_size"]))
        self.is_check_greedy = _bool("is_check_greedy", a["is_check_greedy"])
        self.max_new_tokens = _int("max_new_tokens", a["max_new_tokens"])
        self.steps = _int("steps", a["steps"])
        self.block_size = _int("block_size", a["block_size"])
        self.seed = _int("seed", a["seed"], minimum=0)
        self.seed_per_request = _bool("seed_per_request", a["seed_per_request"])
        self.max_batch = _int("max_batch", a["max_batch"])
        try:
            self.temperature = float(a["temperature"])
        except (TypeError, ValueError):
            raise DiffutronError(f"model argument temperature must be a number >= 0, got {a['temperature']!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise DiffutronError(f"model argument temperature must be a finite number >= 0, got {self.temperature}")
        self.remasking = str(a["remasking"])
        dtype = a["dtype"]
        if not isinstance(dtype, str):  # a torch.dtype, as lm-eval's Python API may pass
            dtype = str(dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise DiffutronError(f"model argument dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        from ..config import SamplingParams

        SamplingParams(max_new_tokens=self.max_new_tokens, steps=self.steps, block_size=self.block_size,
                       temperature=self.temperature, remasking=self.remasking)  # the sampling args, checked early
        self.pretrained = str(a["pretrained"])
        self._rank, self._world_size, local_rank = _launch()
        device = _device_for(str(a["device"]), self._world_size, local_rank)
        self.peft = None if a["peft"] in (None, "") else str(a["peft"])
        # a LoRA adapter on `pretrained`, merged in memory by the loader (its merged checkpoint's numbers)
        lm = load_model(self.pretrained, dtype=dtype, device=device, **({"adapter": self.peft} if self.peft else {}))
        if lm.model.config.model_type != "modernbert":
            raise DiffutronError(f"{self.pretrained!r} is a {lm.model.config.model_type!r} model; the diffutron "
                                 "evaluator runs ModernBERT checkpoints (the Diffutron family)")
        self.model, self.tokenizer, self._device = lm.model, lm.tokenizer, lm.device
        self.max_length = lm.max_context or None
        budget = a["token_budget"]
        self.token_budget = default_token_budget(self._device) if budget is None else _int("token_budget", budget)
        from ..model.modernbert import ModernBert

        self.runner = ModernBert(self.model)
        self._engine = None
        if self._world_size > 1:
            _init_process_group(self._device, self._rank, self._world_size)

    # ------------------------------------------------------------------ construction as lm-eval does it
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "DiffutronLM":
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string or ""), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "DiffutronLM":
        """--model_args win over lm-eval's own --batch_size/--device (whose defaults, 1 and cuda:0, are
        not choices made for this model); max_batch_size has no use here (the engine sizes its forwards)."""
        args = dict(arg_dict)
        for k, v in (additional_config or {}).items():
            if v is not None and k not in args and k in DEFAULTS:
                args[k] = v
        return cls(**args)

    # ------------------------------------------------------------------ lm-eval's interface
    # data parallel: lm-eval's evaluator gives each rank every world_size-th document of each task
    # (rank, world_size), pads the ranks to equal request counts (all_gather), waits between request
    # types (barrier) and collects the logged samples and per-sample metrics on rank 0 (gather_object)
    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def all_gather(self, tensor):
        if self._world_size <= 1:
            return tensor
        import torch
        import torch.distributed as dist

        t = tensor.reshape(-1)
        parts = [torch.empty_like(t) for _ in range(self._world_size)]
        dist.all_gather(parts, t)
        return torch.cat(parts)

    def gather_object(self, obj, dst=0):
        if self._world_size <= 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self._world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    def chat_template(self, chat_template=False) -> str:
        return "diffutron-instruct ([SYS]/[Question]/[Answer] markers)" if chat_template else ""

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        if add_generation_prompt or not chat_history or chat_history[-1].get("role") != "assistant":
            return render_chat(chat_history, add_generation_prompt=add_generation_prompt)
        # continue the final assistant message: its turn stays open
        head = render_chat(chat_history[:-1], add_generation_prompt=True) if len(chat_history) > 1 else "[Answer]\n"
        return head + str(chat_history[-1].get("content", "")).strip()

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        texts = [tuple(r.args) for r in requests]
        pairs = [encode_pair(self.tokenizer, c, x) for c, x in texts]
        check_requests(pairs, self.max_length, texts)
        lls = loglikelihood_batched(self.runner, pairs, self.tokenizer.mask_token_id, self.tokenizer.pad_token_id,
                                    self.mc_num, self.batch_size, self.token_budget,
                                    progress=self._progress(disable_tqdm), seed=self._noise_seed)
        greedy = self._greedy(pairs, disable_tqdm) if self.is_check_greedy else [False] * len(pairs)
        out = list(zip(lls, greedy))
        for r, o in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", tuple(r.args), o)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        if not self.max_length or self.max_length < 2:
            raise DiffutronError("loglikelihood_rolling needs the model's context length (max_position_embeddings)")
        half = self.max_length // 2
        pairs, owner = [], []
        for i, r in enumerate(requests):
            # the text's own tokens: special tokens are no part of a text's likelihood
            ids = list(self.tokenizer(r.args[0], add_special_tokens=False)["input_ids"])
            for lo in range(0, len(ids), half):
                pairs.append(Scored(ids[max(0, lo - half):lo], ids[lo:lo + half]))
                owner.append(i)
        lls = loglikelihood_batched(self.runner, pairs, self.tokenizer.mask_token_id, self.tokenizer.pad_token_id,
                                    self.mc_num, self.batch_size, self.token_budget,
                                    progress=self._progress(disable_tqdm), seed=self._noise_seed)
        totals = [0.0] * len(requests)  # an empty text has nothing to score: 0
        for i, ll in zip(owner, lls):
            totals[i] += ll
        for r, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", tuple(r.args), t)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from ..config import SamplingParams
        from ..errors import PromptError
        from ..inputs import TextPrompt

        prompts, params, ignored, seen = [], [], set(), {}
        for i, r in enumerate(requests):
            context, kwargs = r.args[0], dict(r.args[1] or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else [s for s in until if s]
            n = _int("max_gen_toks", kwargs.pop("max_gen_toks", self.max_new_tokens))
            # lm-eval's convention: greedy unless the task samples; then its temperature (default 1)
            do_sample = _bool("do_sample", kwargs.pop("do_sample", False))
            asked = kwargs.pop("temperature", None)
            try:
                temp = (1.0 if asked is None else float(asked)) if do_sample else self.temperature
            except (TypeError, ValueError):
                raise DiffutronError(f"generation request {i}: temperature must be a number, got {asked!r}") from None
            ignored.update(kwargs)
            steps = max(1, round(self.steps * n / self.max_new_tokens))
            prompts.append(TextPrompt(prompt=context, chat_template=False))  # lm-eval renders its own chat
            params.append(SamplingParams(max_new_tokens=n, steps=steps, block_size=min(self.block_size, n),
                                         temperature=temp, remasking=self.remasking, stop_strings=until or None,
                                         seed=self._generation_seed(r, i, seen)))
        if ignored:
            log.warning("diffutron: generation arguments without a counterpart here were ignored: %s",
                        ", ".join(sorted(ignored)))
        try:
            with _Progress(len(prompts), "diffutron generation (requests)", self._progress(disable_tqdm)) as bar:
                outs = self.engine.generate(prompts, params, on_step=bar.on_step) if prompts else []
        except PromptError as exc:  # the engine checks each prompt (its text, its context) once
            hint = " (here: lower max_gen_toks, or use fewer few-shot examples)" if exc.too_long else ""
            raise DiffutronError(f"generation request {exc.index}: {exc.reason}{hint}") from None
        texts = []
        for r, p, o in zip(requests, params, outs):
            text = o.text
            for stop in p.stop_strings or []:
                text = text.split(stop)[0]
            texts.append(text)
            self.cache_hook.add_partial("generate_until", tuple((r.args[0], r.args[1])), text)
        return texts

    # ------------------------------------------------------------------ helpers
    @property
    def engine(self):
        """The engine for generation and the greedy check, built on first use (exact mode)."""
        if self._engine is None:
            from ..config import EngineConfig
            from ..engine import Engine

            self._engine = Engine(self.model, self.tokenizer, EngineConfig(max_batch=self.max_batch, cache="none"))
        return self._engine

    @property
    def _noise_seed(self) -> int | None:
        """The likelihood noise: per request from (seed, its tokens), or None: torch's stream (dllm's)."""
        return self.seed if self.seed_per_request else None

    def _generation_seed(self, request, index: int, seen: dict) -> int:
        """A generation request's seed. seed_per_request: a hash of (seed, its context, its arguments,
        which repeat of the same request object this is), so a sampled answer does not depend on the
        other requests or the split across processes; else seed + its index in the call."""
        from ..config import seed_for

        if not self.seed_per_request:
            return seed_for(self.seed, index)
        import hashlib
        import json

        repeat = seen[id(request)] = seen.get(id(request), -1) + 1
        text = json.dumps([request.args[0], request.args[1] or {}, repeat], sort_keys=True, default=str,
                          ensure_ascii=False)
        digest = hashlib.blake2b(f"{self.seed}\0{text}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") % 2**63

    def _progress(self, disable_tqdm: bool) -> bool:
        """Whether to show a progress bar: not asked off (disable_tqdm), on rank 0 only, and lm-eval's
        log level (--verbosity / LMEVAL_LOG_LEVEL) at INFO or below."""
        if disable_tqdm or self._rank != 0:
            return False
        level = logging.getLogger("lm_eval").level
        env = os.environ.get("LMEVAL_LOG_LEVEL", "").upper()
        if isinstance(logging.getLevelName(env), int):
            level = max(level, logging.getLevelName(env))
        return level <= logging.INFO

    def _greedy(self, pairs: list[Scored], disable_tqdm: bool = True) -> list[bool]:
        """The harness's greedy check for every pair, on the engine: the continuation masked, one block,
        one token per step (the most confident argmax), compared with the continuation."""
        from ..config import SamplingParams

        mask = self.tokenizer.mask_token_id
        seqs = [p.context + [mask] * len(p.target) for p in pairs]
        # seed given: greedy needs none, and an unseeded request would draw one from torch's generator,
        # shifting the noise of every later likelihood estimate (the harness's check draws nothing)
        params = [SamplingParams(max_new_tokens=len(p.target), steps=len(p.target), block_size=None, seed=0,
                                 temperature=0.0, remasking="low_confidence", early_stop=False) for p in pairs]
        with _Progress(len(seqs), "diffutron greedy check (requests)", self._progress(disable_tqdm)) as bar:
            outs = self.engine.infill(seqs, params, on_step=bar.on_step)
        return [list(o.tokens[len(p.context):]) == p.target for p, o in zip(pairs, outs)]


class _Progress:
    """A tqdm bar over finished engine requests (the engine's on_step), on stderr; nothing when off."""

    def __init__(self, total: int, desc: str, show: bool):
        self.bar = None
        if show and total:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True)

    def on_step(self, outputs) -> None:
        if self.bar is not None:
            done = sum(1 for o in outputs if o.finished)
            if done:
                self.bar.update(done)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------------- data parallel
def _launch() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment (torchrun and accelerate launch
    set RANK, WORLD_SIZE, LOCAL_RANK), or from a process group the caller already started."""
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    except ImportError:  # pragma: no cover - torch without distributed
        pass
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    if world > 1 and not 0 <= rank < world:
        raise DiffutronError(f"RANK={rank} is not below WORLD_SIZE={world}: a broken launcher environment")
    return rank, world, local


def _device_for(device: str, world: int, local_rank: int) -> str:
    """The device of this process: under a launcher with more than one process, a CUDA device (auto on
    a GPU machine, cuda, cuda:N) is cuda:LOCAL_RANK, one GPU per process; CPU stays CPU."""
    if world <= 1:
        return device
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if device not in ("cuda", f"cuda:{local_rank}"):
            log.warning("diffutron: %d processes: process %d runs on cuda:%d, not %s (one GPU per process, "
                        "by LOCAL_RANK)", world, local_rank, local_rank, device)
        return f"cuda:{local_rank}"
    return device


def _init_process_group(device: str, rank: int, world: int) -> None:
    """torch.distributed's process group for lm-eval's gathers: nccl between GPUs, gloo on CPU; started
    here unless the caller did, and ended at exit."""
    import atexit

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise DiffutronError(f"WORLD_SIZE={world} but {var} is not set: start the processes with torchrun "
                                 "(torchrun --nproc_per_node N -m diffutron_engine eval lm-eval ...) or accelerate launch")
    if cuda:
        dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device(device))
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


# ---------------------------------------------------------------------------------------------- CLI
def cli_main(argv: list[str]) -> int:
    """`diffutron-engine eval lm-eval ARGS`: lm-eval's own CLI with the diffutron model registered.
    `--model` defaults to diffutron; for it, lm-eval's --device and --batch_size default to this model's
    (auto, and the batch_size of --model_args or 32) rather than lm-eval's cuda:0 and 1."""
    import lm_eval.__main__ as lm_main

    argv = list(argv)
    command = argv[0] if argv and not argv[0].startswith("-") else "run"
    if command == "run" and not any(a in ("-h", "--help") for a in argv):
        flags = {a.split("=", 1)[0] for a in argv if a.startswith("-")}
        if "--model" not in flags:
            argv += ["--model", "diffutron"]
        if _flag_value(argv, "--model") == "diffutron":
            spec = _flag_value(argv, "--model_args") or ""
            if "-a" not in flags and not spec.lstrip().startswith("{"):  # k=v,...: checked before lm-eval's task
                # indexing (seconds); other spellings are checked when the model is built
                check_names([p.split("=", 1)[0].strip() for p in spec.split(",") if p.strip()])
            if "--device" not in flags:
                argv += ["--device", "auto"]
            if not flags & {"--batch_size", "-b"}:
                argv += ["--batch_size", str(_model_arg(argv, "batch_size") or DEFAULTS["batch_size"])]
    # lm-eval applies --verbosity only after the evaluation; its LMEVAL_LOG_LEVEL is read at the start,
    # so the flag becomes the variable (an explicit variable wins): ERROR also silences the progress bars
    verbosity = _flag_value(argv, "--verbosity") or _flag_value(argv, "-v")
    if verbosity and not os.environ.get("LMEVAL_LOG_LEVEL"):
        os.environ["LMEVAL_LOG_LEVEL"] = verbosity.upper()
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        lm_main.cli_evaluate()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except (DiffutronError, StepFailed):
        raise
    except Exception as exc:
        if _raised_in_this_package(exc):  # a bug of ours: its traceback is what a report needs
            raise
        raise DiffutronError(_lm_eval_failure(argv, exc)) from None
    finally:
        sys.argv = saved
    return 0


def _raised_in_this_package(exc: BaseException) -> bool:
    """Whether a frame of this package (past cli_main's own) is on the exception's traceback."""
    import diffutron_engine

    root = os.path.dirname(os.path.abspath(diffutron_engine.__file__)) + os.sep
    tb = exc.__traceback__.tb_next if exc.__traceback__ else None
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(root):
            return True
        tb = tb.tb_next
    return False


def _lm_eval_failure(argv: list[str], exc: BaseException) -> str:
    """One line for an error lm-eval raised (an unknown task, a task whose documents it cannot build):
    the tasks asked for, the error, and where lm-eval raised it."""
    tasks = _flag_value(argv, "--tasks") or _flag_value(argv, "-t") or "(none given)"
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    where = ""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        file = tb.tb_frame.f_code.co_filename
        where = f" (at {os.path.join(*file.split(os.sep)[-3:])}:{tb.tb_lineno})"
    return (f"lm-eval failed on --tasks {tasks}: {type(exc).__name__}: {(lines or ['no message'])[0][:300]}"
            f"{where}")


def _flag_value(argv: list[str], flag: str) -> str | None:
    """The value of `flag` (as "--flag VALUE" or "--flag=VALUE"), the last one given, or None."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def _model_arg(argv: list[str], key: str) -> str | None:
    """The value of `key` inside --model_args k=v,... (or None)."""
    for part in (_flag_value(argv, "--model_args") or "").split(","):
        k, _, v = part.partition("=")
        if k.strip() == key:
            return v.strip()
    return None
