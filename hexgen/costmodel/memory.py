"""Bytes one GPU of a stage needs: its weight shard, its KV-cache shard, activations and a runtime reserve."""

from __future__ import annotations

from hexgen.cluster import GIB
from hexgen.costmodel.params import CostConfig, Workload
from hexgen.models import ModelSpec


def stage_memory_bytes(
    model: ModelSpec, tp_degree: int, num_layers: int, workload: Workload, cfg: CostConfig,
    *, is_first: bool, is_last: bool,
) -> float:
    """Per-GPU bytes of a stage; layers and KV heads are split over TP, embedding and head are replicated."""
    return _fixed_bytes(model, workload, cfg, is_first, is_last) + num_layers * _per_layer_bytes(
        model, tp_degree, workload, cfg
    )


def max_stage_layers(
    model: ModelSpec, tp_degree: int, memory_gb: float, workload: Workload, cfg: CostConfig,
    *, is_first: bool, is_last: bool,
) -> int:
    """The most layers a stage of this TP degree fits on GPUs of `memory_gb` GiB (0 when not even one)."""
    free = memory_gb * GIB - _fixed_bytes(model, workload, cfg, is_first, is_last)
    if free <= 0:
        return 0
    return min(model.num_layers, int(free // _per_layer_bytes(model, tp_degree, workload, cfg)))


def _per_layer_bytes(model: ModelSpec, tp_degree: int, workload: Workload, cfg: CostConfig) -> float:
    weights = model.params_per_layer * cfg.dtype_bytes
    kv_cache = workload.max_batch * workload.context_tokens * model.kv_bytes_per_token(cfg.dtype_bytes)
    return (weights + kv_cache) / tp_degree


def _fixed_bytes(model: ModelSpec, workload: Workload, cfg: CostConfig, is_first: bool, is_last: bool) -> float:
    embedding = model.embedding_params * cfg.dtype_bytes
    # Prefill of a full batch keeps a few hidden-size activations per token alive at once.
    activations = 4 * workload.max_batch * workload.prompt_tokens * model.hidden_size * cfg.dtype_bytes
    weights = (embedding if is_first else 0) + (embedding + model.hidden_size * cfg.dtype_bytes if is_last else 0)
    return weights + activations + cfg.runtime_reserve_gb * GIB
