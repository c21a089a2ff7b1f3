"""`diffutron-engine generate`: prompts in (arguments, stdin lines or JSONL), answers out (text or JSON).

ModernBERT checkpoints run on the engine (exact mode unless a fast knob is given); `--reference`, or a
masked LM of another architecture, runs the oracle.

Everything that can be checked before the model runs is checked first (config, input file, output
path, context length of every prompt), so a bad request fails fast with exit code 2 and no output.
The output file is written to a temporary file beside it and renamed only when the run succeeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

from ..config import (CACHE_MODES, DIFFUTRON_STOP_STRINGS, FAST_PRESET, PRESETS, REMASKING, SamplerConfig, SamplingParams,
                      check_backend_env)
from ..errors import DiffutronError, check_utf8
from ..loading import DEFAULT_MODEL, DEVICES, DTYPES, render_chat, resolve_model_path
from .main import write_stdout


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate answers for prompts",
        description="Generate answers (the engine, exact by default; --reference runs the oracle). Prompts "
        "come from the arguments, "
        "from --input FILE.jsonl ({\"prompt\": ...} or {\"messages\": [...]} per line), or, when neither "
        "is given, one per non-empty line of standard input.",
    )
    p.add_argument("prompts", nargs="*", help="prompt texts (each is one user turn unless --no-chat)")
    p.add_argument("--input", metavar="FILE.jsonl", help="read prompts from a JSONL file")
    p.add_argument("--output", metavar="FILE", help="write the results here (only if the whole run succeeds)")
    p.add_argument("--json", action="store_true", help="one JSON object per prompt instead of plain text")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"hub id or local directory (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="auto", choices=DTYPES)
    p.add_argument("--device", default="auto", help=f"one of {', '.join(DEVICES)} (default: auto)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a published Diffutron setting; flags override it")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--steps", type=int, help="total denoising steps, shared by the blocks")
    p.add_argument("--block-size", "--block-length", dest="block_size", type=int)
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--remasking", help=f"one of: {', '.join(REMASKING)}")
    p.add_argument("--stochastic-transfer", action="store_true", default=None)
    p.add_argument("--cfg-scale", type=float)
    p.add_argument("--repetition-penalty", type=float, help="1.0 = off")
    p.add_argument("--stop", action="append", metavar="STRING", help="stop string (repeatable)")
    p.add_argument("--diffutron-stops", action="store_true",
                   help=f"add Diffutron's own stop strings: {' '.join(DIFFUTRON_STOP_STRINGS)}")
    p.add_argument("--seed", type=_seed, help="seed of torch's generator, 0 .. 2**63-1 (default: random)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts sampled together (default: 1)")
    p.add_argument("--no-chat", action="store_true", help="use the prompt text as is, without the chat template")
    eng = p.add_argument_group("engine (fast modes change outputs; exact mode is the default)")
    eng.add_argument("--fast", action="store_true",
                     help=f"the best measured fast setting: {', '.join(f'{k}={v}' for k, v in FAST_PRESET.items())}")
    eng.add_argument("--cache", choices=CACHE_MODES, help="K/V reuse across the steps of a block (default: none)")
    eng.add_argument("--threshold", type=float, help="commit every position with confidence >= this (0, 1]")
    eng.add_argument("--factor", type=float, help="factor rule for parallel commits (> 0)")
    eng.add_argument("--no-early-stop", action="store_true", help="keep stepping rows whose answer has ended")
    eng.add_argument("--stream", action="store_true", help="print text as blocks complete")
    eng.add_argument("--reference", action="store_true", help="run the slow exact oracle instead of the engine")
    p.set_defaults(func=run)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed {text!r}: give an integer") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"seed {value} is out of range: use 0 .. 2**63-1")
    return value


@dataclass
class Prompt:
    source: object  # what the user gave: a string or a list of messages
    where: str  # for error messages: "prompt 2" or "FILE:LINE"
    ids: list[int] | None = None


def settings(args) -> tuple[SamplingParams, str]:
    """(SamplingParams, the engine's cache mode): defaults < --preset < --fast < explicit flags."""
    fields = dict(PRESETS[args.preset]) if args.preset else {}
    if getattr(args, "fast", False):
        fields.update(FAST_PRESET)
    flags = dict(
        max_new_tokens=args.max_new_tokens, steps=args.steps, block_size=args.block_size,
        temperature=args.temperature, remasking=args.remasking, stochastic_transfer=args.stochastic_transfer,
        cfg_scale=args.cfg_scale, repetition_penalty=args.repetition_penalty,
        stop_strings=(args.stop or []) + (list(DIFFUTRON_STOP_STRINGS) if args.diffutron_stops else []) or None,
        cache=getattr(args, "cache", None), threshold=getattr(args, "threshold", None),
        factor=getattr(args, "factor", None),
    )
    if getattr(args, "threshold", None) is not None or getattr(args, "factor", None) is not None:
        fields.pop("threshold", None)  # an explicit rule replaces the preset's
        fields.pop("factor", None)
    for i, stop in enumerate(args.stop or []):
        check_utf8(stop, f"--stop {i + 1}", from_os=True)
    fields.update({k: v for k, v in flags.items() if v is not None})
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise DiffutronError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.block_size is not None and args.block_size < 1:
        raise DiffutronError(f"--block-size must be >= 1, got {args.block_size}")
    fields["early_stop"] = not getattr(args, "no_early_stop", False)
    cache = fields.pop("cache", "none")
    if cache not in CACHE_MODES:
        raise DiffutronError(f"unknown cache {cache!r}; choose one of: {', '.join(CACHE_MODES)}")
    return SamplingParams(**fields), cache


def read_prompts(args, stdin=None) -> list[Prompt]:
    prompts = [Prompt(p, f"prompt {i + 1}") for i, p in enumerate(args.prompts)]
    if args.input is not None:
        prompts += _read_jsonl(args.input)
    if not prompts:
        stdin = stdin if stdin is not None else sys.stdin
        if stdin is None or stdin.isatty():
            raise DiffutronError("no prompt given: pass prompts as arguments, with --input FILE.jsonl, or on stdin")
        prompts = [Prompt(line, f"stdin line {n}") for n, line in _lines(stdin, "standard input") if line.strip()]
        if not prompts:
            raise DiffutronError("empty prompt: standard input holds no text")
    for p in prompts:
        if isinstance(p.source, str):
            check_utf8(p.source, p.where, from_os=p.where.startswith("prompt"))  # an argument's bytes
            if not p.source.strip():
                raise DiffutronError(f"empty prompt ({p.where}): give some text to answer")
    return prompts


def _lines(stream, name: str):
    """(line number, text without its line break) of a stream, decoded as UTF-8 line by line from its
    bytes when it has them, so that a line that is not UTF-8 is named instead of failing the whole read
    (or reaching the tokenizer as surrogates, as Python's C-locale stdin would pass it)."""
    for n, line in enumerate(getattr(stream, "buffer", stream), start=1):
        if isinstance(line, str):  # a text stream without bytes underneath (io.StringIO)
            yield n, line.rstrip("\n")
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DiffutronError(
                f"{name} line {n} is not UTF-8 text (byte 0x{line[exc.start]:02x} at offset {exc.start}); "
                "convert it to UTF-8 (e.g. iconv -f LATIN5 -t UTF-8)") from None
        yield n, text.removesuffix("\n").removesuffix("\r")


def _read_jsonl(path: str) -> list[Prompt]:
    try:
        with open(path, "rb") as f:
            lines = list(_lines(f, f"--input {path!r}"))
    except OSError as exc:
        raise DiffutronError(f"cannot read --input {path!r}: {exc.strerror or exc}") from exc
    out = []
    for n, line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DiffutronError(f"{path}:{n}: malformed JSON ({exc.msg})") from exc
        except RecursionError:  # the parser recurses once per level of nesting
            raise DiffutronError(f"{path}:{n}: JSON nested too deeply to read; expected an object with either "
                                 '"prompt" or "messages"') from None
        if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
            raise DiffutronError(f'{path}:{n}: expected an object with either "prompt" or "messages"')
        where = f"{path}:{n}"
        if "prompt" in obj:
            if not isinstance(obj["prompt"], str):
                raise DiffutronError(f'{where}: "prompt" must be a string')
            check_utf8(obj["prompt"], f'{where}: "prompt"')  # JSON can spell a lone surrogate ("\\ud800")
            out.append(Prompt(obj["prompt"], where))
        else:
            msgs = obj["messages"]
            try:  # validate the whole conversation now, before any model is loaded
                render_chat(msgs)
                if not any(m["role"] == "user" and m["content"].strip() for m in msgs):
                    raise DiffutronError("empty prompt: no user message with content")
            except DiffutronError as exc:
                raise DiffutronError(f"{where}: {exc}") from None
            out.append(Prompt(msgs, where))
    if not out:
        raise DiffutronError(f"--input {path!r} holds no prompts")
    return out


def _output_target(path: str) -> str:
    """The file --output writes: the path itself, or where its symbolic link(s) lead (the answers are
    written through a link, as a shell's `>` does, never replacing the link)."""
    if not path:
        raise DiffutronError("--output is empty: give a file name, or leave --output out to print the answers")
    target = os.path.realpath(path)
    if os.path.islink(target):  # realpath stops at a link it cannot follow
        raise DiffutronError(f"cannot write --output {path!r}: its symbolic links form a loop")
    return target


def _check_output_path(path: str | None) -> None:
    """Fail before any work if the output cannot be written (a temporary file is made and removed)."""
    if path is None:
        return
    target = _output_target(path)
    parent = os.path.dirname(target)
    if os.path.isdir(target):
        raise DiffutronError(f"--output {path!r} is a folder; give a file name")
    if not os.path.isdir(parent):
        raise DiffutronError(f"cannot write --output {path!r}: {parent!r} is not an existing folder")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".diffutron-", suffix=".tmp", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise DiffutronError(f"cannot write --output {path!r}: {exc.strerror or exc}") from None


class _Progress:
    """Progress (steps or tokens done / total) and tokens/s on stderr, redrawn in place; only when
    stderr is a terminal."""

    def __init__(self, n_batches: int, unit: str = "step"):
        self.enabled = sys.stderr.isatty()
        self.unit = unit
        self.n_batches, self.batch, self.t0, self.tokens = n_batches, 0, time.perf_counter(), 0

    def start_batch(self, i: int) -> None:
        self.batch = i

    def __call__(self, done: int, total: int, committed: int) -> None:
        self.tokens += committed
        if not self.enabled:
            return
        rate = self.tokens / max(time.perf_counter() - self.t0, 1e-9)
        sys.stderr.write(
            f"\rbatch {self.batch + 1}/{self.n_batches}  {self.unit} {done}/{total}  {rate:7.1f} tok/s "
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:  # erase the progress line: the terminal keeps only the answers
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def run(args) -> int:
    if args.batch_size < 1:
        raise DiffutronError(f"--batch-size must be >= 1, got {args.batch_size}")
    params, cache = settings(args)
    prompts = read_prompts(args)
    _check_output_path(args.output)
    # a missing model folder or a DIFFUTRON_BACKEND that names no backend fail before torch is imported
    model = resolve_model_path(args.model)
    check_backend_env()

    from ..loading import encode_prompt, load_model

    lm = load_model(model, dtype=args.dtype, device=args.device)
    for p in prompts:
        p.ids = encode_prompt(lm.tokenizer, p.source, chat=not args.no_chat)
    longest = max(len(p.ids) for p in prompts)
    total = longest + params.max_new_tokens
    if lm.max_context and total > lm.max_context:
        raise DiffutronError(
            f"prompt ({longest} tokens) plus --max-new-tokens ({params.max_new_tokens}) is {total} tokens, "
            f"beyond the model's context of {lm.max_context}; shorten the prompt or lower --max-new-tokens"
        )

    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    params = params.override(seed=seed)
    use_reference = args.reference or lm.model.config.model_type != "modernbert"
    if use_reference and (cache != "none" or params.rule != "schedule"):
        raise DiffutronError("--cache/--threshold/--factor/--fast need the engine (a ModernBERT model, no --reference)")
    if use_reference and args.stream:
        raise DiffutronError("--stream needs the engine (a ModernBERT model, no --reference)")
    results = _run_reference(lm, prompts, params, args) if use_reference else _run_engine(lm, prompts, params, cache, args)

    if args.stream and args.output is None:
        return 0  # the answers went out as they were generated
    if args.json:
        rendered = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    else:
        rendered = "\n".join(r["text"] + "\n" for r in results)
    if args.output is not None:
        try:
            _write_atomically(_output_target(args.output), rendered)
        except OSError as exc:
            raise DiffutronError(f"cannot write --output {args.output!r}: {exc.strerror or exc}") from None
    else:
        write_stdout(rendered)
    return 0


def _run_reference(lm, prompts, params: SamplingParams, args) -> list[dict]:
    """The oracle, batch by batch; the seed goes to torch's global generator as dllm expects."""
    import torch

    from ..loading import decode_answer
    from ..reference import ReferenceSampler

    torch.manual_seed(params.seed)
    oracle_cfg = SamplerConfig(return_dict=True, **{f: getattr(params, f) for f in SamplerConfig.__dataclass_fields__
                                                    if hasattr(params, f)})
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    progress = _Progress(len(batches))
    sampler = ReferenceSampler(model=lm.model, tokenizer=lm.tokenizer, on_step=progress)
    results = []
    try:
        for bi, batch in enumerate(batches):
            progress.start_batch(bi)
            t0 = time.perf_counter()
            out = sampler.sample([p.ids for p in batch], oracle_cfg)
            seconds = time.perf_counter() - t0
            for i, p in enumerate(batch):
                text, n_new = decode_answer(lm.tokenizer, out.sequences[i].tolist(), len(p.ids))
                results.append(dict(prompt=p.source, text=text, new_tokens=n_new,
                                    forward_passes=out.forward_passes, seconds=round(seconds, 4), seed=params.seed))
    finally:
        progress.close()
    return results


def _run_engine(lm, prompts, params: SamplingParams, cache: str, args) -> list[dict]:
    """The engine: continuous batching over --batch-size rows; request i draws from seed + i. With
    --stream, text is printed as it settles: plain deltas for one prompt; with several, JSON events
    (--json) or "[i] text" lines."""
    from ..engine import Engine

    engine = Engine(lm.model, lm.tokenizer, max_batch=args.batch_size, cache=cache)
    ids = [engine.add_request(p.ids, params.override(seed=(params.seed + i) % 2**63), index=i)
           for i, p in enumerate(prompts)]
    finals: dict[str, object] = {}
    progress = _Progress(1, unit="tokens")
    total = len(prompts) * params.max_new_tokens
    done = 0
    try:
        while engine.has_unfinished():
            committed = 0
            for out in engine.step():
                committed += out.committed
                if args.stream:
                    _print_event(out, args.json, len(prompts))
                if out.finished:
                    finals[out.request_id] = out
            done += committed
            if not args.stream:
                progress(done, total, committed)
    finally:
        progress.close()
    results = []
    for p, rid in zip(prompts, ids):
        r = finals[rid]
        results.append(dict(prompt=p.source, text=r.text, new_tokens=r.new_tokens, forward_passes=r.forward_passes,
                            seconds=round(r.seconds, 4), seed=r.seed))
    return results


def _print_event(out, as_json: bool, n_prompts: int) -> None:
    if not (out.delta or out.finished):
        return
    if as_json:
        write_stdout(json.dumps({"index": out.index, "text": out.delta, "finished": out.finished},
                                ensure_ascii=False) + "\n")
    elif n_prompts == 1:
        write_stdout(out.delta + ("\n" if out.finished else ""))
    else:
        write_stdout(f"[{out.index}] {out.delta}" + (" <end>" if out.finished else "") + "\n")


def _write_atomically(path: str, text: str) -> None:
    """Write `path` (a resolved target, no link) whole or not at all: a temporary file in its folder,
    renamed onto it. An existing file keeps its permissions; a new one gets the usual (0666 & ~umask)."""
    parent = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".diffutron-", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        try:
            mode = os.stat(path).st_mode & 0o7777
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
