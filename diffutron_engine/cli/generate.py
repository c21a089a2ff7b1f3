"""`diffutron-engine generate`: prompts in (arguments, stdin lines or JSONL), answers out (text or JSON).

ModernBERT checkpoints run on the engine (exact mode unless a fast knob is given); `--reference`, or a
masked LM of another architecture, runs the oracle.

Everything that can be checked before the model runs is checked first (config, output path, input
file, context length of every prompt), so a bad request fails fast with exit code 2 and no output.
The output is written only when the run succeeds, by diffutron_engine.outputs' rule: a regular file
through a temporary file renamed onto it, a device, FIFO or hard-linked file in place; a read-only file
or one of the inputs is refused before any work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass

from ..bounded import read_lines
from ..config import (DIFFUTRON_STOP_STRINGS, PRESETS, REMASKING, EngineConfig, ReferenceParams, SamplingParams,
                      check_backend_env, with_defaults)
from ..errors import ContextTooLong, DiffutronError, PromptError, check_utf8
from ..inputs import ChatPrompt, TextPrompt
from ..jsonio import parse_json
from ..loading import render_chat, resolve_model_path
from ..outputs import check_file_output, write_file
from .engine_args import add_engine_arguments, add_model_arguments, engine_config, model_arguments, request_defaults
from .stdout import write_stdout

# Rows sampled together. The engine allocates each row's state up front (three vocabulary-wide bitmaps:
# 96 KB a row at mmBERT's 256,000 tokens), so --batch-size 10**12 asked for 96 TB; the bound keeps that
# state within 400 MB (and the engine gets no more rows than there are prompts).
MAX_BATCH_SIZE = 4096
# Prompts (--input, standard input) are read a line at a time with these bounds: `--input /dev/zero` (one
# endless line) or `yes |` (endless lines) is refused with one line instead of filling memory. The bounds
# are generous: a prompt of a few hundred KB is already beyond any Diffutron or mmBERT context (8,192
# tokens), and a million prompts are days of generation.
MAX_LINE_BYTES = 64 * 2**20
MAX_INPUT_BYTES = 2**30
MAX_INPUT_LINES = 1_000_000


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
    add_model_arguments(p)
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
    p.add_argument("--batch-size", type=int, default=1,
                   help=f"prompts sampled together, 1 .. {MAX_BATCH_SIZE:,} (default: 1)")
    p.add_argument("--no-chat", action="store_true", help="use the prompt text as is, without the chat template")
    eng = p.add_argument_group("engine (fast modes change outputs; exact mode is the default)")
    add_engine_arguments(eng)
    eng.add_argument("--threshold", type=float, help="commit every position with confidence >= this (0, 1]")
    eng.add_argument("--factor", type=float, help="factor rule for parallel commits (> 0)")
    eng.add_argument("--no-early-stop", action="store_true", help="keep stepping rows whose answer has ended")
    eng.add_argument("--stream", action="store_true", help="print text as blocks complete")
    eng.add_argument("--reference", action="store_true", help="run the slow exact oracle instead of the engine")
    eng.add_argument("--visual", action="store_true",
                     help="draw the denoising in the terminal, step by step, then print the answers as usual "
                     "(plain output when standard output is not a terminal or --output is given)")
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
    given: object = None  # what the engine is given (diffutron_engine.inputs): text or chat messages
    ids: list[int] | None = None  # the oracle's token ids


def settings(args) -> tuple[SamplingParams, EngineConfig]:
    """(SamplingParams, EngineConfig): defaults < --preset < --fast < explicit flags. The engine's
    max_batch is --batch-size here (run() lowers it to the number of prompts)."""
    fields = dict(PRESETS[args.preset]) if args.preset else {}
    fields.update(request_defaults(args))
    flags = dict(
        max_new_tokens=args.max_new_tokens, steps=args.steps, block_size=args.block_size,
        temperature=args.temperature, remasking=args.remasking, stochastic_transfer=args.stochastic_transfer,
        cfg_scale=args.cfg_scale, repetition_penalty=args.repetition_penalty,
        stop_strings=(args.stop or []) + (list(DIFFUTRON_STOP_STRINGS) if args.diffutron_stops else []) or None,
        threshold=getattr(args, "threshold", None), factor=getattr(args, "factor", None),
    )
    for i, stop in enumerate(args.stop or []):
        check_utf8(stop, f"--stop {i + 1}", from_os=True)
    fields = with_defaults(fields, {k: v for k, v in flags.items() if v is not None})
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise DiffutronError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.block_size is not None and args.block_size < 1:
        raise DiffutronError(f"--block-size must be >= 1, got {args.block_size}")
    fields["early_stop"] = not getattr(args, "no_early_stop", False)
    return SamplingParams(**fields), engine_config(args, max_batch=args.batch_size)


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
    """(line number, text) of a stream of prompts, read with this command's bounds (looked up at each
    call), decoded as UTF-8 line by line so that a bad line is named."""
    return read_lines(stream, name, max_line_bytes=MAX_LINE_BYTES, max_bytes=MAX_INPUT_BYTES,
                      max_lines=MAX_INPUT_LINES,
                      long_line_hint="prompts are lines of text (is this the file of prompts?)",
                      too_much_hint="split the prompts over several runs")


def _read_jsonl(path: str) -> list[Prompt]:
    out = []
    try:
        with open(path, "rb") as f:
            for n, line in _lines(f, f"--input {path!r}"):  # parsed as read: the raw lines are not kept
                if line.strip():
                    out.append(_jsonl_prompt(line, f"{path}:{n}"))
    except OSError as exc:
        raise DiffutronError(f"cannot read --input {path!r}: {exc.strerror or exc}") from exc
    if not out:
        raise DiffutronError(f"--input {path!r} holds no prompts")
    return out


def _jsonl_prompt(line: str, where: str) -> Prompt:
    obj = parse_json(line, where, hint='expected an object with either "prompt" or "messages"')
    if not isinstance(obj, dict) or ("prompt" in obj) == ("messages" in obj):
        raise DiffutronError(f'{where}: expected an object with either "prompt" or "messages"')
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str):
            raise DiffutronError(f'{where}: "prompt" must be a string')
        check_utf8(obj["prompt"], f'{where}: "prompt"')  # JSON can spell a lone surrogate ("\\ud800")
        return Prompt(obj["prompt"], where)
    msgs = obj["messages"]
    try:  # validate the whole conversation now, before any model is loaded
        render_chat(msgs)
        if not any(m["role"] == "user" and m["content"].strip() for m in msgs):
            raise DiffutronError("empty prompt: no user message with content")
    except DiffutronError as exc:
        raise DiffutronError(f"{where}: {exc}") from None
    return Prompt(msgs, where)


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
    if args.visual and args.stream:
        raise DiffutronError("--visual and --stream both show the answers as they are made: give one of them")
    if args.batch_size < 1:
        raise DiffutronError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.batch_size > MAX_BATCH_SIZE:
        raise DiffutronError(f"--batch-size must be <= {MAX_BATCH_SIZE:,}, got {args.batch_size:,}")
    base, adapter = model_arguments(args)
    params, engine_cfg = settings(args)
    # before the prompts are read: the output must not be one of them (a file read through standard input
    # counts: `--output f < f` would replace the prompts with the answers)
    reads_stdin = not args.prompts and args.input is None
    target = check_file_output(args.output, "--output", inputs=(args.input, "/dev/stdin" if reads_stdin else None))
    prompts = read_prompts(args)
    # a missing model folder or a DIFFUTRON_BACKEND that names no backend fail before torch is imported
    model = resolve_model_path(base)
    check_backend_env()

    from ..loading import load_model

    lm = load_model(model if adapter is None else base, dtype=engine_cfg.dtype, device=engine_cfg.device,
                    adapter=adapter)
    for p in prompts:
        p.given = ChatPrompt(messages=p.source) if isinstance(p.source, list) else \
            TextPrompt(prompt=p.source, chat_template=not args.no_chat)

    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    params = params.override(seed=seed)
    use_reference = args.reference or lm.model.config.model_type != "modernbert"
    if use_reference and (engine_cfg != EngineConfig(max_batch=engine_cfg.max_batch, dtype=engine_cfg.dtype,
                                                     device=engine_cfg.device) or params.rule != "schedule"):
        raise DiffutronError("--cache/--cuda-graphs/--fused-head/--threshold/--factor/--fast need the engine "
                             "(a ModernBERT model, no --reference)")
    if use_reference and args.stream:
        raise DiffutronError("--stream needs the engine (a ModernBERT model, no --reference)")
    if use_reference and args.visual:
        raise DiffutronError("--visual needs the engine (a ModernBERT model, no --reference)")
    try:
        results = (_run_reference(lm, prompts, params, args) if use_reference
                   else _run_engine(lm, prompts, params, engine_cfg, args))
    except PromptError as exc:  # the engine names the prompt by its index; the user knows it by where it was
        reason = exc.reason.replace("max_new_tokens", "--max-new-tokens") if exc.too_long else exc.reason
        raise DiffutronError(f"{prompts[exc.index].where}: {reason}") from None

    if args.stream and args.output is None:
        return 0  # the answers went out as they were generated
    if args.json:
        rendered = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    else:
        rendered = "\n".join(r["text"] + "\n" for r in results)
    if target is not None:
        write_file(target, rendered, "--output")
    else:
        write_stdout(rendered)
    return 0


def _run_reference(lm, prompts, params: SamplingParams, args) -> list[dict]:
    """The oracle, batch by batch; the seed goes to torch's global generator as dllm expects."""
    import torch

    from ..inputs import prompt_ids
    from ..loading import check_context, decode_answer
    from ..reference import ReferenceSampler

    for i, p in enumerate(prompts):  # the engine's reading of each prompt (the same ids), all before any runs
        try:
            p.ids = prompt_ids(lm.tokenizer, p.given, lm.model.config.vocab_size)
            check_context(lm.model.config, len(p.ids) + params.max_new_tokens)
        except DiffutronError as exc:
            raise PromptError(i, str(exc), too_long=isinstance(exc, ContextTooLong)) from None
    torch.manual_seed(params.seed)
    oracle_cfg = ReferenceParams(return_dict=True, **params.knobs())
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


