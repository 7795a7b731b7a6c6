"""Analytic time and memory of pipeline stages and replicas; one model shared by the planner and simulator."""

from hexgen.costmodel.linear import LinearCost
from hexgen.costmodel.memory import max_stage_layers, stage_memory_bytes
from hexgen.costmodel.params import CostConfig, Workload
from hexgen.costmodel.replica import StagePlacement, placements_of, replica_cost, request_latency_s
from hexgen.costmodel.stage import allreduce_s, stage_cost

__all__ = [
    "CostConfig",
    "LinearCost",
    "StagePlacement",
    "Workload",
    "allreduce_s",
    "max_stage_layers",
    "replica_cost",
    "placements_of",
    "request_latency_s",
    "stage_cost",
    "stage_memory_bytes",
]
