"""What the planner's throughput re-split (hexgen/planner/throughput_split.py) brings to two-machine pipelines.

For every pair of built-in GPU types and a few GPU counts per machine (two machines of one region), the full-batch
layout of the group is laid out twice: the DP's split and the evaluator's (re-split where that serves more).
Prints how many pipelines changed and their predicted full-load throughput, new over old.
Usage: .venv/bin/python scripts/resplit_gain.py [--model llama-2-70b] [--max-batch 64]
"""

from __future__ import annotations

import argparse
import itertools
import statistics

from hexgen.cluster import builtin_gpu_types, parse_cluster
from hexgen.costmodel import CostConfig, Workload
from hexgen.models import load_model_spec
from hexgen.planner.evaluate import PlanEvaluator
from hexgen.planner.objective import Objective

COUNTS = ((1, 1), (2, 2), (2, 1), (1, 2), (4, 2), (2, 4), (4, 4))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-2-70b")
    p.add_argument("--max-batch", type=int, default=64)
    args = p.parse_args()
    model, top = load_model_spec(args.model), args.max_batch
    gains, pipelines = [], 0
    for (a, b), (na, nb) in itertools.product(itertools.product(builtin_gpu_types(), repeat=2), COUNTS):
        cluster = parse_cluster(f"machines:\n  - {{name: x, gpu: {a}, count: {na}, region: r}}\n"
                                f"  - {{name: y, gpu: {b}, count: {nb}, region: r}}\n")
        evaluator = PlanEvaluator(cluster, model, [], Objective("tail"), CostConfig(), Workload(128, 64, top),
                                  "capacity-weighted")
        group = (("x", na), ("y", nb))
        layout = evaluator.layout(group, top)
        if layout is None or len(layout.stages) < 2:
            continue
        pipelines += 1
        dp = evaluator.solvers[evaluator.layout_level(group, top)].best(group)
        if layout != dp:  # kept only where it serves more, so the DP's layout served something or nothing
            old = evaluator.full_load_rps(dp)
            gains.append(evaluator.full_load_rps(layout) / old if old else float("inf"))
    print(f"{args.model}, batch {top}: {pipelines} two-machine pipelines, {len(gains)} re-split")
    if gains:
        print(f"full-load throughput new / old: min {min(gains):.3f}, median {statistics.median(gains):.3f}, "
              f"max {max(gains):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
