"""Continuous-batching scheduler of one replica (plain Python, no torch).

Every step runs all running sequences' next token plus as much waiting prompt as the token budget
allows; sequences join and leave at step boundaries, and long prompts are prefilled in chunks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from hexgen.engine.messages import GenerationRequest, StepPlan, TokenEvent


@dataclass
class Sequence:
    request: GenerationRequest
    slot: int
    output_token_ids: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose keys/values are in the KV cache
    finish_reason: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def is_prefilling(self) -> bool:
        return self.num_cached < self.prompt_len

    def next_tokens(self, budget: int) -> list[int]:
        if self.is_prefilling:
            return list(self.request.prompt_token_ids[self.num_cached : self.num_cached + budget])
        return [self.output_token_ids[-1]]


@dataclass(frozen=True)
class SchedulerConfig:
    max_running_seqs: int = 32  # sequences holding a KV cache at once
    max_step_tokens: int = 2048  # new tokens in one forward pass (decode tokens + prompt chunks)
    max_context: int = 2048  # prompt + generated tokens of one sequence

    def __post_init__(self) -> None:
        if self.max_running_seqs < 1 or self.max_step_tokens < 1:
            raise ValueError("max_running_seqs and max_step_tokens must be >= 1")


class Scheduler:
    def __init__(self, config: SchedulerConfig, eos_token_ids: tuple[int, ...] = ()):
        self.config = config
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[GenerationRequest] = deque()
        self.running: dict[str, Sequence] = {}
        self.peak_running = 0  # the most sequences ever batched in one step (continuous batching at work)
        self._free_slots = list(range(config.max_running_seqs - 1, -1, -1))
        self._freed: list[int] = []  # slots to release on every rank with the next step
        self._aborted: list[TokenEvent] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._freed or self._aborted)

    def add(self, request: GenerationRequest) -> None:
        total = len(request.prompt_token_ids) + 1
        if not request.prompt_token_ids or total > self.config.max_context:
            raise ValueError(
                f"request {request.request_id}: prompt of {len(request.prompt_token_ids)} tokens must be non-empty "
                f"and leave room for one new token within the context of {self.config.max_context}"
            )
        self.waiting.append(request)

    def abort(self, request_id: str) -> None:
        for request in list(self.waiting):
            if request.request_id == request_id:
                self.waiting.remove(request)
                self._aborted.append(TokenEvent(request_id, None, "abort"))
        seq = self.running.pop(request_id, None)
        if seq is not None:
            self._release(seq)
            self._aborted.append(TokenEvent(request_id, None, "abort"))

    def schedule(self) -> StepPlan | None:
        """The next step, or None when there is nothing to run or release."""
        plan = StepPlan(freed=self._freed)
        self._freed = []
        budget = self.config.max_step_tokens
        for seq in self.running.values():
            if budget <= 0:
                break
            budget -= self._add_to_plan(plan, seq, budget)
        while self.waiting and self._free_slots and budget > 0:
            request = self.waiting.popleft()
            seq = Sequence(request, self._free_slots.pop())
            self.running[request.request_id] = seq
            plan.joining[seq.slot] = request.params
            budget -= self._add_to_plan(plan, seq, budget)
        if not plan.slots and not plan.freed:
            return None
        self.peak_running = max(self.peak_running, len(plan.slots))
        return plan

    def _add_to_plan(self, plan: StepPlan, seq: Sequence, budget: int) -> int:
        tokens = seq.next_tokens(budget)
        plan.slots.append(seq.slot)
        plan.starts.append(seq.num_cached)
        plan.lengths.append(len(tokens))
        plan.token_ids.extend(tokens)
        plan.sample.append(seq.num_cached + len(tokens) >= seq.prompt_len)
        return len(tokens)

    def update(self, plan: StepPlan, sampled: list[int]) -> list[TokenEvent]:
        """Apply a finished step's sampled tokens (one per True in plan.sample); return the events."""
        events, self._aborted = self._aborted, []
        by_slot = {seq.slot: seq for seq in self.running.values()}
        tokens = iter(sampled)
        for slot, n, samples in zip(plan.slots, plan.lengths, plan.sample, strict=True):
            seq = by_slot.get(slot)
            token = next(tokens) if samples else None
            if seq is None:  # aborted while its step ran
                continue
            seq.num_cached += n
            if token is None:
                continue
            seq.output_token_ids.append(token)
            seq.finish_reason = self._finish_reason(seq, token)
            events.append(TokenEvent(seq.request.request_id, token, seq.finish_reason))
            if seq.finish_reason is not None:
                del self.running[seq.request.request_id]
                self._release(seq)
        return events

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.request.params
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids):
            return "stop"
        if len(seq.output_token_ids) >= params.max_new_tokens:
            return "length"
        if seq.prompt_len + len(seq.output_token_ids) >= self.config.max_context:
            return "length"
        return None

    def _release(self, seq: Sequence) -> None:
        self._freed.append(seq.slot)
        self._free_slots.append(seq.slot)
