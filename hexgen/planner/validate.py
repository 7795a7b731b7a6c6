"""The one plan validator: structure, machines and GPUs that exist, legal TP groups, memory on every GPU."""

from __future__ import annotations

from dataclasses import dataclass, replace

from hexgen.cluster import GIB, Cluster
from hexgen.costmodel import CostConfig, Workload, placements_of, replica_stage_costs, stage_memory_bytes
from hexgen.errors import PlanError
from hexgen.models import ModelSpec
from hexgen.plan import DeploymentPlan, Replica, Stage


@dataclass(frozen=True)
class StageMemory:
    """Per-GPU memory of one stage against the capacity of its GPU type."""

    replica: int
    stage: int
    used_bytes: float
    capacity_bytes: float


def validate_plan(
    plan: DeploymentPlan, model: ModelSpec, cluster: Cluster, workload: Workload, cfg: CostConfig
) -> list[StageMemory]:
    """Raise PlanError naming the replica, stage and rule broken; return per-stage memory when all hold."""
    plan.validate_structure(model)
    # The engine's paged KV pool takes what memory is left, so a stage must hold its weights, activations and
    # reserve plus the KV cache of at least one sequence of the workload; a smaller pool just batches less.
    batch, workload = workload.max_batch, replace(workload, max_batch=1)
    out = []
    for r, replica in enumerate(plan.replicas):
        out += _check_replica_memory(replica, r, model, cluster, workload, cfg)
        _check_pool(replica, r, model, cluster, replace(workload, max_batch=batch), cfg)
    return out


def _check_replica_memory(
    replica: Replica, r: int, model: ModelSpec, cluster: Cluster, workload: Workload, cfg: CostConfig
) -> list[StageMemory]:
    out = []
    last = len(replica.stages) - 1
    for s, stage in enumerate(replica.stages):
        where = f"replica {r} stage {s}"
        _check_placement(stage, where, cluster)
        gpu = cluster.machine(stage.machine).gpu
        used = stage_memory_bytes(model, stage.tp, stage.num_layers, workload, cfg, is_first=s == 0, is_last=s == last)
        if used > gpu.memory_bytes:
            raise PlanError(
                f"{where}: needs {used / GIB:.1f} GiB per GPU but {stage.machine}'s {gpu.name} has "
                f"{gpu.memory_gb:.1f} GiB (rule: memory fits; {stage.num_layers} layers at TP {stage.tp} with "
                f"KV cache for one sequence of {workload.context_tokens} tokens)"
            )
        out.append(StageMemory(r, s, used, gpu.memory_bytes))
    return out


def _check_pool(
    replica: Replica, r: int, model: ModelSpec, cluster: Cluster, workload: Workload, cfg: CostConfig
) -> None:
    """The engine refuses a batch limit above its KV pool's block count (one block per running sequence)."""
    if workload.max_batch == 1:
        return
    blocks = replica_stage_costs(cluster, model, placements_of(replica, cluster), cfg, workload).kv_blocks or 0
    if blocks < workload.max_batch:
        raise PlanError(
            f"replica {r}: its KV pool holds {blocks} blocks of {cfg.kv_block_tokens} tokens on every rank, fewer "
            f"than one per sequence of the batch limit {workload.max_batch} (rule: the engine needs a block per "
            "running sequence); lower --max-batch or give the replica's tightest stage more memory"
        )


def _check_placement(stage: Stage, where: str, cluster: Cluster) -> None:
    if stage.machine not in cluster.machine_names:
        raise PlanError(
            f"{where}: machine {stage.machine!r} is not in the cluster (rule: stages run on cluster machines; "
            f"machines: {', '.join(cluster.machine_names)})"
        )
    machine = cluster.machine(stage.machine)
    bad = [g for g in stage.gpus if not 0 <= g < machine.count]
    if bad:
        raise PlanError(
            f"{where}: GPU {bad[0]} does not exist on {machine.name}, which has GPUs 0-{machine.count - 1} "
            "(rule: a TP group lies on one machine, of one GPU type)"
        )