def _run_engine(lm, prompts, params: SamplingParams, engine_cfg: EngineConfig, args) -> list[dict]:
    """The engine: continuous batching over --batch-size rows; request i draws from seed + i. With
    --stream, text is printed as it settles: plain deltas for one prompt; with several, JSON events
    (--json) or "[i] text" lines."""
    from ..engine import Engine

    # no more rows than prompts: the rows beyond them would be allocated and never used
    engine = Engine(lm.model, lm.tokenizer, engine_cfg.override(max_batch=min(args.batch_size, len(prompts))))
    visual = _visual(engine, prompts, params, args) if args.visual else None
    progress = _Progress(1, unit="tokens")
    progress.enabled = progress.enabled and visual is None  # the frames' status line says it
    total = len(prompts) * params.max_new_tokens
    done = 0

    def on_step(outputs) -> None:
        nonlocal done
        committed = sum(out.committed for out in outputs)
        done += committed
        if args.stream:
            for out in outputs:
                _print_event(out, args.json, len(prompts))
        elif visual is not None:
            visual.screen.draw(visual.frames.frame(outputs, engine.canvas))
        else:
            progress(done, total, committed)

    try:
        finals = engine.generate([p.given for p in prompts], params, on_step=on_step)  # prompt i: seed_for(seed, i)
    finally:
        progress.close()
        if visual is not None:
            visual.screen.close()  # cursor shown, attributes reset: also after Ctrl-C or an error
    return [dict(prompt=p.source, text=r.text, new_tokens=r.new_tokens, forward_passes=r.forward_passes,
                 seconds=round(r.seconds, 4), seed=r.seed) for p, r in zip(prompts, finals)]


@dataclass
class _Visual:
    frames: object  # visual.FrameBuilder
    screen: object  # visual.Screen


class _StdoutStream:
    """Standard output for the frames, through write_stdout (UTF-8 bytes, write errors one line)."""

    def write(self, text: str) -> None:
        write_stdout(text)

    def flush(self) -> None:
        pass


def _visual(engine, prompts, params: SamplingParams, args) -> _Visual | None:
    """--visual's frames on standard output; None (the plain answers only, with a note on stderr) when
    it is not a terminal, is TERM=dumb, or the answers go to --output."""
    from . import visual

    why = "--output is given" if args.output is not None else visual.cannot_draw(sys.stdout)
    if why is not None:
        print(f"diffutron-engine: note: --visual draws nothing ({why}); the answers are printed as usual",
              file=sys.stderr)
        return None
    titles = [p.source if isinstance(p.source, str) else
              next((m["content"] for m in reversed(p.source) if m["role"] == "user"), "") for p in prompts]
    display = visual.TokenDisplay(engine.tokenizer, engine.mask_id)
    frames = visual.FrameBuilder(titles, params.max_new_tokens, params.block_size, engine.mask_id)
    return _Visual(frames, visual.Screen(_StdoutStream(), display, engine.mask_id, display.special))


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
