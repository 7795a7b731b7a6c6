"""The load model's full-load rate of pipelines against the event simulator's, over request shapes.

For one-stage replicas and pipelines of two to four stages of Llama-2-70B (batch 64) over several GPU types, prints
per request shape the load model's full-load rate (`ReplicaCost.full_load_rps`) over the rate at which the event
simulator, running the engine's scheduler step by step, finishes a stream that arrives far faster than it serves
(all requests over the time from the first arrival to the last finish). The table in docs/cost-model.md ("A prompt
on a pipeline"); run with PYTHONPATH=<an older checkout> to measure that checkout's load model.
Usage: .venv/bin/python scripts/pipeline_rate_check.py [--requests 2400]
"""

from __future__ import annotations

import argparse
import random

from rich.progress import track

from hexgen.cluster import parse_cluster
from hexgen.costmodel import CostConfig, StagePlacement, Workload, replica_stage_costs
from hexgen.dispatch import make_policy
from hexgen.models import load_model_spec
from hexgen.sim.servers import ReplicaModel
from hexgen.sim.simulator import simulate
from hexgen.sim.workload import TokenLengths, WorkloadSpec, generate_requests

CLUSTER = """machines:
  - {name: x, gpu: A100-40G, count: 4, region: r}
  - {name: y, gpu: A100-80G, count: 2, region: r}
  - {name: a5, gpu: A5000, count: 2, region: r}
  - {name: a4, gpu: A40, count: 2, region: r}
  - {name: v, gpu: V100, count: 4, region: r}
  - {name: r4, gpu: RTX4090, count: 4, region: r}
  - {name: a40k, gpu: A4000, count: 4, region: r}
  - {name: far, gpu: A100-80G, count: 2, region: q}
"""
# (machine, TP degree, layers) of each stage
REPLICAS = (
    (("x", 4, 80),), (("y", 2, 80),),
    (("x", 4, 46), ("y", 2, 34)), (("x", 2, 40), ("x", 2, 40)), (("a5", 2, 24), ("a4", 2, 56)),
    (("a5", 2, 27), ("a4", 2, 53)), (("r4", 4, 31), ("y", 2, 49)), (("v", 4, 35), ("y", 2, 45)),
    (("v", 2, 25), ("r4", 4, 55)), (("x", 1, 20), ("x", 1, 20), ("x", 2, 40)), (("a40k", 4, 31), ("v", 4, 49)),
    (("x", 4, 50), ("far", 2, 30)), (("x", 1, 10), ("x", 1, 10), ("x", 1, 10), ("x", 1, 50)),
)
SHAPES = (  # prompt and output token ranges
    ((128, 128), (32, 96)), ((64, 192), (1, 127)), ((512, 512), (32, 96)), ((128, 128), (128, 384)),
    ((128, 128), (64, 64)), ((512, 512), (64, 64)),
)
MAX_BATCH = 64


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2400)
    args = p.parse_args()
    cluster, model = parse_cluster(CLUSTER), load_model_spec("llama-2-70b")
    print("| prompt / output tokens | one stage | pipelines (range) | pipelines, each |")
    print("|---|---|---|---|")
    for (p_lo, p_hi), (o_lo, o_hi) in track(SHAPES, description="request shapes"):
        prompt, output = TokenLengths(p_lo, p_hi), TokenLengths(o_lo, o_hi)
        workload = Workload(round(prompt.mean), round(output.mean), MAX_BATCH)
        ratios: dict[bool, list[float]] = {False: [], True: []}
        for stages in REPLICAS:
            placements = [StagePlacement(m, cluster.machine(m).gpu, tp, n, cluster.tp_link(m)) for m, tp, n in stages]
            cost = replica_stage_costs(cluster, model, placements, CostConfig(), workload)
            if cost.max_running(MAX_BATCH, workload.prompt_tokens, workload.output_tokens) < MAX_BATCH:
                continue  # its KV pool holds no full batch of this shape
            stream = generate_requests(WorkloadSpec(200.0, args.requests, prompt, output), random.Random(1))
            done = simulate([ReplicaModel(cost, MAX_BATCH)], stream, make_policy("capacity-weighted"))
            simulated = len(done) / (max(c.finish_s for c in done) - min(c.request.arrival_s for c in done))
            predicted = cost.full_load_rps(MAX_BATCH, workload.prompt_tokens, workload.output_tokens)
            ratios[len(stages) > 1].append(predicted / simulated)
        one = ", ".join(f"{r:.2f}" for r in ratios[False])
        pipes = ratios[True]
        shape = f"{p_lo}-{p_hi} / {o_lo}-{o_hi}".replace("128-128", "128").replace("512-512", "512")
        print(f"| {shape} | {one} | {min(pipes):.2f}-{max(pipes):.2f} | {' '.join(f'{r:.2f}' for r in pipes)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
