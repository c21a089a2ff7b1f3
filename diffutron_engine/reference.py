"""The oracle: the exact reference sampler (the algorithm is described in docs/sampling.md).

It mirrors dllm's MDLM sampler (v0.1 API) step for step, including every random draw's order, shape and
dtype, so that the same torch seed gives the same tokens; plus Diffutron's repetition penalty and stop
strings. It is deliberately slow and simple: whole-canvas forwards, B x T x V logits, a full softmax.
Everything fast in this project is measured against it. It never imports the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .config import ReferenceParams
from .errors import DiffutronError
from .commit_schedule import block_schedule
from .loading import check_context
from .stopping import StopRule


@dataclass
class ReferenceOutput:
    sequences: torch.Tensor  # B x T canvas
    histories: list[torch.Tensor] | None = None  # canvases: the initial one, then one per step
    forward_passes: int = 0  # model calls made (a CFG step's doubled batch counts once)


# on_step(steps_done, steps_upper_bound, tokens_committed_this_step): called after every step.
StepCallback = Callable[[int, int, int], None]


@dataclass
class ReferenceSampler:
    """`ReferenceSampler(model=..., tokenizer=...)`, then `.sample(prompts)` or `.infill(sequences)`."""

    model: torch.nn.Module
    tokenizer: object
    on_step: StepCallback | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def sample(self, inputs: Sequence, config: ReferenceParams | None = None, **kwargs):
        """Generate after each prompt (token-id lists or 1-D tensors of unequal length)."""
        cfg = (config or ReferenceParams()).override(**kwargs) if kwargs else (config or ReferenceParams())
        if cfg.block_size is None:
            raise DiffutronError("block_size must be >= 1 for sample (None is allowed only for infill)")
        ids, bos_id, eos_id, mask_id = self._prepare(inputs, cfg)
        lens = [p.shape[0] for p in ids]
        if cfg.max_new_tokens:
            new, total = cfg.max_new_tokens, cfg.max_new_tokens + max(lens)
        else:
            new, total = cfg.max_length - max(lens), cfg.max_length
            if new < 1:
                raise DiffutronError(
                    f"max_length {cfg.max_length} leaves no room after the longest prompt ({max(lens)} tokens)"
                )
        x, attention_mask = self._canvas(ids, total, eos_id, mask_id, new)

        B, bs = len(ids), cfg.block_size
        num_blocks = math.ceil(new / bs)
        # Per row and block: the range [lo, hi) whose masks the schedule counts, and the end beyond
        # which confidence is -inf (sampling restricts only the right side, as dllm does).
        windows = []
        for b in range(num_blocks):
            rows = []
            for i in range(B):
                lo = lens[i] + b * bs
                hi = min(lo + bs, lens[i] + new, total)
                rows.append((lo, max(lo, hi), None, lens[i] + (b + 1) * bs))
            windows.append(rows)
        return self._run(x, attention_mask, windows, cfg, mask_id, eos_id, answer_starts=lens)

    @torch.no_grad()
    def infill(self, inputs: Sequence, config: ReferenceParams | None = None, **kwargs):
        """Fill the mask tokens already inside the given sequences (right-padded with EOS)."""
        cfg = (config or ReferenceParams()).override(**kwargs) if kwargs else (config or ReferenceParams())
        ids, bos_id, eos_id, mask_id = self._prepare(inputs, cfg)
        lens = [p.shape[0] for p in ids]
        total = max(lens)
        if total == 0:
            raise DiffutronError("infill needs at least one non-empty sequence")
        x, attention_mask = self._canvas(ids, total, eos_id, mask_id, 0)

        B, bs = len(ids), cfg.block_size if cfg.block_size is not None else total
        num_blocks = math.ceil(total / bs)
        windows = []
        for b in range(num_blocks):
            start, stop = b * bs, min(b * bs + bs, total)
            rows = []
            for i in range(B):
                width = max(0, min(lens[i], stop) - start)
                rows.append((start, start + width, start, start + width))
            windows.append(rows)
        return self._run(x, attention_mask, windows, cfg, mask_id, eos_id, answer_starts=[0] * B)

    def _canvas(self, ids, total: int, eos_id: int, mask_id: int, new: int):
        """The B x total canvas (each row: its prompt, `new` masks, EOS padding) and its attention mask,
        after the context check."""
        check_context(self.model.config, total)
        lens = [p.shape[0] for p in ids]
        x = torch.full((len(ids), total), eos_id, dtype=torch.long, device=self._device)
        attention_mask = torch.zeros((len(ids), total), dtype=torch.long, device=self._device)
        for i, p in enumerate(ids):
            x[i, : lens[i]] = p
            x[i, lens[i] : lens[i] + new] = mask_id
            attention_mask[i, : min(lens[i] + new, total)] = 1
        return x, attention_mask

    # ------------------------------------------------------------------ the loop
    def _run(self, x, attention_mask, windows, cfg: ReferenceParams, mask_id: int, eos_id: int, answer_starts):
        B, T = x.shape
        # "Given" positions for CFG, fixed at the start: visible, not a mask, minus cfg_keep_tokens.
        given = (x != mask_id) & attention_mask.bool()
        if cfg.cfg_keep_tokens:
            given &= ~torch.isin(x, torch.as_tensor(cfg.cfg_keep_tokens, device=x.device))

        per_block_steps = math.ceil(cfg.steps / len(windows)) if windows else 0
        upper_bound = per_block_steps * len(windows)
        histories = [x.clone()] if cfg.return_dict else None
        stop = StopRule(self.tokenizer, cfg.stop_strings) if cfg.stop_strings else None
        forwards, done = 0, 0

        for rows in windows:
            masked = [int((x[i, lo:hi] == mask_id).sum()) for i, (lo, hi, _, _) in enumerate(rows)]
            schedule = block_schedule(masked, per_block_steps, cfg.stochastic_transfer, x.device)
            for s in range(len(schedule[0]) if schedule else 0):
                # Diffutron's generator skips a step once no mask is left anywhere in the batch
                # (only reachable when the stop rule has cleared rows).
                if not bool((x == mask_id).any()):
                    break
                mask_index = x == mask_id
                logits = self._logits(x, attention_mask, given, cfg, mask_id)
                forwards += 1
                if cfg.repetition_penalty != 1.0:
                    _apply_repetition_penalty(logits, x, cfg.repetition_penalty, mask_id, eos_id)
                if cfg.suppress_tokens:
                    logits[:, :, cfg.suppress_tokens] = -torch.inf
                if cfg.right_shift_logits:
                    logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)

                if cfg.temperature == 0:
                    x0 = torch.argmax(logits, dim=-1)
                else:
                    # Gumbel-max in float64: argmax(exp(l) / (-log U)^tau), U drawn once per step
                    # over the full logits shape with the global generator.
                    l64 = logits.to(torch.float64)
                    noise = torch.rand_like(l64, dtype=torch.float64)
                    x0 = torch.argmax(l64.exp() / (-torch.log(noise)) ** cfg.temperature, dim=-1)
                    del l64, noise

                if cfg.begin_suppress_tokens:  # after the choice: only lowers the confidence
                    logits[:, :, cfg.begin_suppress_tokens] = -torch.inf
                if cfg.remasking == "low_confidence":
                    conf = torch.gather(F.softmax(logits, dim=-1), -1, x0.unsqueeze(-1)).squeeze(-1)
                else:
                    conf = torch.rand((B, T), device=x.device)
                del logits

                for i, (_, _, left, right) in enumerate(rows):
                    if left is not None:
                        conf[i, :left] = -torch.inf
                    conf[i, right:] = -torch.inf
                x0 = torch.where(mask_index, x0, x)
                conf = torch.where(mask_index, conf, -torch.inf)

                commit = torch.zeros_like(x, dtype=torch.bool)
                for i in range(B):
                    k = min(schedule[i][s], int(mask_index[i].sum()))
                    if k > 0:
                        commit[i, torch.topk(conf[i], k=k).indices] = True
                x[commit] = x0[commit]
                if stop is not None:
                    stop.apply(x, answer_starts)
                if histories is not None:
                    histories.append(x.clone())
                done += 1
                if self.on_step is not None:
                    self.on_step(done, upper_bound, int(commit.sum()))

        if not cfg.return_dict:
            return x
        return ReferenceOutput(sequences=x, histories=histories, forward_passes=forwards)

    def _logits(self, x, attention_mask, given, cfg: ReferenceParams, mask_id: int) -> torch.Tensor:
        if cfg.cfg_scale > 0.0:
            un_x = x.clone()
            un_x[given] = mask_id
            both = self.model(torch.cat([x, un_x], dim=0), attention_mask=attention_mask.repeat(2, 1)).logits
            cond, uncond = torch.chunk(both, 2, dim=0)
            return uncond + (cfg.cfg_scale + 1) * (cond - uncond)
        return self.model(x, attention_mask=attention_mask).logits

    # ------------------------------------------------------------------ helpers
    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prepare(self, inputs: Sequence, cfg: ReferenceParams):
        tok = self.tokenizer
        mask_id, bos_id, eos_id = tok.mask_token_id, tok.bos_token_id, tok.eos_token_id
        if mask_id is None:
            raise DiffutronError("the tokenizer has no mask token; a masked diffusion LM needs one")
        if eos_id is None:
            raise DiffutronError("the tokenizer has no EOS token (load it with diffutron_engine.load_model)")
        if isinstance(inputs, torch.Tensor) and inputs.dim() == 1:
            inputs = [inputs]
        if inputs is None or len(inputs) == 0:
            raise DiffutronError("no inputs: give at least one token-id sequence")
        vocab = self.model.get_input_embeddings().num_embeddings
        ids = []
        for n, p in enumerate(inputs):
            if cfg.right_shift_logits and len(p) == 0:
                p = [bos_id]  # an empty prompt becomes [bos] under right shift
            t = torch.as_tensor(p, dtype=torch.long, device=self._device)
            if t.dim() != 1:
                raise DiffutronError(f"input {n} must be a 1-D sequence of token ids, got shape {tuple(t.shape)}")
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
                raise DiffutronError(f"input {n} has token ids outside the vocabulary [0, {vocab})")
            ids.append(t)
        for name in ("suppress_tokens", "begin_suppress_tokens", "cfg_keep_tokens"):
            bad = [i for i in getattr(cfg, name) or [] if i >= vocab]
            if bad:
                raise DiffutronError(f"{name} has ids outside the vocabulary [0, {vocab}): {bad}")
        return ids, bos_id, eos_id, mask_id


def _apply_repetition_penalty(logits, x, penalty: float, mask_id: int, eos_id: int) -> None:
    """Diffutron's presence-based penalty, in place: for every id on the row's canvas (minus mask and
    EOS), at every position, a logit > 0 is divided by the penalty, any other multiplied by it."""
    for b in range(x.shape[0]):
        seen = torch.unique(x[b])
        seen = seen[(seen != mask_id) & (seen != eos_id)]
        if seen.numel() == 0:
            continue
        sl = logits[b, :, seen]
        logits[b, :, seen] = torch.where(sl > 0, sl / penalty, sl * penalty)
