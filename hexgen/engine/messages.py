"""Typed messages between the outside world, the driver rank and the other ranks (no torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # most likely alternatives a request may ask for per token (OpenAI's chat limit)
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2] (OpenAI's range)
MAX_LOGIT_BIAS = 100.0  # a logit bias lies in [-100, 100] (OpenAI's range)
SEED_BITS = 64  # a seed counts by its low 64 bits: s and s + 2**64 draw the same tokens; -1 is 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings; the semantics of temperature, top_k and top_p follow HF transformers
    (temperature, then top-k, then top-p, then a multinomial draw). temperature 0 means greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0
    seed: int | None = None  # None = fresh randomness per request; any integer, kept as its low 64 bits (SEED_BITS)
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none; N: each token's log-probability and the N most likely alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens from its second on (scored, not drawn)
    # OpenAI's penalties, subtracted from a token's logit: frequency x its count among the tokens generated so far,
    # presence once it occurs there; and logit_bias, (token id, bias) added to its logit. All before temperature.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if self.seed is not None:  # the sampler draws from the seed's low 64 bits: keep just those, which also fit
            object.__setattr__(self, "seed", self.seed % (1 << SEED_BITS))  # the channel's integers (msgpack)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0 (0 = greedy) and finite, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}] (or None), got {value}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {getattr(self, name)}")
        for token_id, bias in self.logit_bias:
            if token_id < 0 or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias takes token ids >= 0 and biases in [-{MAX_LOGIT_BIAS:g}, "
                                 f"{MAX_LOGIT_BIAS:g}], got {token_id}: {bias}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Whether each draw depends on the tokens generated before it (so it waits until they are all known)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    # The client named no limit (chat): max_new_tokens is the rest of the server's context, and the server lowers
    # it to the rest of the chosen replica's KV pool where that is shorter (server/coordinator.py: Coordinator.fit).
    open_ended: bool = False


@dataclass(frozen=True)
class TokenLogprobs:
    """A sampled token's log-probability under the model (log-softmax of its logits, before temperature, top-k
    and top-p reshape them for the draw) and the `logprobs` most likely tokens', most likely first."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one request; finish_reason is set on its last event."""

    request_id: str
    token_id: int | None  # None only for an event that reports an abort
    finish_reason: str | None = None  # "stop" (EOS), "length" (max_new_tokens or context), "abort"
    logprobs: TokenLogprobs | None = None  # where the request asked for them
    # on a request's first token, where it asked: its prompt's tokens' from the second on, in order
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None


@dataclass(frozen=True)
class StepSamples:
    """What a step's last stage sampled, on the host: one token id per sampled row and, where some row of the
    step asked for them, each row's TokenLogprobs (None for the rows that did not)."""

    token_ids: list[int]
    logprobs: list[TokenLogprobs | None] | None = None
    prompt_logprobs: list[list[TokenLogprobs]] = field(default_factory=list)  # one list per StepPlan.scored entry


@dataclass(frozen=True)
class SampleRow:
    """How the last stage draws one sequence's next token; position is that token's index in the sequence,
    so a seeded draw depends only on (seed, position), never on the rest of the batch."""

    temperature: float
    top_k: int
    top_p: float
    seed: int
    position: int
    logprobs: int = -1  # -1: none; N >= 0: the sampled token's log-probability and the N most likely tokens'
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    output_token_ids: tuple[int, ...] = ()  # the tokens generated before this one, where a penalty needs them

    @property
    def adjusts_logits(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or bool(self.logit_bias)


@dataclass(frozen=True)
class ScoredTokens:
    """Prompt tokens a step scores for one of its sequences (prompt log-probabilities): that sequence's new tokens
    from the `first`-th on, one each, predict `targets` (the prompt tokens after them)."""

    row: int  # the sequence's index in the plan
    first: int
    targets: tuple[int, ...]
    alternatives: int  # most likely tokens reported beside each target


@dataclass
class StepPlan:
    """One micro-batch: what every rank of a replica runs in one step. Built by the driver's scheduler and
    passed from stage leader to stage leader with the activations; ranks keep no per-sequence state."""

    seq_ids: list[int] = field(default_factory=list)  # scheduler id of each scheduled sequence
    starts: list[int] = field(default_factory=list)  # tokens already cached per sequence
    lengths: list[int] = field(default_factory=list)  # new tokens per sequence this step
    token_ids: list[int] = field(default_factory=list)  # the new tokens, flat, sequence after sequence
    block_tables: list[list[int]] = field(default_factory=list)  # KV blocks of each sequence, covering start+length
    sample: list[bool] = field(default_factory=list)  # whether the step ends the sequence's known tokens
    sampling: list[SampleRow] = field(default_factory=list)  # one per True in `sample`
    # (index in token_ids, row): that token is the previous step's sampled token of that row (a look-ahead step,
    # Scheduler.schedule), unknown to the driver when it made the plan; its token_ids entry holds FED_BACK
    fed_back: list[tuple[int, int]] = field(default_factory=list)
    scored: list[ScoredTokens] = field(default_factory=list)  # prompt tokens scored, where a request asked
    # per sequence: how many of its new tokens are drafts (speculative decoding); a sequence that samples with d
    # drafts is drawn at its last 1 + d tokens, one SampleRow each (empty: no drafts in the step)
    drafts: list[int] = field(default_factory=list)
    shutdown: bool = False
    keepalive: bool = False  # no work: it only completes the other ranks' waits for a plan (Engine.keep_alive)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_ids)

    @property
    def num_sampled(self) -> int:
        return len(self.sampling)

    def token_starts(self) -> list[int]:
        """Each sequence's first row in the flat batch of the step's new tokens (token_ids), then their count."""
        starts = [0]
        for n in self.lengths:
            starts.append(starts[-1] + n)
        return starts

    def drafts_of(self, row: int) -> int:
        return self.drafts[row] if self.drafts else 0

    @property
    def num_scored(self) -> int:
        return sum(len(s.targets) for s in self.scored)

    @property
    def returns_samples(self) -> bool:
        """Whether the last stage sends anything back for this step (tokens drawn or prompt tokens scored)."""
        return self.num_sampled > 0 or bool(self.scored)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.lengths)
