"""Request streams: Poisson or Gamma (bursty) arrivals with fixed or sampled prompt and output lengths."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hexgen.errors import UserError

MIN_CV, MAX_CV = 0.01, 100.0  # gamma arrivals' coefficient of variation: beyond, the draws overflow or divide by 0


@dataclass(frozen=True)
class Request:
    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class TokenLengths:
    """Lengths drawn uniformly from [low, high]; low == high gives a fixed length."""

    low: int
    high: int

    @classmethod
    def fixed(cls, tokens: int) -> TokenLengths:
        return cls(tokens, tokens)

    @property
    def mean(self) -> float:
        return (self.low + self.high) / 2

    def sample(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)


@dataclass(frozen=True)
class WorkloadSpec:
    """`num_requests` arrivals at `rate_rps` on average; gamma arrivals have inter-arrival CV `cv`."""

    rate_rps: float
    num_requests: int
    prompt: TokenLengths
    output: TokenLengths
    arrival: str = "poisson"
    cv: float = 1.0

    def __post_init__(self) -> None:
        if not self.rate_rps > 0:
            raise UserError(f"--rate must be above 0 req/s, got {self.rate_rps:g}")
        if self.num_requests < 1:
            raise UserError(f"--requests must be at least 1, got {self.num_requests}")
        if self.arrival not in ("poisson", "gamma"):
            raise UserError(f"arrival process {self.arrival!r} is unknown; use poisson or gamma")
        if not MIN_CV <= self.cv <= MAX_CV:
            raise UserError(f"--cv (the gamma arrivals' coefficient of variation) must be in [{MIN_CV:g}, {MAX_CV:g}], "
                            f"got {self.cv:g}")
        lengths = (self.prompt, self.output)
        if any(t.low < 1 or t.high < t.low for t in lengths):
            raise UserError("token lengths need 1 <= low <= high")


def interarrival_s(spec: WorkloadSpec, rng: random.Random) -> float:
    if spec.arrival == "poisson":
        return rng.expovariate(spec.rate_rps)
    shape = 1.0 / spec.cv**2  # Gamma(shape k, scale theta): mean k*theta = 1/rate, CV = 1/sqrt(k)
    return rng.gammavariate(shape, 1.0 / (shape * spec.rate_rps))


def generate_requests(spec: WorkloadSpec, rng: random.Random) -> list[Request]:
    """The request stream, reproducible from the state of `rng`."""
    now, out = 0.0, []
    for i in range(spec.num_requests):
        now += interarrival_s(spec, rng)
        out.append(Request(i, now, spec.prompt.sample(rng), spec.output.sample(rng)))
    return out
