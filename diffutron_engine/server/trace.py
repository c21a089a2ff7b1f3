"""The per-step trace on the wire: what a request that gives `"trace": true` gets with its answer.

Streaming, every step sends a chunk (its text delta may be empty) whose choice carries `trace`, one
step; without streaming, each choice carries `trace`, the list of every step. One step:

    {"step": 3,                       the request's forward pass, from 1
     "block": [lo, hi],               canvas positions of the block this step worked
     "positions": [...],              committed this step
     "tokens": [...], "texts": [...], their token ids and display texts
     "confidences": [...],            the value the commit rule ranked (a probability; the draw under
                                      remasking "random")
     "start": {...},                  first step only: the canvas before it
     "canvas": {...}}                 only when the server rewrote the canvas (a stop string)

A canvas is {"tokens": [...], "texts": [...], "prompt_tokens": n, "mask_token": id}: start from `start`,
write each step's tokens at its positions, take `canvas` whole where it is given, and the canvas at
every step is redrawn (the playground does so).
"""

from __future__ import annotations

from functools import lru_cache

# markers subword tokenizers put for a leading space or a newline, shown as what they stand for
_MARKERS = (("\u2581", " "), ("\u0120", " "), ("\u010a", "\n"))


def byte_decoder(tokenizer) -> dict[str, int] | None:
    """For a byte-level BPE tokenizer (GPT-2's scheme: every byte written as one printable character), the
    character -> byte table that undoes it; None for other tokenizers."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if type(getattr(backend, "decoder", None)).__name__ != "ByteLevel":
        return None
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    table = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in table.values())
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


class TraceEncoder:
    """Turns an engine StepTrace into the wire's dict, with each token's display text (cached by id)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.mask_id = tokenizer.mask_token_id
        self._bytes = byte_decoder(tokenizer)
        self._text = lru_cache(maxsize=65536)(self._piece)

    def _piece(self, token: int) -> str:
        if token == self.mask_id:
            return ""
        piece = self.tokenizer.convert_ids_to_tokens(int(token))
        if piece is None:
            return ""
        if piece.startswith("<0x") and piece.endswith(">"):  # a byte fallback piece: show what it decodes to
            return self.tokenizer.decode([int(token)])
        if self._bytes is not None and all(c in self._bytes for c in piece):
            # byte-level BPE: the piece's bytes as UTF-8 ("iÅŁlev" is "işlev"); a character split across
            # tokens shows as U+FFFD in each
            return bytes(self._bytes[c] for c in piece).decode("utf-8", "replace")
        for marker, shown in _MARKERS:
            piece = piece.replace(marker, shown)
        return piece

    def canvas(self, tokens: list[int], prompt_tokens: int) -> dict:
        return {"tokens": list(tokens), "texts": [self._text(t) for t in tokens], "prompt_tokens": prompt_tokens,
                "mask_token": self.mask_id}

    def step(self, trace, prompt_tokens: int) -> dict:
        out = {"step": trace.step, "block": list(trace.block), "positions": list(trace.positions),
               "tokens": list(trace.tokens), "texts": [self._text(t) for t in trace.tokens],
               "confidences": [round(float(c), 6) for c in trace.confidences]}
        if trace.start is not None:
            out["start"] = self.canvas(trace.start, prompt_tokens)
        if trace.canvas is not None:
            out["canvas"] = self.canvas(trace.canvas, prompt_tokens)
        return out
