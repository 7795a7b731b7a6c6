"""Dispatch policies over plain replica state, skipping replicas that are down."""

from __future__ import annotations

import pytest

from hexgen.dispatch import (
    CapacityWeighted,
    LeastOutstanding,
    NoReplicaAvailable,
    ReplicaState,
    RoundRobin,
    make_policy,
)
from hexgen.errors import UserError


def test_round_robin_cycles_and_skips_down():
    states = [ReplicaState(), ReplicaState(is_up=False), ReplicaState()]
    rr = RoundRobin()
    assert [rr.choose(states) for _ in range(4)] == [0, 2, 0, 2]


def test_least_outstanding_and_capacity_weighted():
    states = [ReplicaState(3), ReplicaState(1), ReplicaState(1, is_up=False), ReplicaState(2)]
    assert LeastOutstanding().choose(states) == 1
    tied = [ReplicaState(2, capacity_weight=1.0), ReplicaState(2, capacity_weight=3.0), ReplicaState(2)]
    assert LeastOutstanding().choose(tied) == 1  # equal load: the faster replica
    weighted = [ReplicaState(3, capacity_weight=4.0), ReplicaState(1, capacity_weight=1.0)]
    assert CapacityWeighted().choose(weighted) == 0  # (3+1)/4 = 1.0 < (1+1)/1 = 2.0


def test_all_down_and_unknown_policy():
    with pytest.raises(NoReplicaAvailable):
        LeastOutstanding().choose([ReplicaState(is_up=False)])
    with pytest.raises(UserError, match="round-robin"):
        make_policy("random")
