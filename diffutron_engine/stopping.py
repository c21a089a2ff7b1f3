"""Where an answer ends: Diffutron's stop-string rule (shared by the oracle and the engine) and the
engine's early-stop test."""

from __future__ import annotations

import torch

STOP_REPLACEMENT = "\n[/Answer]\n"


class StopRule:
    """Diffutron's stop rule: decode each row (special tokens kept); at the first occurrence of a stop
    string, write the tokens of "\\n[/Answer]\\n" from that token position and pad the rest."""

    def __init__(self, tokenizer, stop_strings: list[str]):
        self.tok = tokenizer
        self.stops = list(stop_strings)
        self.replacement = tokenizer.encode(STOP_REPLACEMENT, add_special_tokens=False)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def apply(self, x: torch.Tensor) -> list[int]:
        """Apply to every row of canvas x [B, T] in place; returns the rows that were cut."""
        return [b for b in range(x.shape[0]) if self.apply_row(x, b)]

    def apply_row(self, x: torch.Tensor, b: int) -> bool:
        bos = self.tok.bos_token_id
        row = x[b].tolist()
        text = self.tok.decode(row, skip_special_tokens=False)
        hits = [i for i in (text.find(s) for s in self.stops) if i != -1]
        if not hits:
            return False
        prefix_ids = self.tok.encode(text[: min(hits)], add_special_tokens=False)
        pos = len(prefix_ids)
        # The prefix is encoded without special tokens: a leading BOS on the canvas shifts by one.
        if bos is not None and row and row[0] == bos and (not prefix_ids or prefix_ids[0] != bos):
            pos += 1
        T = x.shape[1]
        if pos >= T:
            return False
        end = min(pos + len(self.replacement), T)
        x[b, pos:end] = torch.as_tensor(self.replacement[: end - pos], dtype=x.dtype, device=x.device)
        if end < T:
            x[b, end:] = self.pad_id
        return True


def answer_is_final(tokenizer, row: list[int], start: int, mask_id: int) -> bool:
    """True when the answer text of row[start:] can no longer change, so the row needs no more forward
    passes: no mask is left before the first EOS (text recovery cuts there), or the committed text
    before the first mask already holds the end-of-turn marker (text is cut there too), or no mask is
    left at all. A pad tail alone is not an end: pads are skipped in decoding, later tokens would count.
    """
    seg = row[start:]
    first_mask = seg.index(mask_id) if mask_id in seg else len(seg)
    if first_mask == len(seg) or tokenizer.eos_token_id in seg[:first_mask]:
        return True
    from .loading import END_OF_TURN

    return END_OF_TURN in tokenizer.decode(seg[:first_mask], skip_special_tokens=True)
