"""A replica's or stage's time as a linear function of the work in one engine step."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class LinearCost:
    """Seconds for a prefill of T tokens and for one decode step of B sequences holding C cached tokens in all.

    prefill_s(T)        = prefill_fixed_s + prefill_per_token_s * T
    decode_step_s(B, C) = decode_fixed_s + decode_per_seq_s * B + decode_per_ctx_token_s * C
    Every term of the cost model is linear in T, B and C, so stages and links add up coefficient by coefficient.
    """

    prefill_fixed_s: float = 0.0
    prefill_per_token_s: float = 0.0
    decode_fixed_s: float = 0.0
    decode_per_seq_s: float = 0.0
    decode_per_ctx_token_s: float = 0.0

    def __add__(self, other: LinearCost) -> LinearCost:  # spelled out: the planner adds these ~10^6 times
        return LinearCost(self.prefill_fixed_s + other.prefill_fixed_s,
                          self.prefill_per_token_s + other.prefill_per_token_s,
                          self.decode_fixed_s + other.decode_fixed_s,
                          self.decode_per_seq_s + other.decode_per_seq_s,
                          self.decode_per_ctx_token_s + other.decode_per_ctx_token_s)

    def scaled(self, factor: float) -> LinearCost:
        return LinearCost(*(getattr(self, f.name) * factor for f in fields(self)))

    def prefill_s(self, tokens: int) -> float:
        return self.prefill_fixed_s + self.prefill_per_token_s * tokens

    def decode_step_s(self, batch: int, context_tokens: int) -> float:
        return self.decode_fixed_s + self.decode_per_seq_s * batch + self.decode_per_ctx_token_s * context_tokens

    def request_latency_s(self, prompt_tokens: int, output_tokens: int) -> float:
        """One request alone: a prefill that yields the first token, then output-1 decode steps."""
        return self.batch_time_s(1, prompt_tokens, output_tokens)

    def batch_time_s(self, batch: int, prompt_tokens: int, output_tokens: int) -> float:
        """`batch` equal requests admitted together: one prefill of all their prompts, then output-1 decode steps.

        Decode step k (1-based) attends over prompt + k cached tokens per sequence, so the context sum is
        closed-form. batch = 1 is one request's latency; for a batching replica, batch / this is its throughput.
        Works elementwise on integer numpy arrays too.
        """
        steps = output_tokens - 1
        context_sum = steps * prompt_tokens + steps * (steps + 1) // 2
        return (
            self.prefill_s(batch * prompt_tokens)
            + steps * (self.decode_fixed_s + self.decode_per_seq_s * batch)
            + self.decode_per_ctx_token_s * batch * context_sum
        )
