"""A replica as the batching engine runs it: per-stage step times, micro-batches in flight, a KV pool in blocks.

With S stages the engine keeps up to S micro-batches (disjoint sets of sequences) in flight: each stage works on
one micro-batch while the next stage works on another. One micro-batch's step therefore takes the sum of its
stage times, hops and the token return (a request's latency adds them up), while the replica's rate of steps is
bounded by its slowest stage, which serves every micro-batch once per loop. A prompt makes its micro-batch slower on
every stage, and the micro-batches behind it wait for it: a pipeline pays for a prompt along its whole loop, less
the time the loop would have waited for its slowest stage anyway (prompt_delay_s).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from hexgen.costmodel.linear import LinearCost


@dataclass(frozen=True)
class ReplicaCost:
    """Step times of each stage, of the hop into each later stage and of the token return; the KV pool of every
    rank in blocks of `kv_block_tokens` (None: not sized, only the batch limit bounds the batch)."""

    stages: tuple[LinearCost, ...]
    hops: tuple[LinearCost, ...] = ()
    token_return: LinearCost = LinearCost()
    kv_blocks: int | None = None
    kv_block_tokens: int = 16

    @classmethod
    def one_stage(cls, cost: LinearCost, kv_blocks: int | None = None, kv_block_tokens: int = 16) -> ReplicaCost:
        return cls((cost,), (), LinearCost(), kv_blocks, kv_block_tokens)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @cached_property  # a frozen dataclass still has a __dict__ to cache in; fields alone define eq and hash
    def sequential(self) -> LinearCost:
        """One step through every stage, hop and the token return: the time of a micro-batch's step."""
        total = self.token_return
        for cost in (*self.stages, *self.hops):
            total = total + cost
        return total

    def blocks_per_seq(self, prompt_tokens: int, output_tokens: int) -> int:
        return -(-(prompt_tokens + output_tokens) // self.kv_block_tokens)

    def max_running(self, batch_limit: int, prompt_tokens: int, output_tokens: int) -> int:
        """Sequences of this shape that run at once: the batch limit, and what the KV pool holds in full."""
        if self.kv_blocks is None:
            return batch_limit
        return min(batch_limit, self.kv_blocks // self.blocks_per_seq(prompt_tokens, output_tokens))

    def _decode_loop(self, running: int, context_tokens: float) -> tuple[int, list[float], float]:
        """(micro-batches in flight, each stage's decode step of one, one micro-batch's whole loop) with `running`
        sequences holding `context_tokens` each, spread over min(stages, running) equal micro-batches."""
        depth = max(1, min(self.num_stages, running))
        per_batch = running / depth
        times = [c.decode_step_s(per_batch, per_batch * context_tokens) for c in self.stages]
        loop = sum(times) + sum(h.decode_step_s(per_batch, 0) for h in self.hops) + self.token_return.decode_fixed_s
        return depth, times, loop

    def decode_token_s(self, running: int, context_tokens: float) -> float:
        """Seconds between two tokens of each of `running` decoding sequences holding `context_tokens` each: the
        longer of one micro-batch's loop and the slowest stage serving every micro-batch once."""
        depth, times, loop = self._decode_loop(running, context_tokens)
        return max(loop, depth * max(times))

    def full_load_rps(self, batch_limit: int, prompt_tokens: int, output_tokens: int) -> float:
        """capacity_rps with as many sequences running as the batch limit and the KV pool allow (at least one)."""
        running = max(1, self.max_running(batch_limit, prompt_tokens, output_tokens))
        return self.capacity_rps(running, prompt_tokens, output_tokens)

    def capacity_rps(self, running: int, prompt_tokens: int, output_tokens: int) -> float:
        """Requests per second with `running` sequences always decoding: each batch of them needs output-1 token
        loops plus every prompt's delay (prompt_delay_s; the first prefill's fixed cost is counted once)."""
        if running < 1:
            return 0.0
        per_token_s = self.decode_token_s(running, prompt_tokens + output_tokens / 2)
        batch_s = (output_tokens - 1) * per_token_s + running * self.prompt_delay_s(running, prompt_tokens,
                                                                                   output_tokens)
        return running / (batch_s + self.sequential.prefill_fixed_s)

    def prompt_delay_s(self, running: int, prompt_tokens: int, output_tokens: int) -> float:
        """Seconds one prompt holds up the replica's decoding when `running` sequences decode. On each stage it
        adds its tokens, and the part of the prefill's fixed cost beyond the decode step's, to the step it joins
        (it shares that step's weight scan). One stage: that. A pipeline: its micro-batch comes back later by the
        sum over the stages, and the micro-batches behind it wait for it, except for the time a loop spends waiting
        for the slowest stage anyway; never less than the slowest stage's own extra work. Against the event
        simulator (which runs the engine's scheduler), on pipelines of two to four stages of Llama-2-70B: full-load
        rates within -18% to +5% of its where output lengths vary, latencies under Poisson load within 10%, where
        counting a prompt on its costliest stage only put the rates 3-49% high and the latencies 11-34% low
        (docs/cost-model.md)."""
        works = [c.prefill_per_token_s * prompt_tokens + max(0.0, c.prefill_fixed_s - c.decode_fixed_s)
                 for c in self.stages]
        if len(works) == 1:
            return works[0]
        depth, times, loop = self._decode_loop(running, prompt_tokens + output_tokens / 2)
        spare_s = max(0.0, depth * max(times) - loop)  # a loop's wait for its slowest stage
        return max(sum(works) - spare_s, max(works))

    def request_latency_s(self, prompt_tokens: int, output_tokens: int) -> float:
        """One request alone: a single micro-batch loops through every stage for each step."""
        return self.sequential.request_latency_s(prompt_tokens, output_tokens)
