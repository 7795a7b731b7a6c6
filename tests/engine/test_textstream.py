"""TextStream: stop strings, no take-backs, held-back UTF-8, with a stub byte decoder and SmolLM2's tokenizer."""

from __future__ import annotations

import pytest

from hexgen.textstream import TextStream


class ByteDecoder:
    """Token i is the byte string pieces[i]; decoding replaces broken UTF-8 with U+FFFD, as HF does."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return b"".join(self.pieces[i] for i in token_ids).decode("utf-8", errors="replace")


def feed(stream: TextStream, ids: list[int]) -> list[str]:
    return [stream.add(i) for i in ids]


def test_stop_string_split_across_tokens():
    pieces = [b"Hel", b"lo W", b"or", b"ld! more"]
    stream = TextStream(ByteDecoder(pieces), ("World",))
    deltas = feed(stream, [0, 1, 2, 3])
    assert "".join(deltas) == "Hello " and stream.stopped
    assert stream.add(0) == "" and stream.finish() == ""


def test_earliest_of_several_stop_strings_wins():
    stream = TextStream(ByteDecoder([b"a, b. c", b"; d"]), (";", "."))
    assert "".join(feed(stream, [0, 1])) == "a, b"


def test_held_back_tail_comes_with_finish():
    stream = TextStream(ByteDecoder([b"abc", b"def"]), ("STOP",))
    assert feed(stream, [0, 1]) == ["", "abc"]  # 3 characters could still start "STOP"
    assert stream.finish() == "def" and not stream.stopped


def test_incomplete_utf8_is_held_back():
    euro = "€".encode()  # 3 bytes
    stream = TextStream(ByteDecoder([b"x", euro[:1], euro[1:2], euro[2:], b"y"]))
    assert feed(stream, [0, 1, 2, 3, 4]) == ["x", "", "", "€", "y"]


def test_nothing_streamed_is_taken_back():
    pieces = [b"The ", b"end", b" is ", b"ne", b"ar", b" \xf0\x9f", b"\x98\x80", b" END", b"ING"]
    stream = TextStream(ByteDecoder(pieces), ("END",))
    shown = ""
    full = ByteDecoder(pieces).decode(list(range(len(pieces))))
    for i in range(len(pieces)):
        shown += stream.add(i)
        assert full.startswith(shown) and "\ufffd" not in shown
    assert shown == "The end is near 😀 " and stream.stopped


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from hexgen.engine.checkpoint import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model("smollm2-135m", progress=False).directory))


def test_real_tokenizer_streams_what_decode_gives(tokenizer):
    text = "Café crème, naïve 😀 — 東京 is the capital. Done."
    ids = tokenizer(text)["input_ids"]
    stream = TextStream(tokenizer)
    deltas = feed(stream, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + stream.finish() == tokenizer.decode(ids, skip_special_tokens=True)


def test_real_tokenizer_stop_string(tokenizer):
    ids = tokenizer("Paris is the capital of France. It is big.")["input_ids"]
    stream = TextStream(tokenizer, ("capital of",))
    assert "".join(feed(stream, ids)) == "Paris is the " and stream.stopped


class CountingDecoder(ByteDecoder):
    """Records how many tokens each decode call was given."""

    def __init__(self, pieces: list[bytes]):
        super().__init__(pieces)
        self.lengths: list[int] = []

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(token_ids))
        return super().decode(token_ids, skip_special_tokens)


def test_each_token_decodes_a_short_window_whatever_the_length():
    euro = "€".encode()
    pieces = [b"word ", euro[:1], euro[1:2], euro[2:]]
    ids = [0, 1, 2, 3] * 500  # 2,000 tokens with characters split over three tokens
    decoder = CountingDecoder(pieces)
    stream = TextStream(decoder, ("STOP",))
    text = "".join(feed(stream, ids)) + stream.finish()
    assert text == ByteDecoder(pieces).decode(ids)
    assert max(decoder.lengths) <= 4  # one token of context + an incomplete character's 3 tokens


class LeadingSpaceDecoder:
    """Like SentencePiece: '_' marks a space, and a decoded text never starts with one."""

    def __init__(self, pieces: list[str]):
        self.pieces = pieces

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in token_ids).replace("_", " ").lstrip(" ")


def test_a_token_that_decodes_differently_at_the_start_keeps_its_space():
    pieces = ["_The", "_cat", "_sat", ".", "_It", "_pur", "red"]
    ids = [0, 1, 2, 3, 4, 5, 6]
    stream = TextStream(LeadingSpaceDecoder(pieces))
    text = "".join(feed(stream, ids)) + stream.finish()
    assert text == "The cat sat. It purred"
