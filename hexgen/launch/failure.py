"""Which rank's error to report when a replica fails.

When one rank fails, its peers fail too a moment later: a gloo receive from the dead rank raises "Connection closed
by peer". Every failing rank reports ("error", rank, text, cause) on the events channel, and the messages race; the
parent must name the rank that failed first, not a peer that merely lost it. So each rank says what kind of failure
it had (`Cause`), and the parent, holding only a peer's loss, waits up to `PEER_GRACE_S` for the real cause.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

PEER_GRACE_S = 2.0  # how long a parent holding only "lost a peer" errors waits for the rank that caused them


class Cause(enum.IntEnum):
    """What a rank's failure was; a lower value is a better explanation of the replica's failure."""

    INPUT = 0  # the user's input (a UserError: bad checkpoint, bad flag)
    INTERNAL = 1  # anything else that went wrong in the rank itself
    PEER = 2  # a collective or send/receive failed because another rank is gone


# What torch's communication backends say when the other end has died (gloo's TCP pairs, NCCL, our shared-memory
# all-reduce, a stage's socket).
_PEER_LOSS_TEXTS = (
    "connection closed by peer", "connection reset by peer", "broken pipe", "remote process exited",
    "communicator was aborted", "did not arrive within",
)


def classify(err: BaseException, is_input_error: bool) -> Cause:
    """The cause a rank reports for the exception that ended it."""
    if is_input_error:
        return Cause.INPUT
    text = str(err).lower()
    return Cause.PEER if any(phrase in text for phrase in _PEER_LOSS_TEXTS) else Cause.INTERNAL


@dataclass(frozen=True)
class RankFailure:
    rank: int
    text: str
    cause: Cause

    @staticmethod
    def of(message: tuple[Any, ...]) -> RankFailure:
        """The failure an ("error", rank, text, cause) message reports (a message without a cause: INTERNAL)."""
        cause = Cause(message[3]) if len(message) > 3 and message[3] in set(Cause) else Cause.INTERNAL
        return RankFailure(int(message[1]), str(message[2]), cause)

    def message(self) -> tuple[str, int, str, int]:
        return ("error", self.rank, self.text, int(self.cause))


def first_cause(failures: Iterable[RankFailure]) -> RankFailure:
    """The best explanation among the failures: the lowest cause, and among equals the first to arrive."""
    return min(failures, key=lambda f: f.cause)  # min keeps the first of equal keys


def settle(failures: list[RankFailure], receive: Callable[[float], list[Any]], grace_s: float = PEER_GRACE_S
           ) -> RankFailure:
    """The replica's failure, given those already received. While every failure so far is only a lost peer, keep
    taking messages from `receive(timeout_s)` for up to grace_s: the rank that caused them reports soon after."""
    deadline = time.monotonic() + grace_s
    while first_cause(failures).cause is Cause.PEER and (left := deadline - time.monotonic()) > 0:
        failures += [RankFailure.of(m) for m in receive(min(left, 0.1)) if m[0] == "error"]
    return first_cause(failures)


async def settle_async(failures: list[RankFailure], receive: Callable[[], Awaitable[Any]],
                       grace_s: float = PEER_GRACE_S) -> RankFailure:
    """`settle` for an asyncio parent: receive() awaits the next message."""
    deadline = time.monotonic() + grace_s
    while first_cause(failures).cause is Cause.PEER and (left := deadline - time.monotonic()) > 0:
        try:
            message = await asyncio.wait_for(receive(), timeout=left)
        except TimeoutError:
            break
        if message[0] == "error":
            failures.append(RankFailure.of(message))
    return first_cause(failures)
