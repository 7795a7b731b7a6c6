"""Continuous batching as a pure state machine: which sequences run the next engine step (no time, no torch).

max_batch = 1 is the paper's replica, which serves one request from prefill to last token before the next.
Prefill is prioritised: waiting sequences join as soon as there is room, then everyone decodes together.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class Sequence:
    """A request inside a replica: tokens generated so far out of the tokens it wants."""

    request_id: int
    prompt_tokens: int
    output_tokens: int
    generated: int = 0

    @property
    def context_tokens(self) -> int:
        """Tokens in the KV cache that the next decode step attends over (including its input token)."""
        return self.prompt_tokens + self.generated

    @property
    def is_finished(self) -> bool:
        return self.generated >= self.output_tokens


@dataclass(frozen=True)
class Step:
    """One engine step: a prefill of newly admitted sequences, or one decode token for each running one."""

    is_prefill: bool
    sequences: tuple[Sequence, ...]

    @property
    def prefill_tokens(self) -> int:
        return sum(s.prompt_tokens for s in self.sequences)

    @property
    def context_tokens(self) -> int:
        return sum(s.context_tokens for s in self.sequences)


@dataclass
class ContinuousBatcher:
    max_batch: int
    waiting: deque[Sequence] = field(default_factory=deque)
    running: list[Sequence] = field(default_factory=list)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def outstanding(self) -> int:
        return len(self.waiting) + len(self.running)

    def next_step(self) -> Step | None:
        """The step to run now, or None when idle."""
        room = self.max_batch - len(self.running)
        if self.waiting and room > 0:
            admitted = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
            return Step(True, tuple(admitted))
        return Step(False, tuple(self.running)) if self.running else None

    def complete(self, step: Step) -> list[Sequence]:
        """Account for a finished step (one new token per sequence); returns the sequences that are done."""
        for seq in step.sequences:
            seq.generated += 1
        if step.is_prefill:
            self.running.extend(step.sequences)
        done = [s for s in self.running if s.is_finished]
        self.running = [s for s in self.running if not s.is_finished]
        return done
