"""OpenAI response bodies and stream chunks for completions and chat completions."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ResponseShape:
    """Which endpoint the response belongs to, and the fields every chunk repeats."""

    chat: bool
    model: str
    prompt_tokens: int
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {"id": prefix + self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def full(self, answers: list[tuple[str, str]], completion_tokens: int) -> dict[str, Any]:
        """The whole response: one choice per (text, finish reason); completion_tokens over all of them."""
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                        "finish_reason": finish_reason} for i, (text, finish_reason) in enumerate(answers)]
            body = self._envelope("chat.completion", choices)
        else:
            choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason}
                       for i, (text, finish_reason) in enumerate(answers)]
            body = self._envelope("text_completion", choices)
        body["usage"] = self.usage(completion_tokens)
        return body

    def chunk(self, text: str, finish_reason: str | None, first: bool = False, index: int = 0) -> dict[str, Any]:
        """A stream chunk of choice `index` (`first`: its first chunk, which names the role in a chat)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = self.usage(completion_tokens)
        return body


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event line pair."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"
