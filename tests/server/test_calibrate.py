"""Replica speeds measured at start-up for plans without predictions: tokens per second by hand."""

from __future__ import annotations

import asyncio

import pytest

from hexgen.dispatch import ReplicaState
from hexgen.engine.messages import TokenEvent
from hexgen.server import calibrate
from hexgen.server.calibrate import measure_speeds, needs_measured_speeds
from hexgen.server.replica_client import ReplicaDown


class Clock:
    def __init__(self):
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


class TimedReplica:
    """A replica decoding in steps: every probe submitted gets its k-th token at (the first submission's time) +
    `first_s` (the prefill) + (k - 1) x `step_s`, as a batch decoding in lockstep would; `tokens` tokens each."""

    def __init__(self, index: int, clock: Clock, step_s: float, first_s: float = 5.0, tokens: int = 8, fail=False):
        self.index, self.clock, self.step_s, self.first_s, self.tokens, self.fail = (
            index, clock, step_s, first_s, tokens, fail)
        self.state = ReplicaState(capacity_weight=1.0)
        self.requests, self.released = [], []
        self.start_s: float | None = None

    async def submit(self, request):
        self.requests.append(request)
        self.start_s = self.clock.now_s if self.start_s is None else self.start_s
        replica = self

        class Paced(asyncio.Queue):
            count = 0

            async def get(self):
                if replica.fail:
                    return ReplicaDown("gone")
                self.count += 1
                at_s = replica.start_s + replica.first_s + (self.count - 1) * replica.step_s
                replica.clock.now_s = max(replica.clock.now_s, at_s)
                return TokenEvent(request.request_id, 7, "length" if self.count == replica.tokens else None)

        return Paced()

    async def release(self, request_id, abort):
        self.released.append((request_id, abort))


def test_weights_are_decode_tokens_per_second_after_the_first_token():
    for step_s, expected in ((0.16, 6.25), (0.04, 25.0)):
        clock = Clock()
        replica = TimedReplica(0, clock, step_s)
        # 8 tokens: 7 decode intervals after the first; the prefill's 5 s does not count
        assert asyncio.run(measure_speeds([replica], clock)) == pytest.approx({0: expected})
        assert replica.state.capacity_weight == pytest.approx(expected)
        probe = replica.requests[0]
        assert probe.params.ignore_eos and probe.params.max_new_tokens == calibrate.PROBE_NEW_TOKENS
        assert replica.released == [(probe.request_id, False)]
    down = TimedReplica(2, Clock(), 0.01, fail=True)
    assert asyncio.run(measure_speeds([down], Clock())) == {}
    assert down.state.capacity_weight == 1.0 and down.released == [("capacity-probe-2", False)]  # kept


@pytest.mark.parametrize("predicted, dispatch, expected", [
    ([{}, {}], "capacity-weighted", True),
    ([{}, {"throughput_rps": 2.0}], "capacity-weighted", False),  # the planner's figures are kept
    ([{"latency_s": 1.0}, {}], "capacity-weighted", False),
    ([{}, {}], "least-outstanding", True),  # its ties go to the fastest
    ([{}, {}], "round-robin", False),
    ([{}], "capacity-weighted", False),
])
def test_only_unpredicted_plans_dispatched_by_weight_are_measured(predicted, dispatch, expected):
    assert needs_measured_speeds(predicted, dispatch) is expected
