"""The engine: it owns its loop, as vLLM's and nano-vllm's engines do.

    engine = Engine.from_pretrained("diffutron/DiffutronLM-0.3B-Instruct", EngineConfig(cache="none"))
    rid = engine.add_request("Merhaba", SamplingParams(max_new_tokens=64, steps=64, block_size=32))
    while engine.has_unfinished():
        for out in engine.step():
            print(out.request_id, out.delta, out.finished)

`add_request` and `abort` may be called from any thread (they go through a lock-protected inbox that
`step` drains); `step` runs in one thread. `generate`, `infill` and `stream` are thin loops over
`step`. A step: admit waiting requests into free slots, run one denoising step of the running batch
on the device, then mirror its commits on the host (blocks, early stop, stop strings, text) and report.
A step that raises fails only its own requests: they finish with finish_reason "error" and leave every
structure, and `step` raises StepFailed (with the step's outputs); the engine goes on with the others.
See docs/architecture.md for a request's whole path.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ..commit_schedule import row_schedule
from ..config import EngineConfig, SamplingParams, seed_for
from ..errors import ContextTooLong, DiffutronError, PromptError, StepFailed
from ..inputs import prompt_ids
from ..loading import DEFAULT_MODEL, check_context, check_tokenizer_fits, decode_answer, load_model, prepare_tokenizer
from ..stopping import StopRule
from .request import Request, Status
from .runner import ModelRunner
from .scheduler import Scheduler
from .text import AnswerState


@dataclass
class RequestOutput:
    """What a step reports for one request (every running request gets one per step)."""

    request_id: str
    index: int  # the caller's index (a prompt's position in generate(); 0 by default)
    prompt_token_ids: list[int]
    text: str  # the answer so far (its settled, stable part); the final answer when finished
    delta: str  # text added since this request's previous output
    token_ids: list[int]  # the answer's tokens so far (settled prefix); all its positions when finished
    finished: bool
    finish_reason: str | None  # "complete", "answer ended" (early stop), "abort" or "error"
    forward_passes: int  # steps this request took
    committed: int  # tokens this step committed for it
    new_tokens: int = 0  # tokens of the final text (when finished)
    tokens: list[int] | None = None  # the whole canvas (prompt, then the answer) when finished
    seed: int = 0
    seconds: float = 0.0  # from admission to the running batch until finished
    error: BaseException | None = None  # finish_reason "error": what the step that ran the request raised
    trace: StepTrace | None = None  # with SamplingParams(trace=True): what this step did to the canvas


@dataclass
class StepTrace:
    """One step of a traced request: enough, step after step, to redraw its canvas. Start from `start`
    (the canvas before the first step, on the first trace only), write `tokens` at `positions`, then, if
    `canvas` is set (the host rewrote the row: a stop string), take that canvas whole."""

    step: int  # the request's forward pass, from 1
    block: tuple[int, int]  # canvas positions [lo, hi) of the block this step worked
    positions: list[int]  # committed this step, ascending
    tokens: list[int]
    confidences: list[float]  # the value the commit rule ranked (the probability; remasking="random": the draw)
    start: list[int] | None = None
    canvas: list[int] | None = None


# called after every step of generate/infill/stream with that step's outputs of the call's requests
OnStep = Callable[[list[RequestOutput]], None]


def _check_request_id(request_id) -> None:
    # str(5) would store "5", and abort(5) would then never match it
    if not isinstance(request_id, str) or not request_id:
        raise DiffutronError(f"a request id must be a non-empty string, got {request_id!r:.60}")


class _BadPrompt(DiffutronError):
    """What is wrong with a prompt itself (not with its parameters); a call of several names it by index."""


def _engine_config(config, settings: dict) -> EngineConfig:
    if config is None:
        return EngineConfig().override(**settings)  # an unknown name is refused by name
    if not isinstance(config, EngineConfig):
        raise DiffutronError(f"config must be an EngineConfig, got {type(config).__name__}")
    return config.override(**settings) if settings else config


def _check_model_matches(model, config: EngineConfig) -> None:
    """An explicit dtype or device that is not the loaded model's: refused (the engine never moves or
    casts a model it was given)."""
    try:
        param = next(model.parameters())
    except (StopIteration, AttributeError, TypeError):
        return
    if config.dtype != "auto" and str(param.dtype) != f"torch.{config.dtype}":
        raise DiffutronError(f"dtype={config.dtype!r} but the model's weights are {str(param.dtype)[6:]}: load it "
                             "with that dtype (Engine.from_pretrained does) or leave dtype 'auto'")
    if config.device != "auto":
        want, have = config.device, param.device
        same = want.split(":")[0] == have.type and (":" not in want or int(want.split(":")[1]) == (have.index or 0))
        if not same:
            raise DiffutronError(f"device={want!r} but the model is on {have}: load it there "
                                 "(Engine.from_pretrained does) or leave device 'auto'")


def _draw_seed() -> int:
    import torch  # torch's global generator, so that torch.manual_seed applies

    return int(torch.randint(0, 2**62, (1,)).item())


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig | None = None, **settings):
        """An engine over a loaded model and its tokenizer. `config` (default EngineConfig()) holds the
        engine's settings; keyword `settings` replace some of them (`Engine(m, t, max_batch=4)`). An
        explicit dtype or device must be the model's own (from_pretrained loads it so). Every op's
        backend is chosen here, once (diffutron_engine.backends)."""
        if getattr(model.config, "model_type", None) != "modernbert":
            raise DiffutronError(
                f"the engine runs ModernBERT checkpoints; this one is {model.config.model_type!r} "
                "(use diffutron_engine.reference.ReferenceSampler for other masked LMs)"
            )
        config = _engine_config(config, settings)
        _check_model_matches(model, config)
        self.config = config
        self.model = model
        self.tokenizer = prepare_tokenizer(tokenizer)
        check_tokenizer_fits(self.tokenizer, model.config.vocab_size, "the model")
        self.mask_id = self.tokenizer.mask_token_id
        self.max_batch = config.max_batch
        self.cache = config.cache
        self.runner = ModelRunner(model, self.tokenizer, config.max_batch, cache=config.cache,
                                  cuda_graphs=config.cuda_graphs, fused_head=config.fused_head)
        self.scheduler = Scheduler(config.max_batch)
        self._lock = threading.Lock()
        self._inbox: deque = deque()  # ("add", Request) | ("abort", request_id), from any thread
        self._live: dict[str, Request] = {}  # added, not yet reported finished
        # outputs of requests that generate()/stream() stepped but did not add: the caller's next step()
        # returns them first, so a request added before those calls never loses its result
        self._held: list[RequestOutput] = []
        self._ids = itertools.count()
        self._id_prefix = f"req-{uuid.uuid4().hex[:8]}"

    @classmethod
    def from_pretrained(cls, name_or_path: str | None = None, config: EngineConfig | None = None, *,
                        adapter: str | None = None, **settings) -> "Engine":
        """Load a checkpoint (a bundled name, a folder or a hub id; None: DEFAULT_MODEL) as `config` says
        (dtype, device) and build the engine on it; keyword `settings` replace some of config's.
        `adapter`: a LoRA adapter folder merged into it in memory (load_model; with name_or_path None, on
        the base the adapter names)."""
        config = _engine_config(config, settings)
        lm = load_model(name_or_path, dtype=config.dtype, device=config.device, adapter=adapter)
        return cls(lm.model, lm.tokenizer, config)

    # ------------------------------------------------------------------ the loop
    def add_request(self, prompt, params: SamplingParams | None = None, request_id: str | None = None, *,
                    index: int = 0, infill: bool = False) -> str:
        """Queue a prompt (any form of diffutron_engine.inputs: text, answered with the chat template or
        as it is; chat messages; token ids, used as they are) and return its request id. With `infill`, the prompt is a sequence whose mask
        tokens are filled instead. Bad input raises DiffutronError here, in the caller's thread."""
        params = self._check_params(params)
        seed = params.seed if params.seed is not None else _draw_seed()
        req = self._make(prompt, params, seed, request_id, index, infill)
        self._enqueue([req])
        return req.request_id

    def add_requests(self, prompts: Sequence, params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                     infill: bool = False) -> list[str]:
        """Queue several prompts at once, all or none (every one is validated first); prompt i gets
        index i and, with one SamplingParams for all, the seed seed_for(seed, i). A bad prompt raises
        PromptError naming its index."""
        return self._enqueue(self._make_all(prompts, params, infill))

    def abort(self, request_id: str) -> None:
        """Stop a request (from any thread): its slot is freed at the next step, which reports it
        finished with finish_reason "abort". The id is looked up at that step, so an abort that overtakes
        its request's add (another thread still building it) still applies; ids unknown then, or
        finished, are ignored. Do not reuse an id within the step in which you aborted it. An id that is
        not a string (never one of this engine's) is refused."""
        _check_request_id(request_id)
        with self._lock:
            self._inbox.append(("abort", request_id))

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._live)

    def step(self) -> list[RequestOutput]:
        """One denoising step of the running batch; returns an output per request it touched.

        If the step raises (admission, the device work, or the host's mirror of it), every request of
        the step is finished with finish_reason "error" and `error` set to the exception, and leaves the
        scheduler, its slot and the engine (the host and device state of a half-run step cannot be
        trusted); then StepFailed is raised, carrying the step's outputs. Waiting requests and later
        ones run normally at the next step. KeyboardInterrupt and SystemExit get the same cleanup and
        propagate as they are.

        Outputs that generate(), infill() or stream() produced for requests they did not add come first."""
        held, self._held = self._held, []
        try:
            return held + self._step()
        except StepFailed as exc:
            exc.outputs[:0] = held
            raise

    def _step(self) -> list[RequestOutput]:
        outputs = self._drain_inbox()
        failed = [o.error for o in outputs if o.finish_reason == "error"]
        if failed:  # a request failed in the inbox (the others were carried out): report it now
            raise StepFailed(outputs, failed[0]) from failed[0]
        batch: list[Request] = []
        try:
            batch = self._schedule()
            if not batch:
                return outputs
            return outputs + self._advance(batch, self.runner.execute(batch))
        except BaseException as exc:
            failed = self._fail([*batch, *self.scheduler.running], exc)
            if not isinstance(exc, Exception):
                raise
            raise StepFailed(outputs + failed, exc) from exc

    # ------------------------------------------------------------------ convenience loops
    def generate(self, prompts: Sequence, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 on_step: OnStep | None = None) -> list[RequestOutput]:
        """Answer every prompt; final outputs in prompt order. One SamplingParams for all (prompt i then
        draws from seed + i, mod 2**63) or one per prompt. `on_step(outputs)` is called after every step
        with that step's outputs of this call's requests (progress, streaming, per-step histories).
        Drives the loop itself: do not call it while another thread steps this engine. Requests added
        earlier with add_request run along (they share the batch) and keep their outputs: the next step()
        returns them. A step that fails (or an on_step that raises) ends the call: its other requests
        are aborted and the engine is ready for the next call; a failed step raises StepFailed."""
        return self._run(prompts, params, infill=False, on_step=on_step)

    def infill(self, sequences: Sequence, params: SamplingParams | Sequence[SamplingParams] | None = None,
               on_step: OnStep | None = None) -> list[RequestOutput]:
        """Fill the mask tokens inside each token sequence; final outputs in order (on_step as generate)."""
        return self._run(sequences, params, infill=True, on_step=on_step)

    def stream(self, prompts: Sequence, params: SamplingParams | Sequence[SamplingParams] | None = None,
               on_step: OnStep | None = None) -> Iterator[RequestOutput]:
        """Yield each request's outputs as its text grows (non-empty deltas), then its final output;
        `on_step` as in generate. A step that fails raises StepFailed (the call's other requests end at
        the next step). Requests added earlier with add_request keep their outputs: the next step()
        returns them."""
        ids = self.add_requests(prompts, params)
        pending, ids_set = set(ids), set(ids)
        try:
            while pending:
                mine = self._step_for(ids_set)
                if on_step is not None:
                    on_step(mine)
                for out in mine:
                    if out.request_id in pending and (out.delta or out.finished):
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:  # a consumer that stopped early: its requests end now, their outputs with them
            for rid in pending:
                self.abort(rid)
            if pending:
                self._held += [out for out in self._drain_inbox() if out.request_id not in ids_set]

    def encode(self, prompt) -> list[int]:
        """A prompt's token ids as add_request reads them (any form of diffutron_engine.inputs), for a
        caller that adds one prompt several times (the server's n choices) and tokenizes it once."""
        return prompt_ids(self.tokenizer, prompt, self.runner.model.vocab_size)

    def canvas(self, request_id: str) -> list[int]:
        """The current canvas (prompt, committed tokens, masks) of a request not yet reported finished."""
        with self._lock:
            req = self._live.get(request_id)
        if req is None:
            raise DiffutronError(f"no running request {request_id!r}")
        return list(req.tokens)

    def _step_for(self, wanted: set) -> list[RequestOutput]:
        """One step; the outputs of `wanted` requests. Others' outputs are held for their caller's next
        step() (requests added with add_request before a generate/stream call)."""
        mine = []
        for out in self.step():
            (mine if out.request_id in wanted else self._held).append(out)
        return mine

    def _run(self, prompts, params, infill: bool, on_step: OnStep | None = None) -> list[RequestOutput]:
        ids = self.add_requests(prompts, params, infill=infill)
        wanted, done = set(ids), {}
        try:
            while len(done) < len(ids):
                mine = self._step_for(wanted)
                done.update((out.request_id, out) for out in mine if out.finished)
                if on_step is not None:
                    on_step(mine)
        except BaseException as exc:  # interrupted, or a step failed: the rest are aborted now (this call
            # owns the loop), so that nothing of this call is left in the engine
            for rid in ids:
                if rid not in done:
                    self.abort(rid)
            reported = self._drain_inbox() + (exc.outputs if isinstance(exc, StepFailed) else [])
            self._held += [out for out in reported if out.request_id not in wanted]  # others' outputs stay
            if isinstance(exc, StepFailed):
                exc.outputs[:] = [out for out in exc.outputs if out.request_id in wanted]
            raise
        return [done[rid] for rid in ids]

    # ------------------------------------------------------------------ requests
    @staticmethod
    def _check_params(params) -> SamplingParams:
        """A private, validated copy: the caller may change or reuse its object afterwards."""
        if params is None:
            return SamplingParams()
        if not isinstance(params, SamplingParams):
            raise DiffutronError(f"params must be a SamplingParams, got {type(params).__name__}")
        return dataclasses.replace(params)

    def _make_all(self, prompts, params, infill: bool) -> list[Request]:
        """Requests for a whole call, validated before any is queued (all or nothing)."""
        prompts = [prompts] if hasattr(prompts, "dim") and prompts.dim() == 1 else list(prompts)
        if not prompts:
            raise DiffutronError("no prompts given")
        if isinstance(params, (list, tuple)):
            if len(params) != len(prompts):
                raise DiffutronError(f"{len(params)} SamplingParams for {len(prompts)} prompts: give one, or one each")
            each = [self._check_params(p) for p in params]
            seeds = [p.seed if p.seed is not None else _draw_seed() for p in each]
        else:
            one = self._check_params(params)
            base = one.seed if one.seed is not None else _draw_seed()
            each, seeds = [one] * len(prompts), [seed_for(base, i) for i in range(len(prompts))]
        reqs = []
        for i, (p, prm, seed) in enumerate(zip(prompts, each, seeds)):
            try:
                reqs.append(self._make(p, prm, seed, None, i, infill))
            except (_BadPrompt, ContextTooLong) as exc:  # the prompt's fault: named by its index
                raise PromptError(i, str(exc), too_long=isinstance(exc, ContextTooLong)) from None
        return reqs

    def _enqueue(self, reqs: list[Request]) -> list[str]:
        with self._lock:
            ids = [r.request_id for r in reqs]
            clash = [rid for rid in ids if rid in self._live]
            if clash or len(set(ids)) != len(ids):
                raise DiffutronError(f"request id {(clash or ids)[0]!r} is already in use")
            for r in reqs:
                self._live[r.request_id] = r
                self._inbox.append(("add", r))
        return ids

    def _make(self, prompt, params: SamplingParams, seed: int, request_id, index: int, infill: bool) -> Request:
        """A request: its canvas, blocks and commit schedules, all validated (no side effects)."""
        if request_id is not None:
            _check_request_id(request_id)
        try:
            ids = self.encode(prompt)
        except DiffutronError as exc:
            raise _BadPrompt(str(exc)) from None
        if not ids and not infill and not params.right_shift_logits:
            raise _BadPrompt("an empty prompt (no token ids): give at least one (with right_shift_logits an "
                                 "empty prompt starts from BOS, as dllm's sampler does)")
        vocab = self.runner.model.vocab_size
        for name in ("suppress_tokens", "begin_suppress_tokens", "cfg_keep_tokens"):
            bad = [i for i in getattr(params, name) or [] if i >= vocab]
            if bad:
                raise DiffutronError(f"{name} has ids outside the vocabulary [0, {vocab}): {bad}")
        if params.right_shift_logits and not ids:
            ids = [self.tokenizer.bos_token_id]
        L = len(ids)
        if infill:
            if L == 0:
                raise _BadPrompt("infill needs a non-empty sequence")
            check_context(self.model.config, L)
            bs = params.block_size or L
            windows = [(lo, min(lo + bs, L)) for lo in range(0, L, bs)]
            tokens, start = list(ids), 0
        else:
            if params.block_size is None:
                raise DiffutronError("block_size must be >= 1 for generation (None is allowed only for infill)")
            if self.mask_id in ids:
                raise _BadPrompt(
                    f"the prompt holds the mask token at position {ids.index(self.mask_id)}; the engine fills "
                    "only the generated positions (to fill masks inside a sequence, use infill)")
            n, bs = params.max_new_tokens, params.block_size
            check_context(self.model.config, L + n)
            windows = [(L + b * bs, min(L + (b + 1) * bs, L + n)) for b in range(math.ceil(n / bs))]
            tokens, start = ids + [self.mask_id] * n, L
        # each block's share of the steps counts every block, as the oracle does; blocks without a
        # mask (infill) are then skipped
        per_block = math.ceil(params.steps / len(windows))
        masked = [sum(1 for t in tokens[lo:hi] if t == self.mask_id) for lo, hi in windows]
        blocks = [w for w, m in zip(windows, masked) if m]
        schedules = None
        if params.rule == "schedule":
            # the request's own generator (stochastic transfer), seeded by its seed: the counts do not
            # depend on the batch; drawn block after block, as the oracle draws them
            gen = None
            if params.stochastic_transfer:
                import torch

                gen = torch.Generator().manual_seed(seed)
            schedules = [row_schedule(m, per_block, params.stochastic_transfer, "cpu", gen) for m in masked if m]
        keep = set(params.cfg_keep_tokens or ())
        given = [p for p, t in enumerate(tokens) if t != self.mask_id and t not in keep]
        stop = StopRule(self.tokenizer, params.stop_strings) if params.stop_strings else None
        serial = next(self._ids)
        # generated ids carry this engine's random prefix: they never collide with the caller's own ids
        rid = request_id if request_id is not None else f"{self._id_prefix}-{serial}"
        answer = AnswerState(self.tokenizer, tokens, start, self.mask_id, holdback=stop.window if stop else 0)
        return Request(request_id=rid, serial=serial, index=index, prompt_ids=ids, params=params, seed=seed,
                       tokens=tokens, blocks=blocks, schedules=schedules, answer_start=start, given=given,
                       answer=answer, stop=stop, early_stop=params.early_stop and not infill)

    # ------------------------------------------------------------------ inside a step
    def _drain_inbox(self) -> list[RequestOutput]:
        """Queue the added requests and carry out the aborts; outputs for requests that ended here."""
        with self._lock:
            items, self._inbox = list(self._inbox), deque()
        out = []
        for kind, item in items:
            req = item if kind == "add" else None
            try:
                if kind == "add":
                    if item.status is Status.FINISHED:  # aborted before it was ever queued
                        continue
                    if not item.blocks:  # nothing to fill
                        item.finish("complete")
                        out.append(self._finish_output(item, 0))
                    else:
                        self.scheduler.add(item)
                    continue
                with self._lock:
                    req = self._live.get(item)
                if req is None or req.status is Status.FINISHED:
                    continue
                if req.status is not Status.NEW:  # NEW: its add comes later in the inbox and is skipped
                    self.scheduler.remove(req)
                    self.runner.release(req)
                req.finish("abort")
                out.append(self._finish_output(req, 0))
            except Exception as exc:  # this request fails; the inbox's other items are still carried out
                if req is not None:
                    out += self._fail([req], exc)
        return out

    def _fail(self, reqs: list[Request], exc: BaseException) -> list[RequestOutput]:
        """Finish requests with finish_reason "error" and take them out of every structure (waiting
        queue, running batch, slot, the engine's live table); the runner forgets what it cached about
        the running batch. Their outputs carry the exception."""
        reqs = list({id(r): r for r in reqs}.values())
        for req in reqs:
            if req.status is Status.WAITING:
                self.scheduler.remove(req)
        self.scheduler.retire(reqs)
        for req in reqs:
            self.runner.release(req)
        self.runner.forget_batch()
        out = []
        for req in reqs:
            req.finish("error")
            with self._lock:
                self._live.pop(req.request_id, None)
            # no decode here: what failed may be the tokenizer; the text is what was already reported
            out.append(RequestOutput(request_id=req.request_id, index=req.index, prompt_token_ids=req.prompt_ids,
                                     text=req.answer.sent, delta="", token_ids=req.tokens[req.answer_start:],
                                     finished=True, finish_reason="error", forward_passes=req.forward_passes,
                                     committed=0, tokens=list(req.tokens), seed=req.seed, seconds=req.seconds,
                                     error=exc))
        return out

    def _schedule(self) -> list[Request]:
        batch = self.scheduler.schedule()
        new = [req for req in batch if req.slot is None]  # admitted this step
        if new:
            self.runner.admit(new)
        return batch

    def _advance(self, batch: list[Request], rec: np.ndarray) -> list[RequestOutput]:
        """Mirror the step's commits on the host; retire finished requests; report."""
        toks_plane = rec[:, 0]
        rows, cols = np.nonzero(toks_plane >= 0)
        toks = toks_plane[rows, cols].tolist()
        rows, cols = rows.tolist(), cols.tolist()
        commits: list[list[tuple[int, int]]] = [[] for _ in batch]
        for r, c, t in zip(rows, cols, toks):
            commits[r].append((batch[r].window[0] + c, t))
        confs: list[list[float]] = [[] for _ in batch]
        if rec.shape[1] > 1:  # a traced step: the second plane holds the confidences' float32 bits
            for r, v in zip(rows, rec[:, 1].view(np.float32)[rows, cols].tolist()):
                confs[r].append(v)
        out, finished = [], []
        for req, done, conf in zip(batch, commits, confs):
            trace = self._trace_start(req, done, conf) if req.params.trace else None
            rewritten = req.apply(done)
            if trace is not None and rewritten:
                trace.canvas = list(req.tokens)
            reason = None
            if req.done:
                reason = "complete"
            elif req.early_stop and req.answer.is_final(req.tokens, req.masks_left):
                reason = "answer ended"
            if reason is not None:
                req.finish(reason)
                finished.append(req)
                out.append(self._finish_output(req, len(done), trace))
            else:
                if rewritten:
                    self.runner.sync(req)
                out.append(self._running_output(req, len(done), trace))
        if finished:
            self.scheduler.retire(finished)
            for req in finished:
                self.runner.release(req)
        return out

    @staticmethod
    def _trace_start(req: Request, done: list[tuple[int, int]], conf: list[float]) -> StepTrace:
        """The step's trace before the host applies it: the block it worked, what it committed and how
        confidently, and on the first step the canvas it started from."""
        return StepTrace(step=req.forward_passes + 1, block=tuple(req.window), positions=[p for p, _ in done],
                         tokens=[t for _, t in done], confidences=conf,
                         start=list(req.tokens) if req.forward_passes == 0 else None)

    def _running_output(self, req: Request, committed: int, trace: StepTrace | None = None) -> RequestOutput:
        delta = req.answer.take_delta()
        return RequestOutput(request_id=req.request_id, index=req.index, prompt_token_ids=req.prompt_ids,
                             text=req.answer.sent, delta=delta,
                             token_ids=req.tokens[req.answer_start: req.answer.frontier], finished=False,
                             finish_reason=None, forward_passes=req.forward_passes, committed=committed,
                             seed=req.seed, trace=trace)

    def _finish_output(self, req: Request, committed: int, trace: StepTrace | None = None) -> RequestOutput:
        with self._lock:
            self._live.pop(req.request_id, None)
        text, n = decode_answer(self.tokenizer, req.tokens, req.answer_start)
        delta = req.answer.take_delta(text)
        return RequestOutput(request_id=req.request_id, index=req.index, prompt_token_ids=req.prompt_ids,
                             text=text, delta=delta, token_ids=req.tokens[req.answer_start:], finished=True,
                             finish_reason=req.finish_reason, forward_passes=req.forward_passes,
                             committed=committed, new_tokens=n, tokens=list(req.tokens), seed=req.seed,
                             seconds=req.seconds, trace=trace)
