"""OpenAI request models (strict: unknown fields and unsupported values are 400s) and the error type."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from hexgen.engine.messages import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_PENALTY


class APIError(Exception):
    """An HTTP error with an OpenAI-style body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


MAX_CHOICES = 16  # `n`: choices per request
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's /v1/completions default; chat's is the rest of the context
MAX_BIASED_TOKENS = 1024  # `logit_bias` entries per request


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="hexgen extension: 0 = off")
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="choices: one sequence each (with a seed s, choice i draws "
                   "with seed s + i)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    logit_bias: dict[str, float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    ignore_eos: bool = Field(False, description="hexgen extension for benchmarks")

    @field_validator("logit_bias")
    @classmethod
    def _bias_of_token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value and len(value) > MAX_BIASED_TOKENS:
            raise ValueError(f"logit_bias takes at most {MAX_BIASED_TOKENS} tokens, got {len(value)}")
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids (strings of digits), got {key!r}")
            if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias}")
        return value

    @property
    def token_biases(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) pairs, by token id."""
        return tuple(sorted((int(key), bias) for key, bias in (self.logit_bias or {}).items()))

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return value

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def logprob_alternatives(self) -> int | None:
        """None: no log-probabilities; N: each token's and the N most likely alternatives' (per endpoint)."""
        return None

    @property
    def default_max_tokens(self) -> int | None:
        """Tokens to generate where the request names no limit (per endpoint); None: the rest of the context."""
        return None

    @property
    def prompt_logprob_alternatives(self) -> int | None:
        """The same for the prompt's tokens (completions with echo only)."""
        return None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="one prompt (text or token ids) or a list of them; each gets n choices, prompt after prompt")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description=f"0-{MAX_LOGPROBS} (OpenAI: 0-5)")
    best_of: int | None = None
    suffix: str | None = None

    @property
    def prompts(self) -> list[str | list[int]]:
        """The request's prompts, each a text or token ids (a bare list of ints is one prompt)."""
        prompt = self.prompt
        if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.best_of not in (None, 1):
            raise ValueError("best_of must be 1 (or absent)")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    @property
    def logprob_alternatives(self) -> int | None:
        return self.logprobs

    @property
    def default_max_tokens(self) -> int | None:
        return COMPLETION_DEFAULT_MAX_TOKENS

    @property
    def prompt_logprob_alternatives(self) -> int | None:
        return self.logprobs if self.echo else None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def logprob_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        role = {"developer": "system"}
        return [{"role": role.get(m.role, m.role), "content": m.text()} for m in self.messages]
