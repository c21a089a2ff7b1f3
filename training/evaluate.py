"""Intrinsic evaluation of a Diffutron checkpoint: masked-LM perplexity and masked-token accuracy.

This is the metric of the Diffutron paper: documents are packed into windows of `max_length` tokens,
a fixed-seed draw masks `mlm_probability` of each window's tokens, and the model is scored on
recovering them: perplexity = exp(total NLL / masked tokens), accuracy = argmax hits / masked tokens.

Why every chosen position becomes [MASK] (no BERT 80/10/10 random/keep split): a masked diffusion LM
only ever sees [MASK] at positions it must fill, both in training and in sampling, so that is what
the metric measures. Why the masks are drawn per sequence, in order, from one generator before any
batching: the numbers must not depend on --batch-size or on the device.

Why hidden states -> head -> fused cross-entropy at masked rows only: with a 256k vocabulary the
[batch, length, vocab] logits of a plain forward are gigabytes; here only a bounded block of logits
for masked rows ever exists (the loss in kernels.cross_entropy, the argmax in fixed row chunks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffutron_engine.errors import DiffutronError

ARGMAX_CHUNK_ROWS = 256  # logits block for accuracy: 256 x 256k x 4 bytes = 256 MB at most


def _first_id(tokenizer, *names):
    for name in names:
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return None


def special_ids(tokenizer) -> set[int]:
    """Ids never masked nor scored: bos/eos/pad/mask/unk and every other special token."""
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    ids.update(i for i in (_first_id(tokenizer, n) for n in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                             "cls_token_id", "sep_token_id")) if i is not None)
    return ids


def build_sequences(tokenizer, texts: list[str], max_length: int = 512, max_sequences: int | None = None):
    """Documents (no special tokens) joined by eos into one stream, cut into windows of max_length - 2,
    each framed as [bos] + window + [eos]; the last partial window is kept. Deterministic."""
    if max_length < 3:
        raise DiffutronError(f"max_length must be >= 3 (bos + one token + eos), got {max_length}")
    bos = _first_id(tokenizer, "bos_token_id", "cls_token_id")
    eos = _first_id(tokenizer, "eos_token_id", "sep_token_id")
    if bos is None or eos is None:
        raise DiffutronError("the tokenizer needs a bos (or cls) and an eos (or sep) token to frame sequences")
    width, stream = max_length - 2, []
    need = None if max_sequences is None else width * max_sequences
    for start in range(0, len(texts), 1000):  # in slices: a --max-sequences cap tokenizes only what it needs
        docs = [t for t in texts[start:start + 1000] if t and t.strip()]
        for ids in (tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"] if docs else []):
            if ids:
                stream.extend(([eos] if stream else []) + list(ids))
        if need is not None and len(stream) >= need:
            break
    special = special_ids(tokenizer)
    windows = [stream[i:i + width] for i in range(0, len(stream), width)]
    # a window holding only separators has nothing to score (possible only with tiny max_length)
    seqs = [[bos] + w + [eos] for w in windows if any(t not in special for t in w)]
    if not seqs:
        raise DiffutronError("no tokens to score: the texts are empty; give at least one non-empty document")
    return seqs[:max_sequences] if max_sequences is not None else seqs


def draw_masks(sequences, special: set[int], mlm_probability: float = 0.15, seed: int = 0) -> list[torch.Tensor]:
    """One bool mask per sequence, drawn in order from one generator seeded with `seed`: each
    non-special position independently with probability p, and at least one per sequence."""
    if not 0.0 < mlm_probability < 1.0:
        raise DiffutronError(f"mlm_probability must lie in (0, 1), e.g. 0.15; got {mlm_probability}")
    gen = torch.Generator().manual_seed(seed)  # a CPU generator: the same draw on every device
    masks = []
    for seq in sequences:
        ids = torch.tensor(seq)
        scorable = ~torch.isin(ids, torch.tensor(sorted(special), dtype=ids.dtype))
        mask = (torch.rand(len(seq), generator=gen) < mlm_probability) & scorable
        if not mask.any():  # short windows could draw nothing; score one random position instead
            candidates = scorable.nonzero().flatten()
            mask[candidates[torch.randint(len(candidates), (1,), generator=gen)]] = True
        masks.append(mask)
    return masks


def _score_batch(model, input_ids, attention_mask, masked, targets, ops):
    """(sum of NLL, number of argmax hits) over the masked positions of one padded batch. ops: the backends
    (backends.Ops) of the fused cross-entropy (ModernBERT), or None for any other masked LM."""
    if ops is None:  # any other masked LM: full logits (slower, [B, T, V] in memory), then the same sums
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[masked].float()
        return F.cross_entropy(logits, targets, reduction="sum").item(), (logits.argmax(-1) == targets).sum().item()
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    h = model.head(hidden[masked])  # the head's transform only where there is something to score
    weight, bias = model.decoder.weight, model.decoder.bias
    nll = ops.cross_entropy(h, weight, targets, bias=bias, reduction="sum").item()
    correct = 0
    for i in range(0, h.shape[0], ARGMAX_CHUNK_ROWS):
        logits = F.linear(h[i:i + ARGMAX_CHUNK_ROWS], weight, bias)
        correct += (logits.argmax(-1) == targets[i:i + ARGMAX_CHUNK_ROWS]).sum().item()
    return nll, correct


def masked_lm_perplexity(model, tokenizer, texts: list[str], mlm_probability=0.15, max_length=512, seed=0,
                         batch_size=8, max_sequences=None) -> dict:
    """Masked-LM perplexity and accuracy of `model` on `texts`; see the module docstring.

    Returns {"perplexity", "accuracy", "tokens" (masked = scored), "sequences", "loss" (mean NLL)}.
    """
    if batch_size < 1:
        raise DiffutronError(f"batch_size must be >= 1, got {batch_size}")
    if max_sequences is not None and max_sequences < 1:
        raise DiffutronError(f"max_sequences must be >= 1, got {max_sequences}")
    if tokenizer.mask_token_id is None:
        raise DiffutronError("the tokenizer has no mask token; set `mask_token` in the tokenizer's config")
    if hasattr(model, "get_base_model"):  # a peft model: the adapters stay active inside the base model
        model = model.get_base_model()
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit and max_length > limit:
        raise DiffutronError(f"max_length {max_length} exceeds the model's context of {limit}; lower it")
    sequences = build_sequences(tokenizer, texts, max_length, max_sequences)
    masks = draw_masks(sequences, special_ids(tokenizer), mlm_probability, seed)
    device = next(model.parameters()).device
    from diffutron_engine.backends import Ops

    # the fused cross-entropy's backend, chosen once for the run (ModernBERT only)
    ops = (Ops.select(device, next(model.parameters()).dtype, only=("cross_entropy",))
           if model.config.model_type == "modernbert" else None)
    pad, mask_id = _first_id(tokenizer, "pad_token_id", "eos_token_id"), int(tokenizer.mask_token_id)
    was_training, total_nll, correct, tokens = model.training, 0.0, 0, 0
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(sequences), batch_size):
                seqs, msks = sequences[start:start + batch_size], masks[start:start + batch_size]
                width = max(len(s) for s in seqs)
                ids = torch.full((len(seqs), width), pad, dtype=torch.long)
                masked = torch.zeros((len(seqs), width), dtype=torch.bool)
                for row, (s, m) in enumerate(zip(seqs, msks)):
                    ids[row, :len(s)], masked[row, :len(s)] = torch.tensor(s), m
                attention_mask = (torch.arange(width) < torch.tensor([len(s) for s in seqs])[:, None]).long()
                targets = ids[masked]
                ids[masked] = mask_id
                nll, hits = _score_batch(model, ids.to(device), attention_mask.to(device), masked.to(device),
                                         targets.to(device), ops)
                total_nll, correct, tokens = total_nll + nll, correct + hits, tokens + len(targets)
    finally:
        model.train(was_training)
    loss = total_nll / tokens
    return {"perplexity": math.exp(loss) if loss < 700 else float("inf"), "accuracy": correct / tokens,
            "tokens": tokens, "sequences": len(sequences), "loss": loss}
