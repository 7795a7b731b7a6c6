"""Time of one pipeline stage: weight scans and GEMMs per layer, two TP all-reduces per layer, TP-split LM head."""

from __future__ import annotations

from hexgen.cluster import GpuType, Link
from hexgen.costmodel.linear import LinearCost
from hexgen.costmodel.params import CostConfig
from hexgen.models import ModelSpec


def allreduce_s(link: Link, tp_degree: int, num_bytes: float, fixed_ms: float | None = None) -> float:
    """Ring all-reduce (reduce-scatter + all-gather): 2(t-1) steps, each one latency plus a 1/t slice. A measured
    `fixed_ms` at this degree (GpuType.allreduce_fixed_ms) replaces the 2(t-1) latencies."""
    if tp_degree <= 1:
        return 0.0
    fixed_s = 2 * (tp_degree - 1) * link.latency_s if fixed_ms is None else fixed_ms / 1e3
    return fixed_s + 2 * (tp_degree - 1) * num_bytes / (tp_degree * link.bytes_per_s)


def allreduce_cost(model: ModelSpec, gpu: GpuType, tp_degree: int, tp_link: Link, cfg: CostConfig) -> LinearCost:
    """The two all-reduces of one decoder layer (after attention and after the MLP), one hidden vector per token:
    time a TP group's ranks spend waiting on each other rather than computing."""
    measured_ms = gpu.allreduce_fixed_ms(tp_degree)
    fixed_s = 2 * allreduce_s(tp_link, tp_degree, 0.0, measured_ms)
    per_token_s = 2 * allreduce_s(tp_link, tp_degree, model.hidden_size * cfg.dtype_bytes, measured_ms) - fixed_s
    return LinearCost(prefill_fixed_s=fixed_s, prefill_per_token_s=per_token_s, decode_fixed_s=fixed_s,
                      decode_per_seq_s=per_token_s)


def layer_cost(model: ModelSpec, gpu: GpuType, tp_degree: int, tp_link: Link, cfg: CostConfig) -> LinearCost:
    """One decoder layer on a TP group of `tp_degree` GPUs of type `gpu`: its compute plus its all-reduces.

    Each step scans the layer's weight shard once (memory-bound) and does 2 FLOPs per weight per token
    (compute-bound); decode also reads the cached K/V of every sequence.
    """
    bandwidth_bps = gpu.memory_bytes_per_s(cfg.memory_efficiency)
    flops = gpu.flops_per_s(cfg.compute_efficiency)
    weight_scan_s = model.params_per_layer * cfg.dtype_bytes / (tp_degree * bandwidth_bps)
    gemm_per_token_s = 2 * model.params_per_layer / (tp_degree * flops)
    kv_read_s = model.kv_bytes_per_token(cfg.dtype_bytes) / (tp_degree * bandwidth_bps)
    # Measured engine overheads (zero without a profile): kernel launches and Python per layer, per sequence.
    layer_s, seq_s = gpu.layer_overhead_ms / 1e3, gpu.seq_overhead_ms / 1e3
    compute = LinearCost(
        prefill_fixed_s=weight_scan_s + layer_s + seq_s,
        prefill_per_token_s=gemm_per_token_s,
        decode_fixed_s=weight_scan_s + layer_s,
        decode_per_seq_s=gemm_per_token_s + seq_s,
        decode_per_ctx_token_s=kv_read_s,
    )
    return compute + allreduce_cost(model, gpu, tp_degree, tp_link, cfg)


def head_cost(model: ModelSpec, gpu: GpuType, tp_degree: int, tp_link: Link, cfg: CostConfig) -> LinearCost:
    """The LM head, split by vocabulary rows over the last stage's TP group, logits gathered on the leader.

    Each rank scans and multiplies its ceil(V/t) rows; per sampled token the leader then receives t-1 shards of
    ceil(V/t) logits (one message each over the intra-machine link). Prefill samples once, decode once per sequence.
    """
    bandwidth_bps = gpu.memory_bytes_per_s(cfg.memory_efficiency)
    flops = gpu.flops_per_s(cfg.compute_efficiency)
    shard_rows = -(-model.vocab_size // tp_degree)
    scan_s = shard_rows * model.hidden_size * cfg.dtype_bytes / bandwidth_bps
    gemm_s = 2 * shard_rows * model.hidden_size / flops
    gather_fixed_s = (tp_degree - 1) * tp_link.latency_s
    gather_per_seq_s = (tp_degree - 1) * shard_rows * cfg.dtype_bytes / tp_link.bytes_per_s
    return LinearCost(prefill_fixed_s=scan_s + gemm_s + gather_fixed_s + gather_per_seq_s,
                      decode_fixed_s=scan_s + gather_fixed_s, decode_per_seq_s=gemm_s + gather_per_seq_s)


def broadcast_cost(model: ModelSpec, tp_degree: int, tp_link: Link, cfg: CostConfig) -> LinearCost:
    """A receiving stage's leader forwards the incoming hidden states to the rest of its TP group."""
    if tp_degree <= 1:
        return LinearCost()
    per_token_s = model.hidden_size * cfg.dtype_bytes / tp_link.bytes_per_s
    return LinearCost(tp_link.latency_s, per_token_s, tp_link.latency_s, per_token_s, 0.0)


def stage_extras(
    model: ModelSpec, gpu: GpuType, tp_degree: int, tp_link: Link, cfg: CostConfig, *, is_first: bool, is_last: bool,
) -> LinearCost:
    """What a stage costs besides its layers: the LM head if last, the input broadcast if not first, and the
    engine's measured fixed cost of a step (zero without a profile)."""
    step_s = gpu.step_overhead_ms / 1e3
    cost = LinearCost(prefill_fixed_s=step_s, decode_fixed_s=step_s)
    if is_last:
        cost = cost + head_cost(model, gpu, tp_degree, tp_link, cfg)
    if not is_first:
        cost = cost + broadcast_cost(model, tp_degree, tp_link, cfg)
    return cost


def stage_cost(
    model: ModelSpec, gpu: GpuType, tp_degree: int, num_layers: int, tp_link: Link, cfg: CostConfig,
    *, is_first: bool, is_last: bool,
) -> LinearCost:
    """All of one stage's time: its layers plus its extras."""
    layers = layer_cost(model, gpu, tp_degree, tp_link, cfg).scaled(num_layers)
    return layers + stage_extras(model, gpu, tp_degree, tp_link, cfg, is_first=is_first, is_last=is_last)


def transfer_cost(model: ModelSpec, link: Link, cfg: CostConfig) -> LinearCost:
    """Hidden states of every token of the step, sent leader to leader between consecutive stages."""
    per_token_s = model.hidden_size * cfg.dtype_bytes / link.bytes_per_s
    return LinearCost(link.latency_s, per_token_s, link.latency_s, per_token_s, 0.0)


def token_return_cost(link: Link) -> LinearCost:
    """The sampled token ids travel from the last stage back to the driver (stage 0) once per step."""
    return LinearCost(prefill_fixed_s=link.latency_s, decode_fixed_s=link.latency_s)
