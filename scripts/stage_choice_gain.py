"""What laying small groups out for throughput (hexgen/planner/stage_choice.py) brings to batching plans.

Random clusters (seeded): two or three machines of 2 or 4 GPUs of the built-in types, one region. Each is planned
with the throughput choice and without it (stage_choice.MAX_MACHINES set to 0, which leaves every group to the DP, as
before), at 60% and 90% of the plain plan's predicted capacity; prints the p99 of both plans as the planner predicts
it (the analytic load model) and as the event simulator gives it (3,000 requests of another seed), and the search
times.
Usage: .venv/bin/python scripts/stage_choice_gain.py [--clusters 24] [--seed 0] [--model llama-2-70b]
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import time
from unittest import mock

import numpy as np
from rich.progress import track

from hexgen.cluster import Cluster, builtin_gpu_types, parse_cluster
from hexgen.costmodel import CostConfig, Workload, placements_of, replica_stage_costs
from hexgen.dispatch import make_policy
from hexgen.errors import UserError
from hexgen.models import ModelSpec, load_model_spec
from hexgen.plan import DeploymentPlan
from hexgen.planner.search import PlanRequest, plan_cluster
from hexgen.sim.servers import ReplicaModel
from hexgen.sim.simulator import simulate
from hexgen.sim.workload import TokenLengths, WorkloadSpec, generate_requests

WORKLOAD = Workload(prompt_tokens=128, output_tokens=64, max_batch=64)
RATE_FRACTIONS = (0.6, 0.9)


def plan(cluster: Cluster, model: ModelSpec, rate_rps: float, seed: int,
         stage_choice: bool) -> tuple[DeploymentPlan, float]:
    """The plan and its search's seconds, with or without the throughput choice."""
    request = PlanRequest(rate_rps, 100.0, WORKLOAD, 500, "capacity-weighted", seed, objective="tail")
    with contextlib.nullcontext() if stage_choice else mock.patch("hexgen.planner.stage_choice.MAX_MACHINES", 0):
        start = time.perf_counter()
        result = plan_cluster(cluster, model, request)
        return result.plan, time.perf_counter() - start


def simulated_p99_s(cluster: Cluster, model: ModelSpec, plan: DeploymentPlan, rate_rps: float, seed: int) -> float:
    requests = generate_requests(WorkloadSpec(rate_rps, 3000, TokenLengths.fixed(WORKLOAD.prompt_tokens),
                                              TokenLengths.fixed(WORKLOAD.output_tokens)), random.Random(seed + 1))
    costs = [replica_stage_costs(cluster, model, placements_of(r, cluster), CostConfig(), WORKLOAD)
             for r in plan.replicas]
    done = simulate([ReplicaModel(c, WORKLOAD.max_batch) for c in costs], requests, make_policy("capacity-weighted"))
    return float(np.percentile([c.latency_s for c in done], 99))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clusters", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="llama-2-70b")
    args = p.parse_args()
    rng, model, gpu_types = random.Random(args.seed), load_model_spec(args.model), list(builtin_gpu_types())
    ratios, simulated, changed, times_s = [], [], 0, {False: 0.0, True: 0.0}
    for _ in track(range(args.clusters), description="clusters"):
        machines = [(rng.choice(gpu_types), rng.choice([2, 4])) for _ in range(rng.choice([2, 3]))]
        cluster = parse_cluster("machines:\n" + "".join(
            f"  - {{name: m{i}, gpu: {g}, count: {n}, region: r}}\n" for i, (g, n) in enumerate(machines)))
        try:
            light, _ = plan(cluster, model, 0.5, args.seed, False)
        except UserError:  # the model does not fit these GPUs
            continue
        capacity_rps = sum(r.predicted["throughput_rps"] for r in light.replicas)
        for fraction in RATE_FRACTIONS:
            (plain, plain_s), (chosen, chosen_s) = (plan(cluster, model, capacity_rps * fraction, args.seed, c)
                                                    for c in (False, True))
            times_s[False] += plain_s
            times_s[True] += chosen_s
            p99 = [pl.meta["predicted_tail_latency_s"] for pl in (plain, chosen)]
            ratios.append(p99[1] / p99[0])
            if plain.replicas != chosen.replicas:
                changed += 1
                sim = [simulated_p99_s(cluster, model, pl, capacity_rps * fraction, args.seed)
                       for pl in (plain, chosen)]
                simulated.append(sim[1] / sim[0])
            else:
                sim = [float("nan")] * 2
            print(" + ".join(f"{n} x {g}" for g, n in machines), f"at {capacity_rps * fraction:.2f} req/s: p99 "
                  f"predicted {p99[0]:.2f} s -> {p99[1]:.2f} s ({p99[1] / p99[0]:.3f}x), "
                  f"simulated {sim[0]:.2f} s -> {sim[1]:.2f} s ({sim[1] / sim[0]:.3f}x)")
    if ratios:
        print(f"{args.model}, batch {WORKLOAD.max_batch}: {len(ratios)} plans, {changed} changed by the throughput "
              f"choice; predicted p99 with / without: min {min(ratios):.3f}, median {statistics.median(ratios):.3f}, "
              f"max {max(ratios):.3f}; search {times_s[False]:.1f} s -> {times_s[True]:.1f} s in all")
    if simulated:
        print(f"the {changed} changed plans, simulated p99 with / without: min {min(simulated):.3f}, median "
              f"{statistics.median(simulated):.3f}, max {max(simulated):.3f}; "
              f"{sum(r < 1 for r in simulated)} lower, {sum(r > 1 for r in simulated)} higher")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
