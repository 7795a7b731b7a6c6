"""Evolutionary search over partitions: mutate the best few, keep the best, stop when nothing improves."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from hexgen.planner.partition import MUTATIONS, Partition

Score = tuple[float, ...]  # compared lexicographically; higher is better


@dataclass(frozen=True)
class GAConfig:
    """(mu + lambda) evolution: `population` survivors, `offspring` children per generation."""

    generations: int = 150
    population: int = 4
    offspring: int = 10
    patience: int = 30  # stop after this many generations without a better best
    max_mutations: int = 2  # each child gets 1..max_mutations random operators


@dataclass(frozen=True)
class SearchResult:
    best: Partition
    best_score: Score
    generations_run: int
    evaluations: int
    history: tuple[Score, ...]  # best score after each generation


def mutate(partition: Partition, rng: random.Random, max_mutations: int) -> Partition:
    child = partition
    for _ in range(rng.randint(1, max_mutations)):
        child = MUTATIONS[rng.choice(sorted(MUTATIONS))](child, rng)
    return child


def evolve(
    initial: list[Partition], score: Callable[[Partition], Score], cfg: GAConfig, rng: random.Random,
    on_generation: Callable[[int, Score], None] | None = None,
) -> SearchResult:
    """Search from `initial` partitions; deterministic for a given rng state and score function."""
    scores: dict[Partition, Score] = {}

    def rated(p: Partition) -> Score:
        if p not in scores:
            scores[p] = score(p)
        return scores[p]

    def ranked(pool: list[Partition]) -> list[Partition]:
        unique = list(dict.fromkeys(pool))
        return sorted(unique, key=lambda p: (tuple(-x for x in rated(p)), p))[: cfg.population]

    population = ranked(initial)
    history: list[Score] = []
    stale, gen = 0, 0
    for gen in range(1, cfg.generations + 1):
        children = []
        for _ in range(cfg.offspring):
            a, b = rng.choice(population), rng.choice(population)
            parent = a if (rated(a), a) >= (rated(b), b) else b
            children.append(mutate(parent, rng, cfg.max_mutations))
        previous_best = rated(population[0])
        population = ranked(population + children)
        history.append(rated(population[0]))
        if on_generation:
            on_generation(gen, history[-1])
        stale = 0 if history[-1] > previous_best else stale + 1
        if stale >= cfg.patience:
            break
    return SearchResult(population[0], rated(population[0]), gen, len(scores), tuple(history))
