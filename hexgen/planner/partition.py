"""Partitions of the cluster's GPUs into groups (one replica each) and the merge / split / swap mutations.

A group counts how many GPUs it takes from each machine; which indices it gets is decided when the plan is
written. Every mutation is a pure function of (partition, rng) and conserves each machine's GPU count.
"""

from __future__ import annotations

import random
from collections import Counter

from hexgen.cluster import Cluster

Group = tuple[tuple[str, int], ...]  # (machine, GPU count) sorted by machine, counts > 0
Partition = tuple[Group, ...]  # sorted, so equal partitions compare equal


def make_group(counts: dict[str, int] | Counter) -> Group:
    return tuple(sorted((m, n) for m, n in counts.items() if n > 0))


def make_partition(groups: list[dict[str, int]] | list[Group]) -> Partition:
    normal = [make_group(dict(g)) for g in groups]
    return tuple(sorted(g for g in normal if g))


def gpu_totals(partition: Partition) -> Counter:
    """GPUs per machine over all groups (equals each machine's count for a valid partition)."""
    totals: Counter = Counter()
    for group in partition:
        for machine, n in group:
            totals[machine] += n
    return totals


def by_region(cluster: Cluster) -> Partition:
    """The network-aware start: one group per region, so no replica crosses a slow inter-region link."""
    groups: dict[str, dict[str, int]] = {}
    for m in cluster.machines:
        groups.setdefault(m.region, {})[m.name] = m.count
    return make_partition(list(groups.values()))


def by_machine(cluster: Cluster) -> Partition:
    return make_partition([{m.name: m.count} for m in cluster.machines])


def merge(partition: Partition, rng: random.Random) -> Partition:
    """Two groups become one."""
    if len(partition) < 2:
        return partition
    i, j = rng.sample(range(len(partition)), 2)
    joined = Counter(dict(partition[i])) + Counter(dict(partition[j]))
    rest = [g for k, g in enumerate(partition) if k not in (i, j)]
    return make_partition(rest + [make_group(joined)])


def split(partition: Partition, rng: random.Random) -> Partition:
    """One group becomes two: along machine boundaries, or by halving (or randomly dividing) each machine's GPUs."""
    splittable = [k for k, g in enumerate(partition) if sum(n for _, n in g) >= 2]
    if not splittable:
        return partition
    k = rng.choice(splittable)
    group = dict(partition[k])
    if len(group) >= 2 and rng.random() < 0.5:
        names = sorted(group)
        chosen = set(rng.sample(names, rng.randint(1, len(names) - 1)))
        left = {m: n for m, n in group.items() if m in chosen}
    else:
        halve = rng.random() < 0.5
        left = {m: (n // 2 if halve else rng.randint(0, n)) for m, n in group.items()}
        if sum(left.values()) in (0, sum(group.values())):
            m = rng.choice(sorted(m for m, n in group.items() if n >= 2) or sorted(group))
            left = {m: group[m] // 2} if group[m] >= 2 else {m: group[m]}
    right = {m: n - left.get(m, 0) for m, n in group.items()}
    if not any(right.values()) or not any(left.values()):
        return partition
    rest = [g for i, g in enumerate(partition) if i != k]
    return make_partition(rest + [make_group(left), make_group(right)])


def swap(partition: Partition, rng: random.Random) -> Partition:
    """Two groups exchange an equal number of GPUs from different machines (or one gives GPUs to the other)."""
    if len(partition) < 2:
        return partition
    i, j = rng.sample(range(len(partition)), 2)
    a, b = dict(partition[i]), dict(partition[j])
    pairs = [(x, y) for x in sorted(a) for y in sorted(b) if x != y]
    if pairs:
        x, y = rng.choice(pairs)
        limit = min(a[x], b[y])
        n = rng.choice([p for p in (1, 2, 4, 8) if p <= limit])
        a[x], b[x] = a[x] - n, b.get(x, 0) + n
        b[y], a[y] = b[y] - n, a.get(y, 0) + n
    else:  # both groups hold GPUs of one and the same machine: move some of a's to b
        x = next(iter(a))
        if a[x] < 2:
            return partition
        n = rng.randint(1, a[x] - 1)
        a[x], b[x] = a[x] - n, b[x] + n
    rest = [g for k, g in enumerate(partition) if k not in (i, j)]
    return make_partition(rest + [make_group(a), make_group(b)])


MUTATIONS = {"merge": merge, "split": split, "swap": swap}
