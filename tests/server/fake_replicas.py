"""In-process stand-ins for the coordinator's tests: a tokenizer whose decoding is computed by hand, replicas that
answer from a script (or hold every request), and a Coordinator over them; no process starts."""

from __future__ import annotations

import asyncio

from hexgen.dispatch import ReplicaState, make_policy
from hexgen.server.coordinator import Coordinator, ServeConfig
from hexgen.server.metrics import Metrics

VOCAB = 50


class LetterTokenizer:
    """Token i is the letter chr(97 + i % 26): decoding is easy to compute by hand."""

    vocab_size = VOCAB

    def decode(self, token_ids, skip_special_tokens=True):
        return "".join(chr(97 + t % 26) for t in token_ids)


class FakeReplica:
    """Answers each submitted request with the next scripted list of queue items; without one, holds it (its queue
    stays empty) until it is released."""

    def __init__(self, index: int, scripts: list[list] | None = None, weight: float = 1.0):
        self.index = index
        self.state = ReplicaState(outstanding=0, is_up=True, capacity_weight=weight)
        self.scripts = list(scripts or [])
        self.submitted: list[str] = []
        self.max_new_tokens: list[int] = []  # each submitted request's limit
        self.released: list[tuple[str, bool]] = []

    async def submit(self, request):
        self.submitted.append(request.request_id)
        self.max_new_tokens.append(request.params.max_new_tokens)
        self.state.outstanding += 1
        queue: asyncio.Queue = asyncio.Queue()
        items = self.scripts.pop(0) if self.scripts else []
        for item in items:
            queue.put_nowait(item(request.request_id) if callable(item) else item)
        return queue

    async def release(self, request_id, abort):
        self.state.outstanding -= 1
        self.released.append((request_id, abort))


def make_coordinator(replicas, policy="least-outstanding", max_context=10, max_outstanding=8) -> Coordinator:
    config = ServeConfig("tiny", max_context=max_context, max_outstanding=max_outstanding, dtype="float32",
                         device="cpu", vocab_size=VOCAB)
    return Coordinator(config, LetterTokenizer(), replicas, make_policy(policy), Metrics())


