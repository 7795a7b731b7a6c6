"""Run a batch of requests to completion on a replica, streaming text and timing each request."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hexgen.engine.messages import GenerationRequest
from hexgen.errors import UserError
from hexgen.textstream import TextStream


@dataclass
class Completion:
    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    submitted_s: float = 0.0
    first_token_s: float | None = None  # monotonic time of the first token
    finished_s: float | None = None

    @property
    def ttft_s(self) -> float:
        return (self.first_token_s or self.submitted_s) - self.submitted_s

    @property
    def decode_s_per_token(self) -> float:
        """Mean time between tokens after the first (nan with fewer than two tokens)."""
        if self.finished_s is None or self.first_token_s is None or len(self.token_ids) < 2:
            return float("nan")
        return (self.finished_s - self.first_token_s) / (len(self.token_ids) - 1)


def run_requests(
    replica,
    requests: list[GenerationRequest],
    streams: dict[str, TextStream] | None = None,
    on_text: Callable[[str, str], None] | None = None,
) -> list[Completion]:
    """Submit every request, collect tokens until all finish; `on_text(request_id, delta)` streams text.

    A request whose text hits a stop string is aborted on the replica and finishes with "stop".
    """
    done = {r.request_id: Completion(r.request_id) for r in requests}
    live = set(done)
    for request in requests:
        done[request.request_id].submitted_s = time.monotonic()
        replica.submit(request)
    while live:
        for message in replica.poll(0.1):
            if message[0] == "rejected":
                raise UserError(f"request rejected: {message[2]}")
            if message[0] != "events":
                continue
            now = time.monotonic()
            for event in message[1]:
                if event.request_id not in live or event.token_id is None:
                    continue
                completion = done[event.request_id]
                completion.first_token_s = completion.first_token_s or now
                completion.token_ids.append(event.token_id)
                finish = event.finish_reason
                stream = streams.get(event.request_id) if streams else None
                if stream is not None:
                    delta = stream.add(event.token_id)
                    if stream.stopped:  # a stop string: end the request here and free its slot
                        replica.abort(event.request_id)
                        finish = "stop"
                    elif finish is not None:
                        delta += stream.finish()
                    completion.text += delta
                    if on_text is not None and delta:
                        on_text(event.request_id, delta)
                if finish is not None:
                    completion.finish_reason, completion.finished_s = finish, now
                    live.discard(event.request_id)
    return [done[r.request_id] for r in requests]
