"""One streamed completion request, timed: time to first token, end-to-end latency and output tokens."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx

from hexgen.benchserve.config import BenchConfig


@dataclass(frozen=True)
class RequestResult:
    """What one request measured. Times are seconds; `start_s` is relative to the run's start.

    `tokens_source` is "usage" when the server reported completion_tokens in the stream, else "chunks" (the count of
    non-empty content chunks, which equals tokens only for servers that send one token per chunk).
    """

    start_s: float
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    tokens_source: str = "chunks"
    error: str | None = None

    @property
    def is_ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first; None when there is no second token."""
        if self.error is not None or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


def build_payload(config: BenchConfig, prompt: str | None = None) -> dict:
    """The request's body; `prompt`: its text, else the config's one prompt."""
    prompt = config.prompt if prompt is None else prompt
    payload: dict = {"model": config.model, "max_tokens": config.max_tokens, "stream": True, "temperature": 0.0}
    if config.chat:
        payload["messages"] = [{"role": "user", "content": prompt}]
    else:
        payload["prompt"] = prompt
    if config.request_usage:
        payload["stream_options"] = {"include_usage": True}
    if config.ignore_eos:
        payload["ignore_eos"] = True  # vLLM/llama.cpp extension; OpenAI proper rejects unknown fields
    if config.logprobs is not None:
        payload.update({"logprobs": True, "top_logprobs": config.logprobs} if config.chat
                       else {"logprobs": config.logprobs})
    return payload


def build_headers(config: BenchConfig) -> dict[str, str]:
    return {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}


def chunk_text(chunk: dict, chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


def error_message(status_code: int, body: bytes) -> str:
    """The server's OpenAI-style error message when it sent one, else the start of the body."""
    text = body.decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
        error = parsed.get("error") if isinstance(parsed, dict) else None
        message = error.get("message") if isinstance(error, dict) else (error or parsed.get("detail"))
        text = str(message) if message else text
    except (json.JSONDecodeError, AttributeError):
        pass
    return f"HTTP {status_code}: {' '.join(text.split())[:200]}"


def describe_exception(err: Exception, timeout_s: float) -> str:
    if isinstance(err, httpx.ConnectError):
        return f"cannot connect ({err or 'connection refused'})"
    if isinstance(err, httpx.TimeoutException):
        return f"no answer within {timeout_s:g} s ({type(err).__name__})"
    if isinstance(err, httpx.RemoteProtocolError):
        return f"server closed the stream early: {err}"
    return f"{type(err).__name__}: {err}"


async def send_request(client: httpx.AsyncClient, config: BenchConfig, run_start: float,
                       prompt: str | None = None) -> RequestResult:
    """Send one streamed request (`prompt`, else the config's one) and time it; never raises for server or network
    failures."""
    start = time.perf_counter()
    start_s = start - run_start
    ttft_s = None
    chunks = 0
    usage_tokens = None
    done = False
    try:
        async with client.stream("POST", config.endpoint, json=build_payload(config, prompt),
                                 headers=build_headers(config), timeout=config.timeout_s) as response:
            if response.status_code != 200:
                return RequestResult(start_s, error=error_message(response.status_code, await response.aread()))
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    return RequestResult(start_s, error=f"error in stream: {chunk['error']}")
                if chunk_text(chunk, config.chat):
                    chunks += 1
                    if ttft_s is None:
                        ttft_s = time.perf_counter() - start
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                # Some servers (transformers serve's /completions) end with a finish_reason and never send [DONE].
                done = done or any(c.get("finish_reason") for c in chunk.get("choices") or [])
    except (httpx.HTTPError, OSError) as err:
        return RequestResult(start_s, error=describe_exception(err, config.timeout_s))
    except json.JSONDecodeError as err:
        return RequestResult(start_s, error=f"unparsable stream chunk: {err}")
    e2e_s = time.perf_counter() - start
    if not done:
        return RequestResult(start_s, error="stream ended without [DONE] or a finish_reason")
    if ttft_s is None:
        return RequestResult(start_s, e2e_s=e2e_s, error="stream carried no content")
    if usage_tokens is not None:
        return RequestResult(start_s, ttft_s, e2e_s, int(usage_tokens), "usage")
    return RequestResult(start_s, ttft_s, e2e_s, chunks, "chunks")
