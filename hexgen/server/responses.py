"""OpenAI response bodies and stream chunks for completions and chat completions."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from hexgen.engine.messages import TokenLogprobs


class TokenSpeller(Protocol):
    """How log-probabilities name tokens (hexgen.tokenizer.Tokenizer)."""

    def token_text(self, token_id: int) -> str: ...

    def token_bytes(self, token_id: int) -> bytes | None: ...


def completion_logprobs(
    items: list[tuple[int, TokenLogprobs | None]], speller: TokenSpeller, text_offset: int
) -> tuple[dict[str, Any], int]:
    """/v1/completions' `logprobs` of these tokens, whose text starts `text_offset` characters into the
    completion: each token's text, its log-probability, a {text: log-probability} of the N most likely tokens and
    the sampled one (so up to N + 1 entries, as OpenAI's legacy API), and where each token's text starts; and
    where the next token's text would start. A token without log-probabilities (an echoed prompt's first) has
    None for both."""
    tokens, offsets, token_logprobs, top_logprobs = [], [], [], []
    for token_id, logprobs in items:
        text = speller.token_text(token_id)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        if logprobs is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(logprobs.logprob)
        top = {speller.token_text(i): value for i, value in logprobs.top}
        top.setdefault(text, logprobs.logprob)
        top_logprobs.append(top)
    body = {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}
    return body, text_offset


def chat_logprobs(items: list[tuple[int, TokenLogprobs]], speller: TokenSpeller) -> dict:
    """/v1/chat/completions' `logprobs`: per token its text, log-probability, UTF-8 bytes (None where the
    tokenizer cannot say them) and the N most likely tokens' (top_logprobs), most likely first."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        raw = speller.token_bytes(token_id)
        return {"token": speller.token_text(token_id), "logprob": logprob, "bytes": None if raw is None else list(raw)}

    content = [entry(token_id, lp.logprob) | {"top_logprobs": [entry(i, value) for i, value in lp.top]}
               for token_id, lp in items]
    return {"content": content, "refusal": None}


@dataclass
class ResponseShape:
    """Which endpoint the response belongs to, and the fields every chunk repeats."""

    chat: bool
    model: str
    prompt_tokens: int
    speller: TokenSpeller | None = None  # set where the request asked for log-probabilities
    echo: list[str] | None = None  # per choice, its prompt's text, where a completion request echoes it
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))
    _text_offsets: dict[int, int] = field(default_factory=dict)  # choice -> its streamed tokens' text length

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {"id": prefix + self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def logprobs(self, items: list[tuple[int, TokenLogprobs | None]], index: int | None = None
                 ) -> dict[str, Any] | None:
        """The `logprobs` of a whole choice, or with `index` of the next stream chunk of that choice (a
        completion's text offsets go on from its last chunk's); None where the request did not ask."""
        if self.speller is None:
            return None
        if self.chat:
            return chat_logprobs(items, self.speller)
        body, end = completion_logprobs(items, self.speller, self._text_offsets.get(index, 0))
        if index is not None:
            self._text_offsets[index] = end
        return body

    def full(self, answers: list[tuple[str, str, list[tuple[int, TokenLogprobs | None]]]], completion_tokens: int
             ) -> dict[str, Any]:
        """The whole response: one choice per (text, finish reason, its tokens' log-probabilities, an echoed
        prompt's first); completion_tokens over all of them."""
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text},
                        "logprobs": self.logprobs(logprobs), "finish_reason": finish_reason}
                       for i, (text, finish_reason, logprobs) in enumerate(answers)]
            body = self._envelope("chat.completion", choices)
        else:
            echo = self.echo or [""] * len(answers)
            choices = [{"index": i, "text": echo[i] + text, "logprobs": self.logprobs(logprobs),
                        "finish_reason": finish_reason} for i, (text, finish_reason, logprobs) in enumerate(answers)]
            body = self._envelope("text_completion", choices)
        body["usage"] = self.usage(completion_tokens)
        return body

    def chunk(self, text: str, finish_reason: str | None, first: bool = False, index: int = 0,
              logprobs: list[tuple[int, TokenLogprobs | None]] | None = None) -> dict[str, Any]:
        """A stream chunk of choice `index` (`first`: its first chunk, which names the role in a chat and starts
        with an echoed prompt), with the log-probabilities of the tokens it adds where the request asked (in
        order: chunk by chunk)."""
        logprobs = self.logprobs(logprobs or [], index)
        if first and self.echo is not None:
            text = self.echo[index] + text
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = self.usage(completion_tokens)
        return body


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event line pair."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
