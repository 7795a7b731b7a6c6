"""`hexgen plan`: search a deployment plan for a cluster, show it as a table, write it as JSON."""

from __future__ import annotations

import argparse

from hexgen.commands.arg_types import MAX_REQUESTS, model_name, output_file, request_count
from hexgen.commands.workload_args import add_workload_args, sizing_workload, slo_seconds
from hexgen.errors import UserError


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="plan replicas, stages, TP and layers for a GPU cluster",
                              description=__doc__)
    p.add_argument("--cluster", required=True, help="cluster YAML file")
    p.add_argument("--model", type=model_name, required=True, help="model preset name or a directory / config.json")
    add_workload_args(p)
    p.add_argument("--requests", type=request_count, default=1000,
                   help=f"simulated requests per candidate plan, 1 to {MAX_REQUESTS:,}")
    p.add_argument("--generations", type=int, default=150, help="most generations of the genetic search")
    p.add_argument("--objective", default="attainment", choices=["attainment", "tail"],
                   help="attainment: most requests within the deadline, then the lowest p99; "
                        "tail: lowest latency that 99%% of requests meet (the deadline is then only reported)")
    p.add_argument("-o", "--output", type=output_file, help="write the plan JSON here")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from hexgen.commands.plan_table import plan_table
    from hexgen.commands.workload_args import cost_config, dispatch_policy, load_profiled_cluster
    from hexgen.models import load_model_spec
    from hexgen.planner.genetic import GAConfig
    from hexgen.planner.search import PlanRequest, plan_cluster
    from hexgen.planner.validate import validate_plan

    if args.generations < 0:
        raise UserError(f"--generations must be >= 0 (0: the seeded plans only), got {args.generations}")
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)
    cluster, model, cfg = load_profiled_cluster(args), load_model_spec(args.model), cost_config(args)
    workload = sizing_workload(args, model)
    slo_s, reference_s = slo_seconds(args, model, cfg)
    dispatch = dispatch_policy(args, workload.max_batch)
    request = PlanRequest(args.rate, slo_s, workload, args.requests, dispatch, args.seed,
                          GAConfig(generations=args.generations), args.objective)
    machines = len(cluster.machines)
    console.print(f"planning {model.name} on {cluster.num_gpus} GPUs of {machines} machine{'s' * (machines != 1)}: "
                  f"laying out the starting plans, then up to {args.generations} generations of the search")
    columns = (TextColumn("{task.fields[phase]}"), BarColumn(), TextColumn("gen {task.completed}/{task.total}"),
               TextColumn("best {task.fields[best]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        # laying out the starting plans (the pipeline DP over each group of machines) can take most of the time
        task = progress.add_task("search", total=args.generations, best="", phase="laying out the starting plans")
        result = plan_cluster(cluster, model, request, cfg, lambda gen, score: progress.update(
            task, completed=gen, best=_describe(score), phase="searching"))
    memory = validate_plan(result.plan, model, cluster, workload, cfg)
    console.print(plan_table(result.plan, cluster, memory))
    meta = result.plan.meta
    console.print(
        f"batch limit {workload.max_batch} per replica, {dispatch} dispatch; "
        f"deadline {slo_s:.2f} s (reference latency {reference_s:.2f} s), rate {args.rate} req/s: predicted SLO "
        f"attainment {meta['predicted_slo_attainment']:.1%}, 99% of requests within "
        f"{meta['predicted_tail_latency_s']:.2f} s; plan uses GPUs worth "
        f"${_used_cost(result.plan, cluster):.2f}/h of the cluster's ${cluster.cost_per_hour:.2f}/h"
    )
    console.print(f"planned {cluster.num_gpus} GPUs in {result.elapsed_s:.1f} s "
                  f"({result.search.generations_run} generations, {result.search.evaluations} plans simulated)")
    shared = [m.name for m in cluster.machines if m.cpu_cores is not None]
    if shared:
        console.print(f"note: the search prices the worker slots of {', '.join(shared)} as devices of their own; "
                      "their ranks share the machine's cpu_cores, which `hexgen simulate --plan` models")
    if args.output:
        result.plan.save(args.output)
        console.print(f"wrote {args.output}")
    return 0


def _describe(score: tuple[float, ...]) -> str:
    """A search score in words: (attainment, -p99, -mean) or (-p99, -mean)."""
    tail = f"p99 {-score[-2]:.2f} s"
    return f"attainment {score[0]:.1%}, {tail}" if len(score) == 3 else tail


def _used_cost(plan, cluster) -> float:
    from hexgen.sim.run import plan_cost_per_hour

    return plan_cost_per_hour(plan, cluster)
