"""The benchmark's settings as one validated frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass

from hexgen.errors import UserError

DEFAULT_PROMPT = (
    "Once upon a time, in a small village by the sea, there lived an old fisherman who told the children stories "
    "about the lighthouse on the hill. One evening"
)


@dataclass(frozen=True)
class SloTargets:
    """Per-request service-level objectives; None means that metric is not judged."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    def is_set(self) -> bool:
        return any(v is not None for v in (self.ttft_s, self.tpot_s, self.e2e_s))


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run: where to send what, and how the load is shaped.

    Exactly one of `concurrency` (closed loop: N streams, each sends its next request when the last ends) and
    `rate_rps` (open loop: Poisson arrivals) is set; exactly one of `num_requests` and `duration_s`.
    """

    base_url: str
    model: str
    prompt: str = DEFAULT_PROMPT
    # distinct prompts sent in turn, warm-up requests first (--prompts-file), e.g. long prompts whose keys no two
    # requests share; empty: `prompt` for every request
    prompts: tuple[str, ...] = ()
    max_tokens: int = 64
    concurrency: int | None = 1
    rate_rps: float | None = None
    num_requests: int | None = 32
    duration_s: float | None = None
    warmup_requests: int = 1
    chat: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None  # ask for each token's log-probability and this many alternatives'
    request_usage: bool = True
    api_key: str | None = None
    seed: int = 0
    timeout_s: float = 600.0
    slo: SloTargets = SloTargets()

    def __post_init__(self) -> None:
        if not self.base_url.startswith(("http://", "https://")):
            raise UserError(f"--url {self.base_url!r}: expected an http(s) URL such as http://127.0.0.1:8000/v1")
        if not self.model:
            raise UserError("--model is required: the model name the server expects (see GET /v1/models)")
        if (self.concurrency is None) == (self.rate_rps is None):
            raise UserError("give exactly one of --concurrency N (closed loop) and --rate R (Poisson, requests/s)")
        if self.concurrency is not None and self.concurrency < 1:
            raise UserError(f"--concurrency {self.concurrency}: must be an integer >= 1")
        if self.rate_rps is not None and not self.rate_rps > 0:
            raise UserError(f"--rate {self.rate_rps}: must be a number of requests per second > 0")
        if (self.num_requests is None) == (self.duration_s is None):
            raise UserError("give exactly one of --num-requests N and --duration-s S")
        if self.num_requests is not None and self.num_requests < 1:
            raise UserError(f"--num-requests {self.num_requests}: must be >= 1")
        if self.duration_s is not None and not self.duration_s > 0:
            raise UserError(f"--duration-s {self.duration_s}: must be > 0")
        if any(not p.strip() for p in self.prompts):
            raise UserError("--prompts-file: every prompt must have some text")
        if self.max_tokens < 1:
            raise UserError(f"--max-tokens {self.max_tokens}: must be >= 1")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise UserError(f"--logprobs {self.logprobs}: must be in 0..20 (alternatives per token)")
        if self.warmup_requests < 0:
            raise UserError(f"--warmup {self.warmup_requests}: must be >= 0")
        if not self.timeout_s > 0:
            raise UserError(f"--timeout-s {self.timeout_s}: must be > 0")
        for name, value in (("ttft", self.slo.ttft_s), ("tpot", self.slo.tpot_s), ("e2e", self.slo.e2e_s)):
            if value is not None and not value > 0:
                raise UserError(f"--slo-{name}-s {value}: must be a positive number of seconds")

    def prompt_of(self, index: int) -> str:
        """The prompt of the index-th request sent (warm-up ones included)."""
        return self.prompts[index % len(self.prompts)] if self.prompts else self.prompt

    @property
    def endpoint(self) -> str:
        return "/chat/completions" if self.chat else "/completions"

    @property
    def mode(self) -> str:
        return f"concurrency {self.concurrency}" if self.concurrency is not None else f"rate {self.rate_rps:g}/s"
