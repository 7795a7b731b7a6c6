"""OpenAI request models (strict: unknown fields and unsupported values are 400s) and the error type."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    ValidationInfo,
    field_validator,
    model_validator,
)

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
# `stop` strings per request: OpenAI takes 4, but evaluation harnesses send more; each is matched against the text
# after every token, so there is a limit
MAX_STOP_STRINGS = 16
# vLLM's sampling extras that vLLM-targeted tools send (`vllm bench serve`: repetition_penalty 1.0), each taken at
# its neutral value, where it changes nothing: field -> (that value, what hexgen offers instead)
NEUTRAL_EXTRAS: dict[str, tuple[Any, str]] = {
    "repetition_penalty": (1.0, "hexgen supports presence_penalty and frequency_penalty instead"),
    "min_tokens": (0, "hexgen has no minimum length; ignore_eos (hexgen extension) generates exactly max_tokens"),
    "min_p": (0.0, "hexgen supports top_p and top_k instead"),
    "skip_special_tokens": (True, "hexgen's output always leaves special tokens out"),
    "spaces_between_special_tokens": (True, "hexgen's output always leaves special tokens out"),
    "include_stop_str_in_output": (False, "hexgen's output always ends before the stop string, as OpenAI's does"),
}


def _whole_characters(text: str) -> str:
    """JSON's \\u escapes can spell half of a UTF-16 surrogate pair, which is no character: no tokenizer takes it,
    and no answer could carry it back in UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"the text has an unpaired surrogate ({text[err.start]!r} at character {err.start}); "
                         "send whole characters (a surrogate pair, or the character itself)") from None
    return text


Text = Annotated[str, AfterValidator(_whole_characters)]


def _whole_number(value: Any) -> Any:
    """A whole float (2.0) as the int it spells; anything else as sent, for the strict int check."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# JSON's types as OpenAI takes them: pydantic's lax mode would read "4" and true as the number 4 and 1, "yes" and 1
# as true, and a prompt [true, 2] as token ids 1, 2. A number is a JSON number (an integer also as 2.0, which some
# clients write), a boolean is true or false.
Int = Annotated[int, Strict(), BeforeValidator(_whole_number)]
Float = Annotated[float, Strict()]
Bool = StrictBool


class RequestModel(BaseModel):
    """Strict: unknown fields are 400s. A null for a field with a default means the default, as in OpenAI's API
    (the openai package sends "temperature": null for temperature=None)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields  # a null left in for a required field or an unknown one is still a 400
        return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}


class StreamOptions(RequestModel):
    include_usage: Bool = False


class SamplingFields(RequestModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str
    max_tokens: Int | None = None
    temperature: Float = Field(1.0, ge=0.0, le=2.0)
    top_p: Float = Field(1.0, ge=0.0, le=1.0, description="0: only the most likely token")
    top_k: Int = Field(0, ge=0, description="hexgen extension: 0 = off")
    n: Int = Field(1, ge=1, le=MAX_CHOICES, description="choices: one sequence each (with a seed s, choice i draws "
                   "with seed s + i)")
    stream: Bool = False
    stream_options: StreamOptions | None = None
    stop: Text | list[Text] | None = None
    seed: Int | None = None
    user: str | None = None
    presence_penalty: Float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    frequency_penalty: Float = Field(0.0, ge=-MAX_PENALTY, le=MAX_PENALTY)
    logit_bias: dict[str, Float] | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    ignore_eos: Bool = Field(False, description="hexgen extension for benchmarks")
    repetition_penalty: Float = 1.0  # NEUTRAL_EXTRAS: vLLM's, taken at these values only
    min_tokens: Int = 0
    min_p: Float = 0.0
    skip_special_tokens: Bool = True
    spaces_between_special_tokens: Bool = True
    include_stop_str_in_output: Bool = False

    @field_validator(*NEUTRAL_EXTRAS)
    @classmethod
    def _only_neutral(cls, value: Any, info: ValidationInfo) -> Any:
        neutral, instead = NEUTRAL_EXTRAS[info.field_name]
        if value != neutral:
            raise ValueError(f"{info.field_name} is taken only at {json.dumps(neutral)} (or absent), where it changes "
                             f"nothing; {instead}")
        return value

    @field_validator("stream_options")
    @classmethod
    def _options_need_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream: true")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_of_token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value and len(value) > MAX_BIASED_TOKENS:
            raise ValueError(f"logit_bias takes at most {MAX_BIASED_TOKENS} tokens, got {len(value)}")
        for key, bias in (value or {}).items():
            if not (key.isascii() and key.isdigit()):  # str.isdigit() takes "²", which int() refuses
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
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed, got {len(value)}")
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
    def token_limit_field(self) -> str:
        """The field that set the limit of tokens to generate, as the client sent it (for errors about it)."""
        return "max_tokens"

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
    prompt: Text | list[Text] | list[Int] | list[list[Int]] = Field(
        description="one prompt (text or token ids) or a list of them; each gets n choices, prompt after prompt")
    echo: Bool = False
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS, description=f"0-{MAX_LOGPROBS} (OpenAI: 0-5)")
    best_of: Int | None = None
    suffix: str | None = None

    @property
    def prompts(self) -> list[str | list[int]]:
        """The request's prompts, each a text or token ids (a bare list of ints is one prompt)."""
        prompt = self.prompt
        if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]

    @field_validator("best_of")
    @classmethod
    def _one_best(cls, value: int | None) -> int | None:
        if value not in (None, 1):
            raise ValueError("best_of must be 1 (or absent); hexgen supports n (choices) instead")
        return value

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
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


class TextPart(RequestModel):
    type: Literal["text"]
    text: Text


class ChatMessage(RequestModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int | None = None
    logprobs: Bool | None = None
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)

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

    @property
    def token_limit_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def template_messages(self) -> list[dict[str, str]]:
        role = {"developer": "system"}
        return [{"role": role.get(m.role, m.role), "content": m.text()} for m in self.messages]
