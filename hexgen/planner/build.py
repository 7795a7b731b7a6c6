"""Turn per-group pipeline layouts into a DeploymentPlan with concrete GPU indices on each machine."""

from __future__ import annotations

from collections import Counter
from typing import Any

from hexgen.plan import DeploymentPlan, Replica, Stage
from hexgen.planner.dp import PipelineLayout


def build_plan(model_name: str, layouts: list[PipelineLayout], meta: dict[str, Any] | None = None) -> DeploymentPlan:
    """Stages take the next free GPU indices of their machine, replica by replica, stage by stage (predictions are
    added by the caller, which knows the workload)."""
    next_gpu: Counter = Counter()
    replicas = []
    for layout in layouts:
        stages, first_layer = [], 0
        for st in layout.stages:
            start = next_gpu[st.machine]
            next_gpu[st.machine] += st.tp_degree
            gpus = tuple(range(start, start + st.tp_degree))
            stages.append(Stage(st.machine, gpus, st.tp_degree, (first_layer, first_layer + st.num_layers)))
            first_layer += st.num_layers
        replicas.append(Replica(tuple(stages)))
    return DeploymentPlan(model=model_name, replicas=tuple(replicas), meta=dict(meta or {}))
