"""Incremental detokenization with stop strings (no torch): text deltas safe to stream."""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class TextStream:
    """Feed tokens one by one; get the new text each adds, cut before the first stop string.

    Text is held back while it could still be the start of a stop string or ends in an incomplete
    UTF-8 character, so streamed text never has to be taken back.

    Each token costs the same whatever the length of the text so far: only a window of the latest tokens is
    decoded, from `prefix` (one or more tokens already turned into text, kept as context: a tokenizer may
    decode a token differently at the start of a text, e.g. without its leading space) to the end; what the
    window adds beyond the decoded context is the new text. Decoding every token from the first instead cost
    14 µs per token at 128 tokens and 394 µs at 4,096 (SmolLM2's tokenizer, the 2-core EPYC).
    """

    def __init__(self, decoder: Decoder, stop_strings: tuple[str, ...] = ()):
        self.decoder = decoder
        self.stop_strings = tuple(s for s in stop_strings if s)
        self._longest_stop = max((len(s) for s in self.stop_strings), default=0)
        self.token_ids: list[int] = []
        self.text = ""  # the text of token_ids[:read], whole characters only
        self.prefix = 0  # token_ids[prefix:read] is the window's context
        self.read = 0
        self.shown = 0  # characters of `text` streamed so far
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append a token; return the text that may be shown now (possibly empty)."""
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        self._read_window(final=False)
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            return self._show(cut)
        return self._show(len(self.text) - max(self._longest_stop - 1, 0))

    def finish(self) -> str:
        """The held-back tail once generation has ended without a stop string."""
        if self.stopped:
            return ""
        self._read_window(final=True)
        return self._show(len(self.text))

    def _read_window(self, final: bool) -> None:
        """Append the text the tokens past `read` complete; an incomplete character waits, unless `final`."""
        context = self.decoder.decode(self.token_ids[self.prefix : self.read], skip_special_tokens=True)
        window = self.decoder.decode(self.token_ids[self.prefix :], skip_special_tokens=True)
        if len(window) <= len(context) or (window.endswith("\ufffd") and not final):
            return
        self.text += window[len(context) :]
        self.prefix, self.read = self.read, len(self.token_ids)

    def _first_stop(self) -> int | None:
        start = max(0, self.shown - self._longest_stop)
        hits = [i for i in (self.text.find(s, start) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else None

    def _show(self, end: int) -> str:
        """The text from what was shown up to `end`."""
        if end <= self.shown:
            return ""
        delta = self.text[self.shown : end]
        self.shown = end
        return delta
