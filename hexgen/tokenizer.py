"""Text <-> token ids and chat templates from an HF folder, with `tokenizers` and jinja2 (no torch).

Behaves like transformers' fast tokenizer for what hexgen needs: `encode` applies the tokenizer's own
special-token post-processing, `apply_chat_template` renders the folder's template the way
transformers does (sandboxed jinja2, trim_blocks, lstrip_blocks) and encodes without extra specials.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as RustTokenizer

from hexgen.errors import ConfigError

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # a SentencePiece byte-fallback token


def byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2, Llama 3, SmolLM2): each byte's stand-in character -> the byte. The
    printable bytes stand for themselves; the others, in byte order, for the characters from U+0100 on (so a
    space is U+0120, 'Ġ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


class Tokenizer:
    def __init__(self, directory: str | Path):
        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"{directory} has no tokenizer.json; text prompts need a tokenizer")
        try:
            self._tok = RustTokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on a damaged file
            raise ConfigError(f"{path}: not a readable tokenizer ({err})") from None
        config = _read_json(directory / "tokenizer_config.json")
        self.special_tokens = {k: _token_text(config.get(k)) for k in SPECIAL_TOKEN_KEYS if config.get(k)}
        template_file = directory / "chat_template.jinja"
        self.chat_template: str | None = (
            template_file.read_text() if template_file.is_file() else config.get("chat_template")
        )
        self._compiled = None
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        self._byte_level = "ByteLevel" in json.dumps(decoder)  # alone or inside a Sequence of decoders
        self._added = set(self._tok.get_added_tokens_decoder())
        self._alphabet = byte_level_alphabet()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch lets go of the GIL while it works, encode does not: a server tokenizing a long prompt in a
        # thread goes on streaming the others (a 10 MB prompt: 4 s of tokenizing; 45 -> 49 µs for a short one)
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's text on its own, special tokens spelled out (a piece of a multi-byte character shows as
        U+FFFD; a tokenizer may drop a leading space at the start of a text)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes | None:
        """One token's exact bytes (also a piece of a UTF-8 character), where the tokenizer says them: byte-level
        BPE, SentencePiece byte tokens, and any token whose text is whole characters; else None."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return None
        if self._byte_level and token_id not in self._added and all(c in self._alphabet for c in piece):
            return bytes(self._alphabet[c] for c in piece)
        if match := BYTE_PIECE.fullmatch(piece):
            return bytes([int(match.group(1), 16)])
        text = self.token_text(token_id)
        return None if "\ufffd" in text else text.encode()

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self.chat_template is None:
            raise ConfigError("this model's tokenizer has no chat template; send a raw prompt instead")
        if self._compiled is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._compiled = env.from_string(self.chat_template)
        try:
            return self._compiled.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except TemplateError as err:
            raise ConfigError(f"the chat template rejected these messages: {err}") from None

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)


def _raise(message: str) -> None:
    raise TemplateError(message)


def _token_text(value: Any) -> str:
    return value["content"] if isinstance(value, dict) else str(value)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
