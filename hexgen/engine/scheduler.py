"""Continuous-batching scheduler of one replica over a paged KV cache (plain Python, no torch).

Every step runs the next token of running sequences plus as much waiting prompt as the token budget
allows; sequences join and leave at step boundaries and long prompts are prefilled in chunks. A sequence
is admitted only when its first chunk's blocks are free; when blocks run out mid-generation the most
recently admitted sequence is preempted (its blocks freed) and later recomputed from its prompt and the
tokens it had produced, so it is never failed (with prefix caching, from its blocks still cached). A
pipelined replica keeps several steps (micro-batches of disjoint sequences) in flight: `schedule` skips
sequences whose step has not come back through `update`.

With `lookahead` (a one-rank replica overlapping its steps, see Engine), `schedule` also takes sequences whose
step is still in flight: the rest of a prompt whose earlier chunk is computing, and the token after the one a
running step is sampling. That token is not known yet: the plan names the previous step's sampled row it comes
from (`StepPlan.fed_back`) and the device fills it in. If the sampled token ends the sequence (a stop token), the
look-ahead step's result is discarded when it comes back, and only then are its blocks freed.
"""

from __future__ import annotations

import itertools
import secrets
from collections import deque
from dataclasses import dataclass

from hexgen.engine.block_manager import BlockKey, BlockManager, block_keys
from hexgen.engine.messages import GenerationRequest, SampleRow, ScoredTokens, StepPlan, TokenEvent, TokenLogprobs
from hexgen.engine.ngram import propose_drafts
from hexgen.engine.sequence import Sequence

DEFAULT_MAX_RUNNING_SEQS = 64  # the one default batch limit of `hexgen serve` and the planner
DEFAULT_BLOCK_SIZE = 16  # tokens per KV block
MAX_BLOCK_SIZE = 256
# On CPU a decode step gathers each sequence's keys and values one block's head at a time (engine/attention.py), and
# rows of 2 KiB copy slower than rows of 4 KiB. SmolLM2 (head_dim 64) in bf16 on the 2-core Zen 4 EPYC, 2026-12-02,
# two engines in one process stepping in turn: blocks of 32 tokens against 16 made decode steps 1.07-1.18x faster
# at 16 sequences over 1,040-token contexts, 1.12x at 64 over 272, 1.05x at 8 over 2,016 and one over 1,040, and
# 0.97-1.12x at 16 over 144 (level within the noise); in fp32 (already 4 KiB rows at 16) 32 gave 1.05x at 16 over
# 1,040 and 0.96x at 16 over 144, so fp32 keeps 16.
MIN_CPU_GATHER_ROW_BYTES = 4096
FED_BACK = -1  # a plan's token id that the device takes from the previous step's sampled tokens (StepPlan.fed_back)


def default_block_size(device: str, head_dim: int, dtype_bytes: int) -> int:
    """Tokens per KV block when the user names none: DEFAULT_BLOCK_SIZE on CUDA; on CPU the smallest power of two
    from there whose block holds MIN_CPU_GATHER_ROW_BYTES of one KV head (32 for head_dim 64 in bf16)."""
    size = DEFAULT_BLOCK_SIZE
    while device == "cpu" and size * head_dim * dtype_bytes < MIN_CPU_GATHER_ROW_BYTES and size < MAX_BLOCK_SIZE:
        size *= 2
    return size


def is_valid_block_size(size: int) -> bool:
    """Block sizes are powers of two in 1..MAX_BLOCK_SIZE (the Triton kernels tile by them)."""
    return 1 <= size <= MAX_BLOCK_SIZE and not size & (size - 1)


