"""Analytic time and memory of pipeline stages and replicas; one model shared by the planner and simulator."""

from hexgen.costmodel.linear import LinearCost
from hexgen.costmodel.memory import kv_pool_blocks, max_stage_layers, stage_memory_bytes
from hexgen.costmodel.params import CostConfig, Workload
from hexgen.costmodel.pipeline import ReplicaCost
from hexgen.costmodel.replica import (
    StagePlacement,
    placements_of,
    replica_cost,
    replica_stage_costs,
    request_latency_s,
)
from hexgen.costmodel.stage import allreduce_s, stage_cost

__all__ = [
    "CostConfig",
    "LinearCost",
    "ReplicaCost",
    "StagePlacement",
    "Workload",
    "allreduce_s",
    "kv_pool_blocks",
    "max_stage_layers",
    "placements_of",
    "replica_cost",
    "replica_stage_costs",
    "request_latency_s",
    "stage_cost",
    "stage_memory_bytes",
]
