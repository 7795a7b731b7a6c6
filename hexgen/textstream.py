"""Incremental detokenization with stop strings (no torch): text deltas safe to stream."""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class TextStream:
    """Feed tokens one by one; get the new text each adds, cut before the first stop string.

    Text is held back while it could still be the start of a stop string or ends in an incomplete
    UTF-8 character, so streamed text never has to be taken back.
    """

    def __init__(self, decoder: Decoder, stop_strings: tuple[str, ...] = ()):
        self.decoder = decoder
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.token_ids: list[int] = []
        self.emitted = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append a token; return the text that may be shown now (possibly empty)."""
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        text = self.decoder.decode(self.token_ids, skip_special_tokens=True)
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            return self._emit(text[:cut])
        holdback = max((len(s) - 1 for s in self.stop_strings), default=0)
        safe = text[: len(text) - holdback] if holdback else text
        if safe.endswith("\ufffd"):
            return ""
        return self._emit(safe)

    def finish(self) -> str:
        """The held-back tail once generation has ended without a stop string."""
        if self.stopped:
            return ""
        text = self.decoder.decode(self.token_ids, skip_special_tokens=True)
        return self._emit(text)

    def _first_stop(self, text: str) -> int | None:
        start = max(0, len(self.emitted) - max((len(s) for s in self.stop_strings), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else None

    def _emit(self, text: str) -> str:
        if not text.startswith(self.emitted) or len(text) <= len(self.emitted):
            return ""
        delta = text[len(self.emitted) :]
        self.emitted = text
        return delta
