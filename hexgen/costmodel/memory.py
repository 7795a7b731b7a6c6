"""Bytes one GPU of a stage needs: its weight shard, its KV-cache shard, activations and a runtime reserve."""

from __future__ import annotations

from hexgen.cluster import GIB
from hexgen.costmodel.params import CostConfig, Workload
from hexgen.engine.scheduler import SchedulerConfig
from hexgen.models import ModelSpec

ENGINE_DEFAULTS = SchedulerConfig()


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
    # Prefill keeps a few hidden-size activations per token of a step alive at once; the engine's scheduler
    # puts at most max_step_tokens new tokens in one step.
    step_tokens = min(workload.max_batch * workload.prompt_tokens, ENGINE_DEFAULTS.max_step_tokens)
    activations = 4 * step_tokens * model.hidden_size * cfg.dtype_bytes
    return weights + activations + cfg.runtime_reserve_gb * GIB


def kv_bytes_per_token_on_rank(model: ModelSpec, tp_degree: int, num_layers: int, cfg: CostConfig) -> float:
    """K and V of one token on one rank of a stage: 2 x layers x (kv heads / tp) x head_dim x dtype bytes."""
    return num_layers * model.kv_bytes_per_token(cfg.dtype_bytes) / tp_degree


def kv_pool_blocks(
    model: ModelSpec, tp_degree: int, num_layers: int, memory_gb: float, workload: Workload, cfg: CostConfig,
    *, is_first: bool, is_last: bool,
) -> int:
    """KV blocks of `cfg.kv_block_tokens` tokens a rank of this stage can hold, as the engine sizes its pool:
    the memory left after weights, prefill activations and the reserve, over the bytes of one block.
    Weights are counted without any KV reservation (the workload's batch only sizes the activations)."""
    weights = num_layers * model.params_per_layer * cfg.dtype_bytes / tp_degree
    free = memory_gb * GIB - _fixed_bytes(model, tp_degree, workload, cfg, is_first, is_last) - weights
    per_block = cfg.kv_block_tokens * kv_bytes_per_token_on_rank(model, tp_degree, num_layers, cfg)
    return max(0, int(free // per_block))
