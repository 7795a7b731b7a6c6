"""Simulate a deployment plan: plan -> replica step-time models -> event loop -> report."""

from __future__ import annotations

import random

from hexgen.cluster import Cluster
from hexgen.costmodel import CostConfig, Workload, placements_of, replica_stage_costs
from hexgen.dispatch import make_policy
from hexgen.launch.spec import cpu_threads_per_rank
from hexgen.models import ModelSpec
from hexgen.plan import DeploymentPlan
from hexgen.sim.host import CpuHost
from hexgen.sim.metrics import SimReport, summarise
from hexgen.sim.servers import ReplicaModel
from hexgen.sim.simulator import Completion, simulate
from hexgen.sim.workload import WorkloadSpec, generate_requests


def replica_models(
    plan: DeploymentPlan, cluster: Cluster, model: ModelSpec, cfg: CostConfig, max_batch: int = 1,
    sizing: Workload | None = None,
) -> list[ReplicaModel]:
    """Step-time models of the plan's replicas, with each stage's machine and TP degree; `sizing` (the longest
    request shape) sizes their KV pools the way the engine does, from the memory left after weights and
    activations."""
    costs = [replica_stage_costs(cluster, model, placements_of(r, cluster), cfg, sizing) for r in plan.replicas]
    return [ReplicaModel(cost, max_batch, tuple((s.machine, s.tp) for s in r.stages))
            for cost, r in zip(costs, plan.replicas, strict=True)]


def shared_hosts(plan: DeploymentPlan, cluster: Cluster, beside_s_per_token: float = 0.0) -> dict[str, CpuHost]:
    """The plan's machines whose ranks share CPU cores (`cpu_cores` in the cluster file), as `hexgen serve` would
    run them there: threads per rank by `cpu_threads_per_rank` over the replicas with a stage on the machine, the
    handoff between co-located stages from the machine's profile, and `beside_s_per_token` CPU seconds per output
    token of other processes on it (the coordinator)."""
    hosts = {}
    for name in sorted({s.machine for r in plan.replicas for s in r.stages}):
        machine = cluster.machine(name)
        if machine.cpu_cores is None:
            continue
        here = [r for r in plan.replicas if any(s.machine == name for s in r.stages)]
        hosts[name] = CpuHost(machine.cpu_cores, cpu_threads_per_rank(here, machine.cpu_cores), beside_s_per_token,
                              machine.gpu.colocated_handoff_ms / 1e3, machine.gpu.colocated_handoff_seq_ms / 1e3)
    return hosts


def sizing_of(spec: WorkloadSpec, max_batch: int) -> Workload:
    """The request shape memory is sized for: the longest prompt and output the workload draws."""
    return Workload(spec.prompt.high, spec.output.high, max_batch)


def plan_cost_per_hour(plan: DeploymentPlan, cluster: Cluster) -> float:
    """Price of the GPUs the plan uses (each GPU costs its machine's price divided by its GPU count)."""
    total = 0.0
    for replica in plan.replicas:
        for stage in replica.stages:
            machine = cluster.machine(stage.machine)
            total += machine.cost_per_hour / machine.count * len(stage.gpus)
    return total


def run_plan(
    plan: DeploymentPlan, cluster: Cluster, model: ModelSpec, spec: WorkloadSpec, *, dispatch: str = "round-robin",
    seed: int = 0, cfg: CostConfig | None = None, max_batch: int = 1,
) -> list[Completion]:
    requests = generate_requests(spec, random.Random(seed))
    models = replica_models(plan, cluster, model, cfg or CostConfig(), max_batch, sizing_of(spec, max_batch))
    return simulate(models, requests, make_policy(dispatch), hosts=shared_hosts(plan, cluster))


def simulate_plan(
    plan: DeploymentPlan, cluster: Cluster, model: ModelSpec, spec: WorkloadSpec, slo_s: float, *,
    dispatch: str = "round-robin", seed: int = 0, cfg: CostConfig | None = None, max_batch: int = 1,
    cost_per_hour: float | None = None,
) -> SimReport:
    """Metrics of the plan under the workload; cost defaults to the GPUs the plan uses."""
    done = run_plan(plan, cluster, model, spec, dispatch=dispatch, seed=seed, cfg=cfg, max_batch=max_batch)
    price = plan_cost_per_hour(plan, cluster) if cost_per_hour is None else cost_per_hour
    return summarise(done, slo_s, price)
