"""A request's answer as it settles, at a cost proportional to the new tokens.

In a masked diffusion LM the answer is final only up to its first still-masked position: tokens are
committed anywhere inside the current block, so the text a user can be shown (and the test of whether
the answer has ended) is that of the committed prefix. This module keeps that prefix incrementally:

- `IncrementalDetokenizer`: text of a growing token list, each token decoded a bounded number of
  times (the previous piece is decoded again as left context, so merge and leading-space rules of the
  tokenizer see what they would in a full decode; a piece that ends in a partial character waits);
- `AnswerState`: the settled frontier (first mask of the answer), whether it reached an EOS, the
  settled text, the end-of-turn marker, and the stable text that streaming may send.

Nothing here decodes the whole answer at every step: early stop is decided from token ids (EOS) and
from the incremental text (the end-of-turn marker, confirmed once by a full decode when first seen).
"""

from __future__ import annotations

from ..loading import END_OF_TURN
from ..stopping import answer_is_final

_MARKER_PREFIXES = tuple(END_OF_TURN[:k] for k in range(1, len(END_OF_TURN)))


class IncrementalDetokenizer:
    """Text of token ids pushed piece by piece (decoded without special tokens)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # start of the context decoded with the next piece
        self.read = 0  # ids before this are in `text`
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, ids: list[int]) -> str:
        """Append ids; returns the text they add (possibly empty while a character is incomplete)."""
        if not ids:
            return ""
        self.ids.extend(ids)
        before = self._decode(self.ids[self.prefix:self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            return ""
        delta = after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta


class AnswerState:
    """The settled part of one request's answer: canvas positions [start, frontier) hold no mask."""

    def __init__(self, tokenizer, tokens: list[int], start: int, mask_id: int, holdback: int = 0):
        """holdback: settled tokens kept out of the streamed text (the stop rule's reach: a stop string
        found later can rewrite tokens up to that far before the frontier)."""
        self.tok = tokenizer
        self.start = start
        self.mask_id = mask_id
        self.eos_id = tokenizer.eos_token_id
        self.frontier = start
        self.reached_eos = False  # an EOS settled: text recovery cuts there
        self.marker_at: int | None = None  # the end-of-turn marker's offset in the settled text
        self.detok = IncrementalDetokenizer(tokenizer)
        self.holdback = holdback
        self.stream = IncrementalDetokenizer(tokenizer) if holdback else self.detok  # what may be shown
        self.sent = ""  # stable text already reported
        self.advance(tokens)

    def advance(self, tokens: list[int]) -> None:
        """Move the frontier over newly committed tokens (amortized O(1) per token)."""
        if self.reached_eos:
            return
        n, f = len(tokens), self.frontier
        new = []
        while f < n and tokens[f] != self.mask_id:
            if tokens[f] == self.eos_id:
                self.reached_eos = True
                break
            new.append(tokens[f])
            f += 1
        self.frontier = f
        if new:
            old = len(self.detok.text)
            self.detok.push(new)
            if self.marker_at is None:
                at = self.detok.text.find(END_OF_TURN, max(0, old - len(END_OF_TURN)))
                self.marker_at = at if at >= 0 else None
            if self.holdback:
                shown, ready = len(self.stream.ids), len(self.detok.ids) - self.holdback
                if ready > shown:
                    self.stream.push(self.detok.ids[shown:ready])

    def is_final(self, tokens: list[int], masks_left: int) -> bool:
        """Whether the answer's text can no longer change: no mask left in it, an EOS settled, or the
        end-of-turn marker in the settled text (confirmed once with a full decode: an incremental
        decode can differ from a full one at piece edges, and stopping wrongly would change the text)."""
        if masks_left == 0 or self.reached_eos:
            return True
        if self.marker_at is None:
            return False
        if answer_is_final(self.tok, tokens, self.start, self.mask_id):
            return True
        self.marker_at = None  # a false alarm: keep going
        return False

    def stable_text(self) -> str:
        """Settled text that later tokens cannot change: cut at the end-of-turn marker, without trailing
        whitespace or a possibly incomplete marker (the final text is stripped and cut there)."""
        text = self.stream.text.lstrip()
        cut = text.find(END_OF_TURN)
        if cut >= 0:
            return text[:cut].rstrip()
        if text.endswith(_MARKER_PREFIXES):
            text = text[: text.rfind("[")]
        return text.rstrip()

    def take_delta(self, final_text: str | None = None) -> str:
        """Text not yet reported (the stable text, or the final text when the request finished)."""
        text = self.stable_text() if final_text is None else final_text
        if not text.startswith(self.sent) or len(text) == len(self.sent):
            return ""
        delta = text[len(self.sent):]
        self.sent = text
        return delta
