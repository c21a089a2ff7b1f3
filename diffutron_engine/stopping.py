"""Where an answer ends: Diffutron's stop-string rule (shared by the oracle and the engine) and the
engine's early-stop test."""

from __future__ import annotations

import torch

STOP_REPLACEMENT = "\n[/Answer]\n"


class StopRule:
    """Diffutron's stop rule: at the first occurrence of a stop string in a row's generated text
    (decoded with special tokens kept), write the tokens of "\n[/Answer]\n" from the token where the
    occurrence starts, and set the rest of the row to the pad id.

    Two choices where the spec leaves room, both made so that the rule does what a user means:
    - only the generated region is searched (a prompt may well contain "<s>" or a chat marker), and
      never across a still-masked position (the text of a mask token is not generated text);
    - the token where the occurrence starts is found by decoding (the shortest prefix of tokens whose
      text holds the stop string, then the latest token from which it is still found), not by
      re-encoding the text before it, which counts wrong when the canvas holds a non-canonical
      tokenization (common in diffusion output: "i", "y", "i" instead of "iyi").
    """

    def __init__(self, tokenizer, stop_strings: list[str]):
        self.tok = tokenizer
        self.stops = list(stop_strings)
        self.replacement = tokenizer.encode(STOP_REPLACEMENT, add_special_tokens=False)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.mask_id = tokenizer.mask_token_id

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def _has_stop(self, text: str) -> bool:
        return any(s in text for s in self.stops)

    def find(self, row: list[int], start: int) -> int | None:
        """Token index in `row` where the first stop string of the generated text starts, or None."""
        run_start = start
        for end in range(start, len(row) + 1):
            if end < len(row) and row[end] != self.mask_id:
                continue
            run = row[run_start:end]  # a run of committed tokens between masks
            if run and self._has_stop(self._decode(run)):
                last = next(k for k in range(1, len(run) + 1) if self._has_stop(self._decode(run[:k])))
                first = max(j for j in range(last) if self._has_stop(self._decode(run[j:last])))
                return run_start + first
            run_start = end + 1
        return None

    def apply(self, x: torch.Tensor, starts: list[int]) -> list[int]:
        """Apply to every row b of canvas x [B, T] in place, searching from starts[b]; returns the
        rows that were cut."""
        return [b for b in range(x.shape[0]) if self.apply_row(x, b, starts[b])]

    def apply_row(self, x: torch.Tensor, b: int, start: int) -> bool:
        row = x[b].tolist()
        pos = self.find(row, start)
        if pos is None:
            return False
        T = x.shape[1]
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
