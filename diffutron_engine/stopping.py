"""Where an answer ends: Diffutron's stop-string rule (shared by the oracle and the engine) and the
engine's early-stop test."""

from __future__ import annotations

import torch

STOP_REPLACEMENT = "\n[/Answer]\n"


class StopRule:
    """Diffutron's stop rule: at the first occurrence of a stop string in a row's generated text
    (decoded with special tokens kept), write the tokens of "\n[/Answer]\n" from the token where the
    occurrence starts, and set the rest of the row to the pad id.

    Two choices where the stop rule leaves room, both made so that the rule does what a user means:
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

    def find(self, row: list[int], start: int, end: int | None = None) -> int | None:
        """Token index in `row` where the first stop string of the generated text starts, or None
        (searching row[start:end]; a run cut by `end` is searched as far as it goes)."""
        run_start = start
        limit = len(row) if end is None else end
        for cut in range(start, limit + 1):
            if cut < limit and row[cut] != self.mask_id:
                continue
            run = row[run_start:cut]  # a run of committed tokens between masks
            if run and self._has_stop(self._decode(run)):
                last = next(k for k in range(1, len(run) + 1) if self._has_stop(self._decode(run[:k])))
                first = max(j for j in range(last) if self._has_stop(self._decode(run[j:last])))
                return run_start + first
            run_start = cut + 1
        return None

    @property
    def window(self) -> int:
        """Tokens on each side of a new token that an occurrence through it can reach: a stop string
        of c characters spans at most c tokens of one character or more, and a character at most 4
        byte tokens; 4 more keep the decoded window's edges away from it."""
        return 4 * max(len(s) for s in self.stops) + 4

    def find_new(self, row: list[int], start: int, new: list[int]) -> int | None:
        """`find` after a step that committed positions `new` (sorted) into a row where the previous
        `find` found nothing: an occurrence now must pass through a new token, so only the runs holding
        new tokens are decoded, and of each only a window around them. Cost proportional to the new
        tokens, not to the answer's length; same result as `find` (tests/engine/test_stopping.py)."""
        if not new:
            return None
        K = self.window
        n = len(row)
        i = 0
        while i < len(new):
            p = new[i]
            if p < start or row[p] == self.mask_id:  # outside the answer, or the mask id committed
                i += 1
                continue
            lo = p  # the run of committed tokens around p
            while lo > start and row[lo - 1] != self.mask_id:
                lo -= 1
            hi = p + 1
            while hi < n and row[hi] != self.mask_id:
                hi += 1
            last_new = p
            while i < len(new) and new[i] < hi:
                last_new = new[i]
                i += 1
            a, b = max(lo, p - K), min(hi, last_new + K + 1)
            found = self.find(row, a, end=b)
            if found is not None:
                return found
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
