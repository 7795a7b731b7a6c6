"""Turn a plan into started ReplicaClients on this machine, with one progress bar over all weights."""

from __future__ import annotations

import asyncio

from rich.console import Console
from rich.progress import Progress

from hexgen.engine.checkpoint import ModelSource
from hexgen.engine.scheduler import SchedulerConfig
from hexgen.errors import PlanError
from hexgen.launch.spec import cpu_threads_per_rank, omp_spin_count, rank_specs, takes_turns
from hexgen.machine import usable_cores
from hexgen.models import ModelSpec
from hexgen.plan import LOCAL_MACHINE, DeploymentPlan, Replica, Stage
from hexgen.server.replica_client import ReplicaClient, ReplicaStartError, local_ranks


def default_local_plan(spec: ModelSpec) -> DeploymentPlan:
    """Two replicas on this machine: a two-stage one with unequal TP degrees (the widest valid TP <= 4,
    then TP 1 with a third of the layers) and a one-process one."""
    widest = max(spec.valid_tp_degrees(4))
    tail = max(1, spec.num_layers // 3)
    first = Stage(LOCAL_MACHINE, tuple(range(widest)), widest, (0, spec.num_layers - tail))
    second = Stage(LOCAL_MACHINE, (widest,), 1, (spec.num_layers - tail, spec.num_layers))
    single = Stage(LOCAL_MACHINE, (widest + 1,), 1, (0, spec.num_layers))
    plan = DeploymentPlan(
        spec.name, (Replica((first, second)), Replica((single,))), meta={"source": "hexgen serve default local plan"}
    )
    plan.validate_structure(spec)
    return plan


def check_local(plan: DeploymentPlan) -> None:
    for r, replica in enumerate(plan.replicas):
        for s, stage in enumerate(replica.stages):
            if stage.machine != LOCAL_MACHINE:
                raise PlanError(
                    f"replica {r} stage {s}: machine {stage.machine!r} is not this machine; hexgen serve "
                    f"launches local processes only, so a plan for it names machine '{LOCAL_MACHINE}'"
                )


def default_dispatch(plan: DeploymentPlan) -> str:
    """The plan's dispatch policy, else capacity-weighted when the planner predicted its replicas' throughputs and
    they differ, else least-outstanding (ties to the fastest replica: server/calibrate.py measures speeds where the
    plan has no predictions)."""
    chosen = plan.meta.get("dispatch")
    if chosen:
        return str(chosen)
    weights = {capacity_weight(r) for r in plan.replicas}
    return "capacity-weighted" if len(weights) > 1 else "least-outstanding"


def capacity_weight(replica: Replica) -> float:
    """Relative speed for capacity-weighted dispatch: the planner's predicted throughput, else the inverse of its
    predicted latency, else 1."""
    predicted = replica.predicted
    if predicted.get("throughput_rps"):
        return predicted["throughput_rps"]
    return 1.0 / predicted["latency_s"] if predicted.get("latency_s") else 1.0


def make_replicas(
    source: ModelSource,
    plan: DeploymentPlan,
    dtype: str,
    device: str,
    scheduler_config: SchedulerConfig,
    eos_token_ids: tuple[int, ...],
) -> list[ReplicaClient]:
    threads = cpu_threads_per_rank(plan.replicas, usable_cores()) if device == "cpu" else 1
    spin_count = omp_spin_count(plan.replicas, device)
    end_turns = takes_turns(plan.replicas, device)
    return [
        ReplicaClient(
            i,
            replica,
            local_ranks([(spec, scheduler_config, eos_token_ids)
                         for spec in rank_specs(source, replica, dtype, device, threads, spin_count, end_turns)]),
            capacity_weight(replica),
        )
        for i, replica in enumerate(plan.replicas)
    ]


async def start_all(replicas: list[ReplicaClient]) -> None:
    """Start every replica at once; if one fails, stop the others and re-raise."""
    total = sum(s.num_layers * s.tp for r in replicas for s in r.plan.stages)
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(f"loading weights on {sum(r.world_size for r in replicas)} ranks", total=total)
        results = await asyncio.gather(
            *(r.start(lambda n: bar.advance(task, n)) for r in replicas), return_exceptions=True
        )
    failures = [res for res in results if isinstance(res, BaseException)]
    if failures:
        await asyncio.gather(*(r.close() for r in replicas), return_exceptions=True)
        raise ReplicaStartError("; ".join(str(f) for f in failures))
