"""Mutation operators: pure, seeded, and they never create or lose a GPU."""

from __future__ import annotations

import random

import pytest

from hexgen.cluster import load_cluster
from hexgen.planner.partition import by_machine, by_region, gpu_totals, make_partition, merge, split, swap

FULL = load_cluster("examples/clusters/hetero-full.yaml")
COUNTS = {m.name: m.count for m in FULL.machines}


def test_by_region_groups_each_region_once():
    p = by_region(FULL)
    assert len(p) == 4 and gpu_totals(p) == COUNTS
    assert len(by_machine(FULL)) == len(FULL.machines)


@pytest.mark.parametrize("op", [merge, split, swap])
def test_operators_conserve_gpus_and_are_pure(op):
    rng = random.Random(11)
    p = by_region(FULL)
    for _ in range(300):
        before = p
        p = op(p, rng) if rng.random() < 0.7 else split(p, rng)
        assert gpu_totals(p) == COUNTS
        assert all(n > 0 for g in p for _, n in g)
        assert before == tuple(before)  # the input is an immutable value, never edited in place
    again = random.Random(11)
    q = by_region(FULL)
    for _ in range(300):
        q = op(q, again) if again.random() < 0.7 else split(q, again)
    assert q == p  # same seed, same walk


def test_merge_split_swap_shapes():
    p = make_partition([{"a": 4, "b": 2}, {"c": 2}])
    assert merge(p, random.Random(0)) == make_partition([{"a": 4, "b": 2, "c": 2}])
    halves = split(make_partition([{"a": 4}]), random.Random(0))
    assert len(halves) == 2 and gpu_totals(halves) == {"a": 4}
    swapped = swap(p, random.Random(0))
    assert sorted(sum(n for _, n in g) for g in swapped) == [2, 6]  # an exchange keeps group sizes
    assert swapped != p and gpu_totals(swapped) == gpu_totals(p)
    assert split(make_partition([{"a": 1}]), random.Random(0)) == make_partition([{"a": 1}])
