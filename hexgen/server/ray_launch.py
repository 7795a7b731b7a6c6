"""Plan -> ReplicaClients whose ranks are Ray actors on the plan's machines; the plan is checked against the
live cluster first (machines present, enough slots) so a bad plan fails in one line with nothing started."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from hexgen.engine.checkpoint import ModelSource
from hexgen.engine.scheduler import SchedulerConfig
from hexgen.errors import PlanError
from hexgen.launch.spec import rank_specs
from hexgen.plan import DeploymentPlan, Replica
from hexgen.server.launch import capacity_weight
from hexgen.server.replica_client import ReplicaClient


def ranks_per_machine(plan: DeploymentPlan) -> Counter[str]:
    return Counter(stage.machine for replica in plan.replicas for stage in replica.stages for _ in stage.gpus)


def check_against_cluster(plan: DeploymentPlan, slots: dict[str, float]) -> None:
    """PlanError if a stage names a machine that has not joined, or a machine gets more ranks than slots."""
    known = ", ".join(f"{name} ({int(n)} slots)" for name, n in sorted(slots.items())) or "none"
    for r, replica in enumerate(plan.replicas):
        for s, stage in enumerate(replica.stages):
            if stage.machine not in slots:
                raise PlanError(f"replica {r} stage {s}: machine {stage.machine!r} is not in the Ray cluster; "
                                f"machines there: {known}")
    for machine, ranks in ranks_per_machine(plan).items():
        if ranks > slots[machine]:
            raise PlanError(f"the plan puts {ranks} ranks on machine {machine!r}, which has {int(slots[machine])} "
                            f"slots (GPUs, or CPU workers); machines: {known}")
        top = max(g for rep in plan.replicas for st in rep.stages if st.machine == machine for g in st.gpus)
        if top >= slots[machine]:
            raise PlanError(f"the plan uses GPU {top} of machine {machine!r}, which has {int(slots[machine])} slots "
                            f"(indices 0..{int(slots[machine]) - 1})")


def make_ray_replica(
    index: int, source: ModelSource, replica: Replica, dtype: str, device: str, scheduler_config: SchedulerConfig,
    eos_token_ids: tuple[int, ...], channel_host: str, threads: dict[str, int],
) -> ReplicaClient:
    """threads[machine]: torch threads of each CPU rank there."""
    from hexgen.launch.ray_replica import RayRanks

    machines = [stage.machine for stage in replica.stages for _ in stage.gpus]
    # spin_count 0: what else runs on a Ray machine's cores is not known here, so threads sleep at barriers at once
    # (and need no releasing after a turn)
    base = rank_specs(source, replica, dtype, device, 1, spin_count=0, end_turns=False)
    specs = [replace(spec, num_threads=threads.get(machine, 1) if device == "cpu" else 1)
             for spec, machine in zip(base, machines, strict=True)]
    rank_args = [(spec, scheduler_config, eos_token_ids) for spec in specs]
    return ReplicaClient(index, replica, lambda address: RayRanks(machines, rank_args, address),
                         capacity_weight(replica), channel_host, secure=True)
