"""How log-probabilities name tokens (Tokenizer.token_text / token_bytes): the exact bytes of every token, also
of a piece of a multi-byte character, where the tokenizer says them."""

from __future__ import annotations

import threading
import time

import pytest

from hexgen.engine.checkpoint import resolve_model
from hexgen.tokenizer import Tokenizer, byte_level_alphabet


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    return Tokenizer(resolve_model("smollm2-135m", progress=False).directory)


def test_byte_level_alphabet_is_a_bijection_with_printable_bytes_as_themselves():
    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert alphabet["A"] == 65 and alphabet["~"] == 126 and alphabet["Ġ"] == 32 and alphabet["Ċ"] == 10
    assert alphabet[chr(256)] == 0  # the first byte that is not printable


def test_byte_level_tokens_spell_their_exact_bytes(smollm2):
    text = "héllo → ☃ 日本\n<|im_end|>"
    ids = smollm2.encode(text, add_special_tokens=False)
    pieces = [smollm2.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode()
    partial = [i for i, piece in zip(ids, pieces, strict=True) if piece in (b"\x98", b"\x83")]  # inside '☃'
    assert partial and all(smollm2.token_text(i) == "\ufffd" for i in partial)
    assert smollm2.token_text(ids[-1]) == "<|im_end|>"  # a special token is spelled out
    assert smollm2.token_bytes(10**7) is None  # no such token


def test_sentencepiece_byte_tokens_and_whole_words_of_another_tokenizer(tmp_path):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    vocab = {"[UNK]": 0, "<0xE2>": 1, "hello": 2, "☃": 3}
    rust = RustTokenizer(WordLevel(vocab, unk_token="[UNK]"))
    rust.pre_tokenizer = Whitespace()
    rust.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer(tmp_path)
    assert tokenizer.token_bytes(1) == b"\xe2"
    assert tokenizer.token_bytes(2) == b"hello" and tokenizer.token_text(2) == "hello"
    assert tokenizer.token_bytes(3) == "☃".encode()


def test_encoding_equals_the_tokenizers_own_and_lets_other_threads_run(smollm2):
    """Tokenizer.encode gives tokenizers' own encode ids, and lets go of the GIL while it works: the server
    tokenizes in a thread and goes on streaming other requests meanwhile."""
    texts = ["Hello there", "héllo → ☃ 日本\n<|im_end|>", ""]
    for text in texts:
        for special in (True, False):
            assert smollm2.encode(text, special) == smollm2._tok.encode(text, add_special_tokens=special).ids
    long_text = "hello world " * 200_000  # ~0.5 s of tokenizing
    ticks, done = [], threading.Event()
    worker = threading.Thread(target=lambda: (smollm2.encode(long_text), done.set()))
    worker.start()
    while not done.is_set():
        ticks.append(1)
        time.sleep(0.001)
    worker.join()
    assert len(ticks) >= 20  # holding the GIL throughout, this thread would see one or two turns
