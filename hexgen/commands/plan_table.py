"""A deployment plan as a rich table: stages, machines, GPUs, TP, layers, memory against capacity; per replica its
latency alone, the batch its KV pool allows, its full-load throughput and cost."""

from __future__ import annotations

from rich.table import Table

from hexgen.cluster import GIB, Cluster
from hexgen.plan import DeploymentPlan
from hexgen.planner.validate import StageMemory


def plan_table(plan: DeploymentPlan, cluster: Cluster, memory: list[StageMemory]) -> Table:
    mem = {(m.replica, m.stage): m for m in memory}
    table = Table(title=f"{plan.model}: {len(plan.replicas)} replica(s)")
    numeric = ("TP", "latency", "batch", "req/s", "$/h")
    for name in ("replica", "stage", "machine", "GPUs", "type", "TP", "layers", "memory/GPU", *numeric[1:]):
        table.add_column(name, justify="right" if name in numeric else "left")
    for r, replica in enumerate(plan.replicas):
        for s, stage in enumerate(replica.stages):
            machine = cluster.machine(stage.machine)
            m = mem[(r, s)]
            first = s == 0
            latency = replica.predicted.get("latency_s")
            batch, rps = replica.predicted.get("max_batch"), replica.predicted.get("throughput_rps")
            cost = sum(cluster.machine(st.machine).cost_per_hour / cluster.machine(st.machine).count * st.tp
                       for st in replica.stages)
            table.add_row(
                str(r) if first else "", str(s), stage.machine, ",".join(map(str, stage.gpus)), machine.gpu.name,
                str(stage.tp), f"{stage.layers[0]}-{stage.layers[1] - 1} ({stage.num_layers})",
                f"{m.used_bytes / GIB:.1f} / {m.capacity_bytes / GIB:.0f} GiB",
                f"{latency:.2f} s" if first and latency is not None else "",
                f"{batch:g}" if first and batch is not None else "",
                f"{rps:.2f}" if first and rps is not None else "",
                f"{cost:.2f}" if first else "",
                end_section=s == len(replica.stages) - 1,
            )
    return table
