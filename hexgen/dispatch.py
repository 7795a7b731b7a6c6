"""Which replica gets the next request; the same policies serve the simulator and the HTTP coordinator."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from hexgen.errors import UserError


@dataclass
class ReplicaState:
    """What a dispatcher knows of one replica: requests in flight, whether it answers, its relative speed, and the
    longest sequence its KV pool holds."""

    outstanding: int = 0
    is_up: bool = True
    capacity_weight: float = 1.0
    max_context: int | None = None  # tokens, prompt and output; None: whatever the server allows


class NoReplicaAvailable(RuntimeError):
    """Every replica is marked down."""


class DispatchPolicy(Protocol):
    def choose(self, replicas: Sequence[ReplicaState]) -> int: ...


def _up_indices(replicas: Sequence[ReplicaState]) -> list[int]:
    up = [i for i, r in enumerate(replicas) if r.is_up]
    if not up:
        raise NoReplicaAvailable(f"all {len(replicas)} replicas are down")
    return up


class RoundRobin:
    """Each replica in turn, skipping replicas that are down (the paper's coordinator)."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, replicas: Sequence[ReplicaState]) -> int:
        _up_indices(replicas)
        n = len(replicas)
        for step in range(n):
            i = (self._next + step) % n
            if replicas[i].is_up:
                self._next = i + 1
                return i
        raise AssertionError("unreachable: some replica is up")


class LeastOutstanding:
    """The replica with the fewest requests in flight; ties go to the faster replica, then the lowest index."""

    def choose(self, replicas: Sequence[ReplicaState]) -> int:
        return min(_up_indices(replicas), key=lambda i: (replicas[i].outstanding, -replicas[i].capacity_weight, i))


class CapacityWeighted:
    """The replica whose load after this request, divided by its capacity weight, is lowest."""

    def choose(self, replicas: Sequence[ReplicaState]) -> int:
        def load(i: int) -> tuple[float, int]:
            return (replicas[i].outstanding + 1) / replicas[i].capacity_weight, i

        return min(_up_indices(replicas), key=load)


POLICIES = {"round-robin": RoundRobin, "least-outstanding": LeastOutstanding, "capacity-weighted": CapacityWeighted}


def make_policy(name: str) -> DispatchPolicy:
    """A fresh policy by name: round-robin, least-outstanding or capacity-weighted."""
    if name not in POLICIES:
        raise UserError(f"unknown dispatch policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name]()
