"""Cost-model numbers against values worked out by hand (round hardware figures, efficiencies of 1)."""

from __future__ import annotations

import pytest
from scheduler_helpers import tiny_model

from hexgen.cluster import GpuType, Link
from hexgen.costmodel import CostConfig, LinearCost, Workload, allreduce_s, kv_pool_blocks, stage_memory_bytes
from hexgen.costmodel.stage import head_cost, layer_cost

# hidden 1024, 8 heads of 128, 4 KV heads, MLP 4096, vocab 1000:
# params per layer = 1024*1024*2 + 1024*512*2 + 3*1024*4096 + 2*1024 = 15,730,688
MODEL = tiny_model(num_layers=4, hidden=1024, heads=8, kv_heads=4, vocab=1000)
GPU = GpuType("round", memory_gb=80, bandwidth_gbs=1000, tflops_fp16=100)
LINK = Link(bandwidth_gbps=100, latency_ms=0.01)  # 12.5e9 B/s, 1e-5 s
EXACT = CostConfig(compute_efficiency=1.0, memory_efficiency=1.0, runtime_reserve_gb=0.5)


def test_params_per_layer_hand_count():
    assert MODEL.params_per_layer == 15_730_688


def test_allreduce_is_ring_cost():
    # 2 (t - 1) steps of latency + bytes / (t * bandwidth): t = 4, 1 MB over 12.5 GB/s
    assert allreduce_s(LINK, 4, 1e6) == pytest.approx(6 * (1e-5 + 1e6 / (4 * 12.5e9)))
    assert allreduce_s(LINK, 1, 1e6) == 0.0


def test_measured_allreduce_time_replaces_the_ring_latencies_at_its_degree_only():
    # fixed 1.5 ms measured at t = 4 in place of 6 x 0.01 ms; the bandwidth term stays the ring's
    assert allreduce_s(LINK, 4, 1e6, fixed_ms=1.5) == pytest.approx(1.5e-3 + 6 * 1e6 / (4 * 12.5e9))
    gpu = GpuType("round", memory_gb=80, bandwidth_gbs=1000, tflops_fp16=100, allreduce_ms_by_ranks=((4, 1.5),))
    at_four, ring_four = layer_cost(MODEL, gpu, 4, LINK, EXACT), layer_cost(MODEL, GPU, 4, LINK, EXACT)
    # two all-reduces per layer: + 2 x (1.5 ms - 6 x 0.01 ms) on the fixed costs, per-token costs unchanged
    assert at_four.decode_fixed_s - ring_four.decode_fixed_s == pytest.approx(2 * (1.5e-3 - 6e-5))
    assert at_four.decode_per_seq_s == pytest.approx(ring_four.decode_per_seq_s)
    assert layer_cost(MODEL, gpu, 2, LINK, EXACT) == layer_cost(MODEL, GPU, 2, LINK, EXACT)  # not measured at 2


def test_layer_cost_at_tp2_matches_hand_values():
    cost = layer_cost(MODEL, GPU, 2, LINK, EXACT)
    scan = 31_461_376 / (2 * 1e12)  # weight bytes / (tp * bandwidth)  = 1.5730688e-5 s
    two_allreduce_latency = 2 * 2 * 1 * 1e-5  # 2 all-reduces x 2(t-1) steps x latency = 4e-5 s
    gemm = 2 * 15_730_688 / (2 * 1e14)  # 2 FLOPs per weight / (tp * FLOPS)   = 1.5730688e-7 s
    ar_bytes = 2 * 2 * 1 * 2048 / (2 * 12.5e9)  # hidden vector of 2048 bytes  = 3.2768e-7 s
    assert cost.prefill_fixed_s == pytest.approx(scan + two_allreduce_latency)
    assert cost.decode_fixed_s == pytest.approx(5.5730688e-5)
    assert cost.prefill_per_token_s == pytest.approx(gemm + ar_bytes)
    assert cost.decode_per_seq_s == pytest.approx(4.8498688e-7)
    assert cost.decode_per_ctx_token_s == pytest.approx(2048 / (2 * 1e12))  # K+V of 512 wide at 2 bytes


def test_stage_memory_matches_hand_sum():
    wl = Workload(prompt_tokens=100, output_tokens=28, max_batch=2)
    per_layer = (31_461_376 + 2 * 128 * 2048) / 2  # weights + KV of 2 sequences x 128 tokens, halved by TP 2
    embedding_shard = 500 * 1024 * 2  # 1000 vocabulary rows split over TP 2, 2 bytes each
    expected = 3 * per_layer + embedding_shard + 4 * 2 * 100 * 1024 * 2 + 0.5 * 2**30
    got = stage_memory_bytes(MODEL, 2, 3, wl, EXACT, is_first=True, is_last=False)
    assert got == pytest.approx(expected) and expected == 587_511_808


def test_request_latency_closed_form_equals_step_sum():
    cost = LinearCost(0.5, 0.01, 0.2, 0.03, 0.001)
    prompt, output = 10, 4
    steps = [0.5 + 0.01 * 10] + [0.2 + 0.03 + 0.001 * (10 + k) for k in (1, 2, 3)]
    assert cost.request_latency_s(prompt, output) == pytest.approx(sum(steps))


def test_lm_head_is_split_over_tp_and_gathered_on_the_leader():
    # vocab 1000 over TP 4: 250 rows x 1024 hidden per rank; the leader receives 3 shards of 250 fp16 logits
    cost = head_cost(MODEL, GPU, 4, LINK, EXACT)
    scan = 250 * 1024 * 2 / 1e12  # 5.12e-7 s
    gemm = 2 * 250 * 1024 / 1e14  # 5.12e-9 s per sampled token
    gather_fixed = 3 * 1e-5  # 3 messages, one latency each
    gather_per_seq = 3 * 250 * 2 / 12.5e9  # 1.2e-7 s
    assert cost.decode_fixed_s == pytest.approx(scan + gather_fixed)
    assert cost.decode_per_seq_s == pytest.approx(gemm + gather_per_seq)
    assert cost.prefill_fixed_s == pytest.approx(scan + gemm + gather_fixed + gather_per_seq)
    alone = head_cost(MODEL, GPU, 1, LINK, EXACT)  # no gather at TP 1: 1000 rows
    assert alone.decode_fixed_s == pytest.approx(4 * scan) and alone.decode_per_seq_s == pytest.approx(4 * gemm)


def test_kv_pool_is_memory_left_after_weights_in_blocks():
    # TP 2, 3 layers, first stage, 1 GiB GPU, reserve 0.5 GiB, prompt 100 x batch 2 of activations:
    # fixed = embedding shard 1,024,000 + activations 4 x 200 x 1024 x 2 = 1,638,400 + 536,870,912 reserve;
    # weights 3 x 31,461,376 / 2 = 47,192,064; free = 1,073,741,824 - 539,533,312 - 47,192,064 = 487,016,448.
    # A 16-token block on one rank: 16 x 3 layers x 2048 bytes / TP 2 = 49,152 bytes -> 9908 blocks.
    wl = Workload(prompt_tokens=100, output_tokens=28, max_batch=2)
    gpu_gb = 1.0
    assert kv_pool_blocks(MODEL, 2, 3, gpu_gb, wl, EXACT, is_first=True, is_last=False) == 9908