@dataclass(frozen=True)
class SchedulerConfig:
    max_running_seqs: int = DEFAULT_MAX_RUNNING_SEQS  # sequences holding KV blocks at once
    max_step_tokens: int = 2048  # new tokens in one forward pass (decode tokens + prompt chunks)
    max_context: int = 2048  # prompt + generated tokens of one sequence
    block_size: int = DEFAULT_BLOCK_SIZE  # tokens per KV block
    num_kv_blocks: int | None = None  # blocks in each rank's pool; None = sized by the engine from memory
    memory_bytes: int | None = None  # weights + KV pool per rank; None = what is left after weights, capped
    enforce_eager: bool = False  # engine option carried to every rank: no CUDA graphs for decode steps
    prefix_caching: bool = False  # share the KV blocks of common prefixes (`hexgen serve` / `generate` turn it on)
    # a one-rank replica prepares its next step while the device computes this one (Engine); None: on CUDA only
    overlap_steps: bool | None = None
    # speculative decoding: draft tokens (n-gram lookup, engine/ngram.py) verified per decoding sequence and step,
    # while a step decodes at most speculative_max_seqs sequences (beyond, the drafts' compute outweighs them)
    speculative_tokens: int = 0
    speculative_max_seqs: int = 4

    def __post_init__(self) -> None:
        if self.max_running_seqs < 1 or self.max_step_tokens < 1:
            raise ValueError("max_running_seqs and max_step_tokens must be >= 1")
        if not is_valid_block_size(self.block_size):
            raise ValueError(f"block_size must be a power of two in 1..{MAX_BLOCK_SIZE}, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.speculative_tokens < 0 or self.speculative_max_seqs < 1:
            raise ValueError("speculative_tokens must be >= 0 and speculative_max_seqs >= 1")


class Scheduler:
    def __init__(self, config: SchedulerConfig, eos_token_ids: tuple[int, ...] = ()):
        if config.num_kv_blocks is None:
            raise ValueError("the scheduler needs num_kv_blocks (the engine sizes it from memory)")
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.blocks = BlockManager(config.num_kv_blocks, config.block_size)
        # A sequence longer than the whole pool could never run: the pool caps the context.
        self.max_context = min(config.max_context, config.num_kv_blocks * config.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # by seq_id, in admission order
        self.peak_running = 0  # the most sequences ever batched in one step (continuous batching at work)
        self.num_preemptions = 0
        self.num_prefix_hit_tokens = 0  # prompt (or resumed) tokens whose keys/values came from the prefix cache
        self.num_drafted = 0  # draft tokens verified (speculative decoding) ...
        self.num_accepted = 0  # ... and those the model agreed with
        self._ids = itertools.count()
        self._plans_made = 0  # plans handed out so far: the next plan's number
        self._by_request: dict[str, Sequence] = {}
        self._aborted: list[TokenEvent] = []
        self._drafting = False  # whether the plan being made drafts (set per schedule call)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._aborted)

    def add(self, request: GenerationRequest) -> None:
        prompt, context = len(request.prompt_token_ids), self.config.max_context
        if not prompt or prompt + 1 > context:
            raise ValueError(
                f"request {request.request_id}: prompt of {prompt} tokens must be non-empty and leave room for one "
                f"new token within the context of {context}"
            )
        # Past the context a sequence ends by length, as asked; past the pool only because this replica has little
        # memory, which the request could not know: refuse it rather than cut it short.
        wanted = min(prompt + request.params.max_new_tokens, context)
        if wanted > self.max_context:
            raise ValueError(
                f"request {request.request_id}: needs {wanted} tokens ({prompt} in the prompt and up to "
                f"{wanted - prompt} new), but this replica's KV cache holds {self.max_context} tokens a sequence; "
                "give its ranks more memory (--memory-gb) or ask for fewer tokens"
            )
        seed = request.params.seed if request.params.seed is not None else secrets.randbits(63)
        seq = Sequence(request, next(self._ids), seed, draft_limit=self.config.speculative_tokens)
        self._by_request[request.request_id] = seq
        self.waiting.append(seq)

    def micro_batch_limit(self, depth: int) -> int | None:
        """Sequences per micro-batch when `depth` micro-batches are kept in flight: the active ones (up to the
        batch limit) split evenly, so every stage has a micro-batch to work on; None (no limit) for depth 1."""
        if depth == 1:
            return None
        active = min(len(self.running) + len(self.waiting), self.config.max_running_seqs)
        return max(1, -(-active // depth))

    def abort(self, request_id: str) -> None:
        seq = self._by_request.pop(request_id, None)
        if seq is None:
            return
        self._aborted.append(TokenEvent(request_id, None, "abort"))
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq.in_flight:
            seq.aborted = True  # its blocks are in use until its step comes back
        else:
            self._release(seq)

    def schedule(self, max_seqs: int | None = None, lookahead: bool = False) -> StepPlan | None:
        """The next micro-batch (at most max_seqs sequences), or None. It takes sequences no step holds; with
        `lookahead` (allowed while the previous plan, and only it, is in flight) also those it holds: the rest of
        their known tokens, else the token after the one it samples for them."""
        plan = StepPlan()
        budget = self.config.max_step_tokens
        limit = max_seqs or self.config.max_running_seqs
        decoding = sum(1 for seq in self.running.values() if seq.num_scheduled >= seq.num_tokens - 1)
        self._drafting = self.config.speculative_tokens > 0 and decoding <= self.config.speculative_max_seqs
        for seq in list(self.running.values()):
            if budget <= 0 or plan.num_seqs >= limit:
                break
            if seq.seq_id not in self.running or seq.done:  # preempted by an earlier one, or being discarded
                continue
            if not seq.in_flight:
                budget -= self._try_add(plan, seq, budget)
            elif lookahead:
                budget -= self._try_add_ahead(plan, seq, budget)
        while self.waiting and len(self.running) < self.config.max_running_seqs and budget > 0 \
                and plan.num_seqs < limit and self._admit(self.waiting[0], budget):
            seq = self.waiting.popleft()
            self.running[seq.seq_id] = seq
            budget -= self._try_add(plan, seq, budget)
        if plan.num_seqs == 0:
            return None
        if not any(plan.drafts):
            plan.drafts = []
        self._plans_made += 1
        self.peak_running = max(self.peak_running, plan.num_seqs)
        return plan

    def _admit(self, seq: Sequence, budget: int) -> bool:
        """Admit only when the first chunk fits and a block per running sequence stays free for decodes. With
        prefix caching the sequence first takes the cached blocks of its longest cached prefix (at least one
        token is left to compute: its logits are needed)."""
        cached: list[int] = []
        keys: list[BlockKey] = []
        if self.config.prefix_caching and not seq.block_table and not seq.wants_prompt_scores:
            tokens = seq.all_tokens()
            keys = block_keys(tokens, self.blocks.block_size, (len(tokens) - 1) // self.blocks.block_size)
            cached = self.blocks.match(keys)
        start = len(cached) * self.blocks.block_size
        end = start + min(budget, seq.num_tokens - start)
        if not self.blocks.can_take_and_grow(cached, end, reserve=len(self.running)):
            return False
        if cached:
            seq.block_table = self.blocks.take(cached)
            seq.block_keys = keys[: len(cached)]
            seq.num_cached = seq.num_scheduled = start
            self.num_prefix_hit_tokens += start
        return True

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Register the blocks that this step filled with computed keys/values in the prefix cache."""
        full = seq.num_cached // self.blocks.block_size
        first = len(seq.block_keys)
        if full <= first:
            return
        previous = seq.block_keys[-1] if seq.block_keys else None
        seq.block_keys += block_keys(seq.all_tokens(), self.blocks.block_size, full, first, previous)
        for b in range(first, full):
            self.blocks.register(seq.block_table[b], seq.block_keys[b])

    def _try_add(self, plan: StepPlan, seq: Sequence, budget: int, fed_back_row: int | None = None) -> int:
        """Add seq's next tokens to the plan, preempting newer sequences if blocks are short; tokens added. With
        `fed_back_row`, the one token is the one the previous plan samples for seq in that row."""
        tokens = seq.unscheduled_tokens(budget) if fed_back_row is None else [FED_BACK]
        drafts = self._drafts(seq, tokens, budget) if fed_back_row is None else []
        # drafts never preempt a sequence nor take the blocks kept free for the running ones' next tokens
        reserve = len(self.running)
        if drafts and self.blocks.can_grow(seq.block_table, seq.num_scheduled + len(tokens) + len(drafts), reserve):
            tokens = tokens + drafts
        else:
            drafts = []
        while not self.blocks.can_grow(seq.block_table, seq.num_scheduled + len(tokens)):
            victim = self._newest_preemptible(plan, seq)
            if victim is None:
                # Nothing left to free: run as many tokens as the blocks it has and the free ones hold.
                room = (len(seq.block_table) + self.blocks.num_free) * self.blocks.block_size - seq.num_scheduled
                tokens = tokens[: max(0, room)]
                break
            self._preempt(victim)
        if not tokens:
            return 0
        end = seq.num_scheduled + len(tokens)
        self.blocks.grow(seq.block_table, end)
        if seq.wants_prompt_scores:
            self._score_prompt(plan, seq, end)
        samples = fed_back_row is not None or end - len(drafts) == seq.num_tokens
        if fed_back_row is not None:
            plan.fed_back.append((plan.num_tokens, fed_back_row))
        plan.seq_ids.append(seq.seq_id)
        plan.starts.append(seq.num_scheduled)
        plan.lengths.append(len(tokens))
        plan.token_ids.extend(tokens)
        plan.block_tables.append(list(seq.block_table))
        plan.sample.append(samples)
        plan.drafts.append(len(drafts))
        if samples:
            p = seq.request.params
            # the index in the sequence of each token drawn (the noise of a seeded draw is keyed by it): after
            # the last known token, and after each draft
            for position in range(end - len(drafts), end + 1):
                plan.sampling.append(SampleRow(
                    p.temperature, p.top_k, p.top_p, seq.seed, position, -1 if p.logprobs is None else p.logprobs,
                    p.presence_penalty, p.frequency_penalty, p.logit_bias,
                    tuple(seq.output_token_ids) if p.has_penalties else (),
                ))
            seq.sampled_in, seq.sampled_row = self._plans_made, plan.num_sampled - 1
        seq.drafted = bool(drafts)
        seq.num_scheduled = end
        seq.in_flight += 1
        return len(tokens)

    def _drafts(self, seq: Sequence, tokens: list[int], budget: int) -> list[int]:
        """Draft tokens to verify after seq's next known token (speculative decoding), where this step drafts:
        none while it still has prompt (or recomputed) tokens to compute or for a penalized draw (each depends on
        the tokens before it); never past its adaptive limit, its token limit or the step's budget."""
        if not self._drafting or len(tokens) != 1 or seq.num_scheduled != seq.num_tokens - 1:
            return []
        params = seq.request.params
        if params.has_penalties or not seq.output_token_ids:
            return []
        room = min(seq.draft_limit, budget - 1,
                   params.max_new_tokens - len(seq.output_token_ids) - 1, self.max_context - seq.num_tokens - 1)
        return propose_drafts(seq.all_tokens(), room)

    def _score_prompt(self, plan: StepPlan, seq: Sequence, end: int) -> None:
        """The prompt positions among the ones this step computes for seq (up to `end`) not scored yet: each one's
        logits give the log-probability of the prompt token after it."""
        start = seq.num_scheduled
        first, last = max(start, seq.prompt_scored_to), min(end, seq.prompt_len - 1)
        if last <= first:
            return
        targets = seq.request.prompt_token_ids[first + 1 : last + 1]
        plan.scored.append(ScoredTokens(plan.num_seqs, first - start, targets, seq.request.params.prompt_logprobs))
        seq.prompt_scored_to = last

    def _try_add_ahead(self, plan: StepPlan, seq: Sequence, budget: int) -> int:
        """Lookahead for a sequence the previous plan holds: the rest of its known tokens, else (when that plan
        samples its next token, that token cannot end it by length, and no penalty needs it known to the next
        draw) the token after that one."""
        if seq.num_scheduled < seq.num_tokens:
            return self._try_add(plan, seq, budget)
        params = seq.request.params
        pending_ends_it = (len(seq.output_token_ids) + 1 >= params.max_new_tokens
                           or seq.num_tokens + 1 >= self.max_context)
        if seq.sampled_in != self._plans_made - 1 or pending_ends_it or params.has_penalties or seq.drafted:
            return 0
        return self._try_add(plan, seq, budget, fed_back_row=seq.sampled_row)

    def _newest_preemptible(self, plan: StepPlan, keep: Sequence) -> Sequence | None:
        in_plan = set(plan.seq_ids)
        for seq in reversed(self.running.values()):
            if seq is not keep and not seq.in_flight and seq.seq_id not in in_plan:
                return seq
        return None

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and put it first in line; it will be recomputed (prompt + outputs so far)."""
        del self.running[seq.seq_id]
        self.blocks.release(seq.block_table)
        seq.num_cached = seq.num_scheduled = 0
        seq.block_keys = []
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def update(
        self, plan: StepPlan, sampled: list[int], logprobs: list[TokenLogprobs | None] | None = None,
        prompt_logprobs: list[list[TokenLogprobs]] | None = None,
    ) -> list[TokenEvent]:
        """Apply a finished step's sampled tokens (one per True in plan.sample) and, where the step's rows asked
        for them, their log-probabilities (one per sampled token) and the scores of prompt tokens (one list per
        plan.scored entry); return the events. A request's first token carries its prompt's scores."""
        events, self._aborted = self._aborted, []
        for scored, values in zip(plan.scored, prompt_logprobs or [], strict=True):
            owner = self.running[plan.seq_ids[scored.row]]
            if not owner.done:
                owner.prompt_logprobs += values
        tokens = iter(sampled)
        token_logprobs_of = iter(logprobs if logprobs is not None else [None] * len(sampled))
        ends = plan.token_starts()[1:]  # where each sequence's tokens end in plan.token_ids
        for row, (seq_id, n, samples) in enumerate(zip(plan.seq_ids, plan.lengths, plan.sample, strict=True)):
            seq = self.running[seq_id]
            drafts = plan.token_ids[ends[row] - plan.drafts_of(row) : ends[row]]
            drawn = [(next(tokens), next(token_logprobs_of)) for _ in range(1 + len(drafts))] if samples else []
            seq.in_flight -= 1
            if seq.done:  # aborted, or finished by the step before this look-ahead one: discard
                if not seq.in_flight:
                    self._release(seq)
                continue
            if drafts:  # the drafts the model drew itself, then its own token after the last of them
                accepted = 0
                while accepted < len(drafts) and drawn[accepted][0] == drafts[accepted]:
                    accepted += 1
                self.num_drafted += len(drafts)
                self.num_accepted += accepted
                # adapt: twice as many after all were accepted, else one more than were (drafts cost compute)
                seq.draft_limit = min(self.config.speculative_tokens,
                                      2 * len(drafts) if accepted == len(drafts) else accepted + 1)
                drawn = drawn[: accepted + 1]
                seq.num_cached += n - len(drafts) + accepted  # the rejected drafts' keys / values are void
                seq.num_scheduled = seq.num_cached
            else:
                seq.num_cached += n
            for token, token_logprobs in drawn:
                seq.output_token_ids.append(token)
                seq.finish_reason = self._finish_reason(seq, token)
                first = seq.request.params.prompt_logprobs is not None and len(seq.output_token_ids) == 1
                events.append(TokenEvent(seq.request.request_id, token, seq.finish_reason, token_logprobs,
                                         tuple(seq.prompt_logprobs) if first else None))
                if seq.finish_reason is not None:
                    break
            if drafts:  # a stop among the accepted drafts leaves keys / values cached past the sequence's end
                seq.num_cached = min(seq.num_cached, seq.num_tokens - 1)
            if self.config.prefix_caching:  # (after the accepted drafts joined the outputs: their blocks' keys)
                self._register_full_blocks(seq)
            if seq.finish_reason is not None:
                del self._by_request[seq.request.request_id]
                if not seq.in_flight:
                    self._release(seq)
        return events

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.request.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if len(seq.output_token_ids) >= params.max_new_tokens:
            return "length"
        if seq.num_tokens >= self.max_context:
            return "length"
        return None

    def _release(self, seq: Sequence) -> None:
        self.running.pop(seq.seq_id, None)
        self.blocks.release(seq.block_table)
