"""A request's sequence as the scheduler tracks it: its tokens, where its keys / values are, its steps (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hexgen.engine.block_manager import BlockKey
from hexgen.engine.messages import GenerationRequest, TokenLogprobs


@dataclass(eq=False)  # identity: a request's sequence is one object
class Sequence:
    request: GenerationRequest
    seq_id: int
    seed: int  # the request's seed, or one drawn at admission: every draw is then reproducible
    output_token_ids: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose keys/values are in the KV cache
    num_scheduled: int = 0  # tokens whose keys/values are cached or being computed by a step in flight
    block_table: list[int] = field(default_factory=list)
    block_keys: list[BlockKey] = field(default_factory=list)  # prefix-cache keys of its computed full blocks
    in_flight: int = 0  # steps holding it that have not come back through update
    sampled_in: int = -1  # the number of the last plan that samples a token for it
    sampled_row: int = 0  # ... and the row of that token among the plan's sampled tokens
    aborted: bool = False
    finish_reason: str | None = None
    prompt_scored_to: int = 0  # prompt positions p whose score of token p + 1 a step has taken (prompt_logprobs)
    drafted: bool = False  # its last step verifies drafts: how many tokens it yields is unknown until it is back
    draft_limit: int = 0  # the most drafts its next step may verify (speculative decoding); set at admission
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # those scores come back, in order

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def wants_prompt_scores(self) -> bool:
        """Asks for its prompt's log-probabilities and has prompt positions left to score (each once: a
        sequence recomputed after a preemption does not score them again)."""
        return self.request.params.prompt_logprobs is not None and self.prompt_scored_to < self.prompt_len - 1

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + len(self.output_token_ids)

    def all_tokens(self) -> list[int]:
        return [*self.request.prompt_token_ids, *self.output_token_ids]

    @property
    def done(self) -> bool:
        """Finished or aborted: whatever a step still in flight computes for it is discarded."""
        return self.finish_reason is not None or self.aborted

    def unscheduled_tokens(self, budget: int) -> list[int]:
        """Up to `budget` of the known tokens no step has taken yet (prompt, then outputs)."""
        end = min(self.num_tokens, self.num_scheduled + budget)
        prompt = self.request.prompt_token_ids
        return [prompt[i] if i < self.prompt_len else self.output_token_ids[i - self.prompt_len]
                for i in range(self.num_scheduled, end)]
