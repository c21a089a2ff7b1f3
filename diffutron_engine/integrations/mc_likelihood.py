"""The Monte-Carlo log-likelihood of a continuation under a masked diffusion LM, exact and batched.

The estimator (the one of dllm's MDLM/BERT evaluation harness, which Diffutron was evaluated with)
scores a continuation y (L tokens) after a context c by

    log p(y | c)  ~=  -1/M * sum_{m=1..M} sum_{j masked in copy m} CE(logits_m[j], y_j) / p_m

with M = mc_num noisy copies of c + y. The copies come in draws of B = batch_size: for one draw,
k ~ U{1..L} (torch.randint on the model's device), the B mask counts x_i = round(linspace(k, k + (B-1)
L/B, B)) wrapped into 1..L (a stratified draw of the masking ratio), then for each copy i a fresh
torch.randperm(L) (CPU generator) and the positions j of y with perm[j] < x_i are masked; p_i = x_i / L.
The context is never masked. Each copy is scored by one full forward of the model on context + y with
the masks in place; the number is minus the mean over draws of (sum over the draw's copies of the
1/p-weighted cross-entropy over its masked positions) / B. In expectation this is the MDLM ELBO of
log p(y | c), a lower bound, not the exact likelihood.

(context, continuation) strings become tokens the same way too: trailing whitespace of the context
moves to the front of the continuation, the tokenizer encodes context + continuation and the context
alone (each with its default special tokens), and the continuation is the first's tokens after the
second's length.

Noise: two ways to draw it, the same distribution either way.
- stream (seed=None; the lm-eval model's `seed_per_request=False`): drawn from torch's default
  generators, request after request in the order given, exactly as the one-request-at-a-time harness
  draws it. These are the numbers that equal dllm's harness's (to float rounding) for the same torch
  seed, the same requests in the same order and the same device; any change in what comes before a
  request (other tasks, --limit, another split across processes) changes its noise.
- per request (seed=int; the lm-eval model's default): each request's draws come from its own CPU
  generator seeded by a hash of (seed, context ids, continuation ids) (request_seed). A request scores
  the same number whatever the other requests, their order, the number of processes or the device
  (up to float rounding of the forwards); these numbers are not dllm's (other masks), only equal in
  distribution.

Why this file computes the same numbers faster:
- the noise is drawn first, for every request, as above (the stream consuming torch's generators
  exactly as the one-request-at-a-time harness does: same seed and request order, same masks); the
  forwards then run in any order;
- copies of many requests share a forward: rows sorted by length and packed up to a token budget,
  right-padded with the padding masked out of attention (positions start at 0 in every row, so a row's
  result does not depend on its neighbours);
- the LM head runs only at masked continuation positions, through the fused linear cross-entropy
  (kernels/cross_entropy.py): no [rows, length, 256k] logits tensor ever exists.
The per-position losses are summed per request in float64.

`loglikelihood_plain` beside it is the plain implementation (full logits, one request at a time), the
reference for tests and `diffutron-engine bench eval`.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import DiffutronError


@dataclass
class Scored:
    """One (context, continuation) pair, tokenized."""

    context: list[int]
    target: list[int]

    @property
    def length(self) -> int:
        return len(self.context) + len(self.target)


def encode_pair(tokenizer, context: str, continuation: str) -> Scored:
    """Tokens of (context, continuation), split as the harness splits them (module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    ctx = tokenizer(context)["input_ids"]
    return Scored(list(ctx), list(whole[len(ctx):]))


def check_requests(pairs: list[Scored], limit: int | None, texts: list[tuple[str, str]] | None = None) -> None:
    """Refuse what the estimator cannot score: an empty continuation, a pair beyond the model's context."""
    for i, p in enumerate(pairs):
        what = f"request {i}" + (f" (continuation {texts[i][1][:40]!r})" if texts else "")
        if not p.target:
            raise DiffutronError(f"{what} has an empty continuation after tokenization: there is nothing to "
                                 "score (a continuation needs at least one token beyond its context's)")
        if limit and p.length > limit:
            raise DiffutronError(f"{what} is {p.length} tokens (context {len(p.context)} + continuation "
                                 f"{len(p.target)}), beyond the model's context of {limit}; shorten the task's "
                                 "context (fewer few-shot examples)")


def check_mc(mc_num, batch_size) -> tuple[int, int]:
    for name, v in (("mc_num", mc_num), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DiffutronError(f"{name} must be an integer >= 1, got {v!r}")
    if mc_num % batch_size:
        raise DiffutronError(f"mc_num ({mc_num}) must be a multiple of batch_size ({batch_size}): the estimator "
                             f"draws mc_num / batch_size stratified batches of copies; e.g. mc_num="
                             f"{max(batch_size, mc_num - mc_num % batch_size)}")
    return mc_num, batch_size


def draw_masks(length: int, copies: int, device, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One stratified draw for a continuation of `length` tokens: masks [copies, length] (bool, CPU) and
    the masking ratios p [copies] (float32). generator None: torch's default generators, consumed as the
    harness consumes them (k on `device`); else every number comes from that CPU generator (`device`
    unused), so the draw depends on nothing else."""
    if generator is not None:
        device = "cpu"
    k = torch.randint(1, length + 1, (), device=device, generator=generator)
    # float32 arithmetic as in the harness (k is an integer tensor, length / copies a Python float)
    end = k + (copies - 1) * (length / copies)
    counts = torch.round(torch.linspace(float(k), float(end), steps=copies, device=device)).long()
    counts = ((counts - 1) % length + 1).cpu()
    masks = torch.stack([torch.randperm(length, generator=generator) < counts[i] for i in range(copies)])
    return masks, counts / length


def request_seed(seed: int, pair: Scored) -> int:
    """The seed of one request's noise: a hash of (seed, its context ids, its continuation ids), so that
    the draw depends on what is scored and nothing else (not on the other requests, their order, how
    they are split across processes, or the device)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(int(seed).to_bytes(16, "little", signed=True))
    for part in (pair.context, pair.target):
        h.update(len(part).to_bytes(8, "little"))
        h.update(b"".join(int(t).to_bytes(8, "little", signed=True) for t in part))
    return int.from_bytes(h.digest(), "little") % 2**63


class _Rows:
    """The noisy copies of all requests: token rows, masks over the continuation, ratio, owner."""

    def __init__(self):
        self.request: list[int] = []
        self.masks: list[torch.Tensor] = []
        self.ratios: list[float] = []


def draw_all(pairs: list[Scored], mc_num: int, batch_size: int, device, seed: int | None = None) -> _Rows:
    """The noise of every request: seed None, one stream of torch's generators in request order (the
    harness's); else each request from its own generator seeded by request_seed(seed, pair)."""
    rows = _Rows()
    for r, p in enumerate(pairs):
        gen = None
        if seed is not None:
            gen = torch.Generator().manual_seed(request_seed(seed, p))
        for _ in range(mc_num // batch_size):
            masks, ratios = draw_masks(len(p.target), batch_size, device, gen)
            rows.request.extend([r] * batch_size)
            rows.masks.extend(masks)
            rows.ratios.extend(ratios.tolist())
    return rows


# tokens of one batched forward (rows x padded length): large enough to keep the matmuls efficient,
# small enough that the activations stay far below the weights' size
TOKEN_BUDGET = {"cpu": 8192, "cuda": 65536}


def default_token_budget(device) -> int:
    return TOKEN_BUDGET["cuda" if str(device).startswith("cuda") else "cpu"]


def pack(lengths: list[int], token_budget: int) -> list[tuple[int, int]]:
    """(start, rows) of each forward over rows of the given lengths, longest first: a forward holds rows
    while rows x (its first row's length) fits the budget (at least one row)."""
    chunks, start = [], 0
    while start < len(lengths):
        n = max(1, min(len(lengths) - start, token_budget // lengths[start]))
        chunks.append((start, n))
        start += n
    return chunks


def loglikelihood_batched(runner, pairs: list[Scored], mask_id: int, pad_id: int, mc_num: int, batch_size: int,
                          token_budget: int = TOKEN_BUDGET["cpu"], ops=None, progress: bool = False,
                          seed: int | None = None) -> list[float]:
    """The estimate for every pair (module docstring), batched; runner: a ModernBert. ops: the backends
    (backends.Ops) of the fused cross-entropy (None: selected for the runner's device). progress: a
    tqdm bar over the scored copies on stderr, with its ETA (lm-eval runs can be long). seed: None draws
    the noise from torch's generators in request order (the harness's stream); an int seeds each
    request's draws from (seed, its tokens) (module docstring, "Noise")."""
    check_mc(mc_num, batch_size)
    if not pairs:
        return []
    device = runner.device
    rows = draw_all(pairs, mc_num, batch_size, device, seed)
    if ops is None:
        from ..backends import Ops

        ops = Ops.select(device, runner.dtype, only=("cross_entropy",))

    order = sorted(range(len(rows.request)), key=lambda i: -pairs[rows.request[i]].length)  # longest first
    totals = torch.zeros(len(pairs), dtype=torch.float64)
    weight, bias = runner.decoder.weight, runner.decoder.bias
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(order), desc="diffutron likelihood (copies)", unit="copy", file=sys.stderr,
                   dynamic_ncols=True)
    for start, n in pack([pairs[rows.request[i]].length for i in order], token_budget):
        chunk = order[start:start + n]
        width = pairs[rows.request[chunk[0]]].length
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        masked = torch.zeros((n, width), dtype=torch.bool)
        lengths = torch.empty(n, dtype=torch.long)
        for j, i in enumerate(chunk):
            p = pairs[rows.request[i]]
            c = len(p.context)
            ids[j, :p.length] = torch.tensor(p.context + p.target)
            masked[j, c:p.length] = rows.masks[i]
            lengths[j] = p.length
        targets = ids[masked]
        ids[masked] = mask_id
        scale = (1.0 / torch.tensor([rows.ratios[i] for i in chunk], dtype=torch.float32))[:, None].expand(n, width)[masked]
        owner = torch.tensor([rows.request[i] for i in chunk])[:, None].expand(n, width)[masked]
        valid = torch.arange(width)[None, :] < lengths[:, None]
        hidden = runner.forward(ids.to(device), valid.to(device))
        h = runner.head_transform(hidden[masked.to(device)])
        with torch.no_grad():
            loss = ops.cross_entropy(h, weight, targets.to(device), bias=bias, row_weight=scale.to(device),
                                     reduction="none")
        totals.index_add_(0, owner, loss.double().cpu())
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    draws = mc_num // batch_size
    return [-(t / (draws * batch_size)) for t in totals.tolist()]


# ------------------------------------------------------------------------------------------ reference
@torch.no_grad()
def loglikelihood_plain(model, pairs: list[Scored], mask_id: int, mc_num: int, batch_size: int,
                        seed: int | None = None) -> list[float]:
    """The plain implementation, as the one-request-at-a-time harness computes it: for each request and
    draw, a full forward of the B copies, full [B, T, V] logits, cross-entropy over the masked
    continuation positions divided by the ratio. model: a transformers masked LM. seed: the noise as
    in loglikelihood_batched (None: torch's generators in request order, the harness's)."""
    check_mc(mc_num, batch_size)
    device = next(model.parameters()).device
    out = []
    for p in pairs:
        seq = torch.tensor(p.context + p.target, device=device)[None, :].repeat(batch_size, 1)
        c, L = len(p.context), len(p.target)
        per_draw = []
        gen = None if seed is None else torch.Generator().manual_seed(request_seed(seed, p))
        for _ in range(mc_num // batch_size):
            masks, ratios = draw_masks(L, batch_size, device, gen)
            masked = torch.cat([torch.zeros(batch_size, c, dtype=torch.bool), masks], dim=1).to(device)
            noisy = torch.where(masked, mask_id, seq)
            logits = model(input_ids=noisy).logits
            ratio = ratios.to(device)[:, None].expand(batch_size, c + L)
            loss = F.cross_entropy(logits[masked].float(), seq[masked], reduction="none") / ratio[masked]
            per_draw.append(loss.sum().item() / batch_size)
        out.append(-sum(per_draw) / len(per_draw))
    return out


@torch.no_grad()
def greedy_plain(model, pair: Scored, mask_id: int) -> bool:
    """Whether greedy decoding fills the masked continuation with exactly its tokens: L steps, each
    committing the most confident argmax among the masked positions (the harness's check)."""
    device = next(model.parameters()).device
    c, L = len(pair.context), len(pair.target)
    seq = torch.tensor(pair.context + [mask_id] * L, device=device)[None, :]
    for _ in range(L):
        where = seq[0] == mask_id
        logits = model(input_ids=seq).logits[0][where].float()
        probs = logits.softmax(-1)
        conf, tok = probs.max(-1)
        best = int(conf.argmax())
        seq[0, where.nonzero()[best, 0]] = tok[best]
    return seq[0, c:].tolist() == pair.target
