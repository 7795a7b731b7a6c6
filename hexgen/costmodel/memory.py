"""Bytes one GPU of a stage needs: its weight shard, its KV-cache shard, activations and a runtime reserve."""

from __future__ import annotations

from hexgen.cluster import GIB
from hexgen.costmodel.params import CostConfig, Workload
from hexgen.models import ModelSpec


def stage_memory_bytes(
    model: ModelSpec, tp_degree: int, num_layers: int, workload: Workload, cfg: CostConfig,
    *, is_first: bool, is_last: bool,
) -> float:
    """Per-GPU bytes of a stage; layers, KV heads and the vocabulary rows of embedding and head are split over TP."""
    return _fixed_bytes(model, tp_degree, workload, cfg, is_first, is_last) + num_layers * _per_layer_bytes(
        model, tp_degree, workload, cfg
    )


def max_stage_layers(
    model: ModelSpec, tp_degree: int, memory_gb: float, workload: Workload, cfg: CostConfig,
    *, is_first: bool, is_last: bool,
) -> int:
    """The most layers a stage of this TP degree fits on GPUs of `memory_gb` GiB (0 when not even one)."""
    free = memory_gb * GIB - _fixed_bytes(model, tp_degree, workload, cfg, is_first, is_last)
    if free <= 0:
        return 0
    return min(model.num_layers, int(free // _per_layer_bytes(model, tp_degree, workload, cfg)))


def _per_layer_bytes(model: ModelSpec, tp_degree: int, workload: Workload, cfg: CostConfig) -> float:
    weights = model.params_per_layer * cfg.dtype_bytes
    kv_cache = workload.max_batch * workload.context_tokens * model.kv_bytes_per_token(cfg.dtype_bytes)
    return (weights + kv_cache) / tp_degree


def _fixed_bytes(model: ModelSpec, tp_degree: int, workload: Workload, cfg: CostConfig, is_first: bool,
                 is_last: bool) -> float:
    # The engine gives each TP rank a padded 1/tp share of the vocabulary rows of the embedding (first stage)
    # and of the LM head (last stage); a one-stage replica with tied embeddings holds the matrix once.
    vocab_shard = -(-model.vocab_size // tp_degree) * model.hidden_size * cfg.dtype_bytes
    matrices = 1 if (is_first and is_last and model.tie_word_embeddings) else int(is_first) + int(is_last)
    weights = matrices * vocab_shard + (model.hidden_size * cfg.dtype_bytes if is_last else 0)
    # Prefill of a full batch keeps a few hidden-size activations per token alive at once.
    activations = 4 * workload.max_batch * workload.prompt_tokens * model.hidden_size * cfg.dtype_bytes
    return weights + activations + cfg.runtime_reserve_gb * GIB
