"""A fake OpenAI streaming server for the benchmark tests: an httpx transport with controlled delays and faults."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx


@dataclass
class FakeServer:
    """Answers /v1/completions and /v1/chat/completions with `tokens` chunks: the first after `ttft_s`, the rest
    `tpot_s` apart. `fail_every` > 0 answers every n-th request with HTTP 500; `drop_after` > 0 closes the stream
    after that many chunks. Without `send_done` the last chunk carries finish_reason and no [DONE] follows."""

    tokens: int = 5
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    send_usage: bool = True
    send_done: bool = True
    fail_every: int = 0
    drop_after: int = 0
    status: Callable[[], dict] | None = None  # what GET /status answers (hexgen's shape); None: 404, as vLLM
    payloads: list[dict] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    async def handle(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "fake"}]})
        if request.url.path == "/status":
            if self.status is None:
                return httpx.Response(404, json={"detail": "Not Found"})
            return httpx.Response(200, json=self.status())
        payload = json.loads(request.content)
        self.payloads.append(payload)
        if self.fail_every and len(self.payloads) % self.fail_every == 0:
            return httpx.Response(500, json={"error": {"message": "boom", "type": "server_error"}})
        chat = request.url.path.endswith("/chat/completions")
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=self.stream(payload, chat))

    async def stream(self, payload: dict, chat: bool):
        # Counted until the last chunk before [DONE]: the client stops reading there, so a `finally` would run late.
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if chat:
                yield sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for i in range(self.tokens):
                await asyncio.sleep(self.ttft_s if i == 0 else self.tpot_s)
                if self.drop_after and i == self.drop_after:
                    raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")
                text = f" t{i}"
                choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
                yield sse({"choices": [choice]})
            if self.send_usage and payload.get("stream_options", {}).get("include_usage"):
                yield sse({"choices": [], "usage": {"completion_tokens": self.tokens, "prompt_tokens": 3}})
        finally:
            self.in_flight -= 1
        if self.send_done:
            yield b"data: [DONE]\n\n"
        else:
            yield sse({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})


def sse(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()
