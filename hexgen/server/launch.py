"""Turn a plan into started ReplicaClients on this machine, with one progress bar over all weights."""

from __future__ import annotations

import asyncio

from rich.console import Console
from rich.progress import Progress

from hexgen.engine.checkpoint import ModelSource
from hexgen.engine.kv_budget import GIB, RankShape, rank_weight_bytes
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


CUDA_DEFAULT_WEIGHT_FRACTION = 0.75  # of a GPU's memory one rank's weights may take in the default CUDA plan


def default_cuda_plan(spec: ModelSpec, gpu_bytes: list[int], dtype_bytes: int) -> DeploymentPlan:
    """--device cuda without --plan, over this machine's GPUs (`gpu_bytes`: each one's memory): one replica per GPU
    where a GPU holds the weights with a quarter of its memory left (for KV blocks); else replicas of the narrowest
    valid TP degree whose shards fit that way, as many as the GPUs make; else one pipeline of every GPU (TP 1,
    layers split evenly). A PlanError when even that does not hold the weights."""
    count, smallest = len(gpu_bytes), min(gpu_bytes, default=0)

    def fits(layers: tuple[int, int], tp: int) -> bool:
        shape = RankShape(layers[1] - layers[0], tp, layers[0] == 0, layers[1] == spec.num_layers)
        return rank_weight_bytes(spec, shape, dtype_bytes) <= CUDA_DEFAULT_WEIGHT_FRACTION * smallest

    whole = (0, spec.num_layers)
    tp = next((t for t in spec.valid_tp_degrees(count) if fits(whole, t)), None)
    if tp is not None:
        replicas = tuple(Replica((Stage(LOCAL_MACHINE, tuple(range(i * tp, (i + 1) * tp)), tp, whole),))
                         for i in range(count // tp))
        idle = list(range(count // tp * tp, count))
        how = f"{len(replicas)} replica(s) of TP {tp}" + (f", GPU(s) {idle} left idle" if idle else "")
    else:
        cuts = [round(i * spec.num_layers / count) for i in range(count + 1)]
        stages = tuple(Stage(LOCAL_MACHINE, (i,), 1, (cuts[i], cuts[i + 1])) for i in range(count))
        if count > spec.num_layers or not all(fits(s.layers, 1) for s in stages):
            gib = rank_weight_bytes(spec, RankShape(spec.num_layers, 1, True, True), dtype_bytes) / GIB
            raise PlanError(
                f"{spec.name}'s weights ({gib:.1f} GiB) do not fit on this machine's {count} GPU(s) of "
                f"{smallest / GIB:.1f} GiB with room for KV blocks: give a plan over more machines (`hexgen plan`, "
                "`hexgen serve --ray`) or a smaller --dtype")
        replicas, how = (Replica(stages),), f"one pipeline of {count} stages"
    plan = DeploymentPlan(spec.name, replicas, meta={"source": "hexgen serve default CUDA plan", "layout": how})
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
