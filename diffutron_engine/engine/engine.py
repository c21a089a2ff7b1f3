"""The engine: `Engine.from_pretrained(...)`, `engine.generate(prompts, SamplingConfig)`,
`engine.stream(...)`. A step is: the scheduler picks the rows, the runner runs them, the scheduler
advances and retires them."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

from ..config import SamplingConfig
from ..errors import DiffutronError
from ..loading import (DEFAULT_MODEL, END_OF_TURN, check_context, decode_answer, encode_prompt, load_model,
                       prepare_tokenizer)
from ..stopping import answer_is_final
from .request import Request, Status
from .runner import ModelRunner
from .scheduler import Scheduler


@dataclass
class Result:
    index: int  # position of the prompt in the call
    prompt_ids: list[int]
    tokens: list[int]  # the request's canvas: prompt, then what was committed
    text: str
    new_tokens: int
    forward_passes: int
    finish_reason: str


@dataclass
class StreamEvent:
    index: int
    text: str  # newly committed text (concatenated deltas equal the final text)
    finished: bool


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 8, cuda_graphs: bool = False):
        """cuda_graphs: replay each forward from a CUDA graph captured per input shape (CUDA only;
        ignored on CPU). Pays off when launches dominate: small batches on a fast GPU."""
        if getattr(model.config, "model_type", None) != "modernbert":
            raise DiffutronError(
                f"the engine runs ModernBERT checkpoints; this one is {model.config.model_type!r} "
                "(use diffutron_engine.reference.ReferenceSampler for other masked LMs)"
            )
        if max_batch < 1:
            raise DiffutronError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model
        self.tokenizer = prepare_tokenizer(tokenizer)
        self.mask_id = self.tokenizer.mask_token_id
        self.max_batch = max_batch
        self.runner = ModelRunner(model, self.tokenizer, max_batch, cuda_graphs=cuda_graphs)
        self.scheduler = Scheduler(max_batch, self.mask_id, self._is_final)
        self._ids = itertools.count()

    @classmethod
    def from_pretrained(cls, name_or_path: str = DEFAULT_MODEL, *, dtype: str = "auto", device: str = "auto",
                        max_batch: int = 8, cuda_graphs: bool = False) -> "Engine":
        lm = load_model(name_or_path, dtype=dtype, device=device)
        return cls(lm.model, lm.tokenizer, max_batch=max_batch, cuda_graphs=cuda_graphs)

    # ------------------------------------------------------------------ the loop
    def step(self) -> tuple[list[Request], list[Request]]:
        """One denoising step of the running batch; returns (the batch, the requests it finished)."""
        batch = self.scheduler.schedule()
        self.runner.step(batch)
        return batch, self._retire(self.scheduler.postprocess(batch))

    def _retire(self, finished: list[Request]) -> list[Request]:
        for req in finished:
            self.runner.release(req)
        return finished

    def _is_final(self, req: Request) -> bool:
        return answer_is_final(self.tokenizer, req.tokens, req.answer_start, self.mask_id)

    # ------------------------------------------------------------------ requests
    def _ids_of(self, prompt) -> list[int]:
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict)):
            return encode_prompt(self.tokenizer, prompt)
        ids = [int(t) for t in (prompt.tolist() if hasattr(prompt, "tolist") else prompt)]
        vocab = self.runner.model.vocab_size
        if any(t < 0 or t >= vocab for t in ids):
            raise DiffutronError(f"prompt has token ids outside the vocabulary [0, {vocab})")
        return ids

    def make_request(self, prompt, config: SamplingConfig, index: int) -> Request:
        """A generation request: the prompt, then max_new_tokens masks in blocks of block_size."""
        ids = self._ids_of(prompt)
        if config.right_shift_logits and not ids:
            ids = [self.tokenizer.bos_token_id]
        n = config.max_new_tokens or (config.max_length - len(ids))
        if n < 1:
            raise DiffutronError(f"max_length {config.max_length} leaves no room after a {len(ids)}-token prompt")
        if config.block_size is None:
            raise DiffutronError("block_size must be >= 1 for generation")
        check_context(self.model.config, len(ids) + n)
        L, bs = len(ids), config.block_size
        windows = [(L + b * bs, min(L + (b + 1) * bs, L + n)) for b in range(math.ceil(n / bs))]
        return self._request(ids, ids + [self.mask_id] * n, windows, L, config, index)

    def make_infill_request(self, seq, config: SamplingConfig, index: int) -> Request:
        """An infill request: fill the masks already in `seq`, blocks tiling it from position 0."""
        ids = self._ids_of(seq)
        if config.right_shift_logits and not ids:
            ids = [self.tokenizer.bos_token_id]
        check_context(self.model.config, len(ids))
        bs = config.block_size or max(len(ids), 1)
        windows = [(lo, min(lo + bs, len(ids))) for lo in range(0, len(ids), bs)]
        return self._request(ids, list(ids), windows, 0, config, index)

    def _request(self, prompt_ids, tokens, windows, answer_start, config, index) -> Request:
        keep = set(config.cfg_keep_tokens or ())
        given = [p for p, t in enumerate(tokens) if t != self.mask_id and t not in keep]
        return Request(id=next(self._ids), prompt_ids=prompt_ids, config=config, seed=config.seed + index,
                       tokens=tokens, windows=windows, answer_start=answer_start,
                       extra={"given": given, "index": index})

    # ------------------------------------------------------------------ public API
    def generate(self, prompts: Sequence, config: SamplingConfig | None = None, **kwargs) -> list[Result]:
        """Answer every prompt (a string, chat messages, or token ids); results in prompt order."""
        config = resolve_config(config, kwargs)
        reqs = [self.make_request(p, config, i) for i, p in enumerate(prompts)]
        return self.run(reqs)

    def infill(self, sequences: Sequence, config: SamplingConfig | None = None, **kwargs) -> list[Result]:
        config = resolve_config(config, kwargs)
        reqs = [self.make_infill_request(s, config, i) for i, s in enumerate(sequences)]
        return self.run(reqs)

    def run(self, reqs: list[Request]) -> list[Result]:
        if not reqs:
            raise DiffutronError("no prompts given")
        for r in reqs:
            self.scheduler.add(r)
        while self.scheduler.has_work():
            self.step()
        return [self.result(r) for r in reqs]

    def stream(self, prompts: Sequence, config: SamplingConfig | None = None, **kwargs) -> Iterator[StreamEvent]:
        """Yield each request's newly committed text as its blocks complete, then a final event."""
        config = resolve_config(config, kwargs)
        reqs = [self.make_request(p, config, i) for i, p in enumerate(prompts)]
        if not reqs:
            raise DiffutronError("no prompts given")
        sent = {r.id: "" for r in reqs}
        for r in reqs:
            self.scheduler.add(r)
        for r in reqs:  # requests with nothing to do finish at once
            if r.status is Status.FINISHED:
                yield StreamEvent(r.extra["index"], self.result(r).text, True)
        while self.scheduler.has_work():
            batch, done_now = self.step()
            finished = set(id(r) for r in done_now)
            for r in batch:
                done = id(r) in finished
                text = self.result(r).text if done else self._committed_text(r)
                if text.startswith(sent[r.id]) and (len(text) > len(sent[r.id]) or done):
                    yield StreamEvent(r.extra["index"], text[len(sent[r.id]):], done)
                    sent[r.id] = text

    def _committed_text(self, req: Request) -> str:
        """Text of the completed blocks (up to the first mask), trailing whitespace and partial
        characters held back so that later deltas only append."""
        row = req.tokens[req.answer_start :]
        upto = row.index(self.mask_id) if self.mask_id in row else len(row)
        text, _ = decode_answer(self.tokenizer, req.tokens[: req.answer_start + upto], req.answer_start)
        if text.endswith(tuple(END_OF_TURN[:k] for k in range(1, len(END_OF_TURN)))):
            text = text[: text.rfind("[")]  # a possibly incomplete end-of-turn marker
        return text.rstrip("\ufffd").rstrip()

    def result(self, req: Request) -> Result:
        text, n = decode_answer(self.tokenizer, req.tokens, req.answer_start)
        return Result(index=req.extra["index"], prompt_ids=req.prompt_ids, tokens=list(req.tokens), text=text,
                      new_tokens=n, forward_passes=req.forward_passes, finish_reason=req.finish_reason or "")


def resolve_config(config: SamplingConfig | None, kwargs: dict) -> SamplingConfig:
    config = config or SamplingConfig()
    if not isinstance(config, SamplingConfig):  # an oracle SamplerConfig: keep its knobs
        from dataclasses import asdict

        config = SamplingConfig(**asdict(config))
    config = config.override(**kwargs) if kwargs else config
    if config.seed is None:  # drawn from torch's global generator, so torch.manual_seed applies
        import torch

        config = config.override(seed=int(torch.randint(0, 2**62, (1,)).item()))
    return config
