"""A batching pipeline's stages chosen for throughput: the stage mixes of a group of one or two machines, each split
for its slowest stage.

The DP (dp.py) picks a group's machines, their order and their stages' TP degrees by the sum of stage times, and
the evaluator then re-splits the layers for the slowest stage (throughput_split.py). A batching pipeline's rate
follows its slowest stage, so other stages may serve more: 4 x A40 at TP 4 alone are the fastest for one request,
yet with 2 x L40S at TP 2 taking half the layers in front of them they serve 5% more at full load (tested against
the event simulator in tests/scheduler/test_stage_choice.py). For a group of at most MAX_MACHINES machines every
such pipeline is listed here: the machines it uses in either order, on each k stages of one TP degree. Each
pipeline's layers are split by min_max_split, and the evaluator keeps the one the cost model says serves most at
full load. Mixing TP degrees on one machine (4 + 2 + 2) and groups of three machines were listed too at first: on
40 random clusters (70 plans, `scripts/stage_choice_gain.py --seed 0` and `--clusters 16 --seed 5`) they changed no
plan, and made the search 1.2-1.3x and 2.7-3.8x slower. So neither is listed.

Pipelines are priced slowest stage first, and the listing stops early: B sequences through a pipeline whose slowest
stage takes T for a batch of B alone are served at most B / T a second (each stage serves every micro-batch in
turn, and a micro-batch of B / S costs a stage at least 1 / S of the whole batch's time), so once B / T is below
the best rate found, no pipeline after it serves more.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from hexgen.planner.dp import LayoutStage
from hexgen.planner.pricing import StagePricer
from hexgen.planner.throughput_split import StageRate, min_max_split

Stages = tuple[tuple[str, int], ...]  # (machine, TP degree) of each stage, in pipeline order

MAX_MACHINES = 2  # larger groups are left to the DP's layout


def degree_mixes(degrees: list[int], gpus: int) -> list[tuple[int, ...]]:
    """A machine's stage mixes: k stages of one TP degree d, k x d at most `gpus`, largest degree first."""
    return [(d,) * k for d in sorted(degrees, reverse=True) for k in range(1, gpus // d + 1)]


def pipelines(group: tuple[tuple[str, int], ...], pricer: StagePricer) -> Iterator[Stages]:
    """Every pipeline over the group's machines (each used at most once, with at most the GPUs the group gives it)
    whose machines each run one of their stage mixes."""
    mixes = {m: degree_mixes(pricer.tp_degrees(m), n) for m, n in group}
    for used in range(1, len(group) + 1):
        for order in itertools.permutations(mixes, used):
            for choice in itertools.product(*(mixes[m] for m in order)):
                yield tuple((m, d) for m, mix in zip(order, choice, strict=True) for d in mix)


def stage_rates(pricer: StagePricer, stages: Stages) -> list[StageRate]:
    """Each stage's full-batch time per layer, its extras (embedding / LM head by its place) and its layer cap."""
    last = len(stages) - 1
    return [StageRate(pricer.per_layer_s(m, d), pricer.stage_extra_s(m, d, i == 0, i == last),
                      pricer.max_layers(m, d, i == 0, i == last)) for i, (m, d) in enumerate(stages)]


def split_pipelines(group: tuple[tuple[str, int], ...],
                    pricer: StagePricer) -> list[tuple[float, tuple[LayoutStage, ...]]]:
    """Every pipeline of the group with its layers split by min_max_split (those that hold the model), and its
    slowest stage's time for a full batch (the pricer's), slowest-stage-fastest first."""
    split_ones = []
    for stages in pipelines(group, pricer):
        rates = stage_rates(pricer, stages)
        split = min_max_split(rates, pricer.model.num_layers)
        if split is not None:
            slowest_s = max(r.time_s(n) for r, n in zip(rates, split, strict=True))
            split_ones.append((slowest_s, tuple(LayoutStage(m, d, n)
                                                for (m, d), n in zip(stages, split, strict=True))))
    split_ones.sort(key=lambda pair: pair[0])  # stable: listing order on ties
    return split_ones
