"""Profile files: validated with errors a user can act on, and their figures replace the datasheet ones."""

from __future__ import annotations

import pytest
import yaml
from scheduler_helpers import tiny_model

from hexgen.cluster import GpuType, Link, parse_cluster
from hexgen.costmodel import CostConfig
from hexgen.costmodel.stage import layer_cost, stage_cost
from hexgen.errors import ConfigError
from hexgen.profile import apply_profiles, load_profile, profile_from_dict

GOOD = {
    "format": "hexgen-profile/1", "device_type": "CPU-worker", "matmul_tflops": 0.1, "memory_bandwidth_gbs": 10.0,
    "step_overhead_ms": 2.0, "layer_overhead_ms": 0.5, "seq_overhead_ms": 0.05,
    "allreduce": {"latency_ms": 0.2, "bandwidth_gbps": 8.0, "ranks": 2},
    "transfer": {"latency_ms": 0.1, "bandwidth_gbps": 16.0},
}
CPU_CLUSTER = """
machines: [{name: localhost, gpu: CPU-worker, count: 2}]
gpu_types: {CPU-worker: {memory_gb: 4, bandwidth_gbs: 50, tflops_fp16: 1}}
"""


def _without(key):
    return {k: v for k, v in GOOD.items() if k != key}


@pytest.mark.parametrize("data, pattern", [
    (_without("memory_bandwidth_gbs"), r"missing field\(s\) memory_bandwidth_gbs"),
    ({**_without("step_overhead_ms"), "step_overhead": 2.0}, r"'step_overhead' lacks its unit.*'step_overhead_ms'"),
    ({**GOOD, "matmul_tflops": -1}, r"matmul_tflops must be a number > 0, got -1"),
    ({**GOOD, "allreduce": {"latency": 0.2, "bandwidth_gbps": 8}}, r"allreduce: field 'latency' lacks its unit"),
    ({**GOOD, "colour": "red"}, r"unknown field\(s\) colour"),
    ({**GOOD, "format": "something-else"}, r"format 'something-else' is not 'hexgen-profile/1'"),
    ({**GOOD, "colocated_handoff_ms": -0.5}, r"colocated_handoff_ms must be a number >= 0, got -0.5"),
    ({**GOOD, "allreduce_ms_by_ranks": {1: 0.5}}, r"allreduce_ms_by_ranks: TP degree 1 must be an integer >= 2"),
    ({**GOOD, "allreduce_ms_by_ranks": {"three": 0.5}}, r"TP degree 'three' must be an integer >= 2"),
    ({**GOOD, "allreduce_ms_by_ranks": {3: -1}}, r"allreduce_ms_by_ranks: 3 must be a number >= 0, got -1"),
    ({**GOOD, "allreduce_ms_by_ranks": [1.5]}, r"allreduce_ms_by_ranks: expected a mapping of TP degree"),
    # YAML's .nan and .inf (floats) were taken as measured figures
    ({**GOOD, "memory_bandwidth_gbs": float("nan")}, r"memory_bandwidth_gbs must be a number > 0, got nan"),
    ({**GOOD, "step_overhead_ms": float("inf")}, r"step_overhead_ms must be a number >= 0, got inf"),
    ({**GOOD, "allreduce": {"latency_ms": float("nan"), "bandwidth_gbps": 8}}, r"latency_ms must be a number >= 0"),
])
def test_bad_profiles_name_the_field(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        profile_from_dict(data, "p.yaml")


def test_colocated_handoff_is_optional():
    assert profile_from_dict(GOOD).colocated_handoff_ms == 0.0
    profile = profile_from_dict({**GOOD, "colocated_handoff_ms": 3.5, "colocated_handoff_seq_ms": 0.25})
    assert (profile.colocated_handoff_ms, profile.colocated_handoff_seq_ms) == (3.5, 0.25)


def test_a_one_gpu_profile_has_no_links_and_the_cluster_link_applies(tmp_path):
    one_gpu = {**_without("allreduce"), "backend": "cuda"}
    del one_gpu["transfer"]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(one_gpu))
    cluster = parse_cluster(CPU_CLUSTER + "profiles: [p.yaml]\n", "c.yaml", tmp_path)
    assert cluster.machine("localhost").gpu.measured_tflops == 0.1
    assert cluster.tp_link("localhost") == cluster.network.intra_machine  # no measured link: the network's
    with pytest.raises(ConfigError, match=r"missing field\(s\) allreduce, transfer \(only a one-GPU machine"):
        profile_from_dict({**one_gpu, "backend": "cpu"}, "p.yaml")


def test_allreduce_by_degree_is_optional_and_reaches_the_gpu_type(tmp_path):
    assert profile_from_dict(GOOD).allreduce_ms_by_ranks == ()
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({**GOOD, "allreduce_ms_by_ranks": {4: 2.5, 3: 1.25}}))
    gpu = parse_cluster(CPU_CLUSTER + "profiles: [p.yaml]\n", "c.yaml", tmp_path).machine("localhost").gpu
    assert gpu.allreduce_ms_by_ranks == ((3, 1.25), (4, 2.5))
    assert (gpu.allreduce_fixed_ms(3), gpu.allreduce_fixed_ms(2)) == (1.25, None)


def test_unknown_device_type_lists_the_known_ones(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**GOOD, "device_type": "B9000"}))
    with pytest.raises(ConfigError, match=r"measures device type 'B9000', which is unknown; known types: .*A100-40G"):
        parse_cluster(CPU_CLUSTER + "profiles: [p.yaml]\n", "c.yaml", tmp_path)
    with pytest.raises(ConfigError, match=r"the cluster has no machine of that type; its types: CPU-worker"):
        apply_profiles(parse_cluster(CPU_CLUSTER), [load_profile(path)])


def test_profile_from_the_cluster_file_replaces_datasheet_figures(tmp_path):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(GOOD))
    gpu = parse_cluster(CPU_CLUSTER + "profiles: [p.yaml]\n", "c.yaml", tmp_path).machine("localhost").gpu
    assert (gpu.measured_bandwidth_gbs, gpu.measured_tflops, gpu.step_overhead_ms) == (10.0, 0.1, 2.0)
    assert gpu.allreduce_link == Link(8.0, 0.2) and gpu.transfer_link == Link(16.0, 0.1)
    cluster = parse_cluster(CPU_CLUSTER + "profiles: [p.yaml]\n", "c.yaml", tmp_path)
    assert cluster.tp_link("localhost") == Link(8.0, 0.2) and cluster.link("localhost", "localhost") == Link(16, 0.1)


def test_measured_rates_ignore_the_efficiencies_and_add_the_overheads():
    # hidden 1024 model: 15,730,688 weights per layer, 31,461,376 bytes at fp16; K+V of a token 2048 bytes
    model = tiny_model(num_layers=4, hidden=1024, heads=8, kv_heads=4, vocab=1000)
    gpu = GpuType("measured", 80, bandwidth_gbs=999, tflops_fp16=999, measured_bandwidth_gbs=1000,
                  measured_tflops=100, step_overhead_ms=2.0, layer_overhead_ms=0.5, seq_overhead_ms=0.05)
    half = CostConfig(compute_efficiency=0.5, memory_efficiency=0.5)
    cost = layer_cost(model, gpu, 1, Link(100, 0.01), half)
    assert cost.decode_fixed_s == pytest.approx(31_461_376 / 1e12 + 0.5e-3)  # weight scan + layer overhead
    assert cost.decode_per_seq_s == pytest.approx(2 * 15_730_688 / 1e14 + 0.05e-3)  # GEMM + sequence overhead
    assert cost.decode_per_ctx_token_s == pytest.approx(2048 / 1e12)
    whole = stage_cost(model, gpu, 1, 3, Link(100, 0.01), half, is_first=True, is_last=False)
    assert whole.decode_fixed_s == pytest.approx(3 * cost.decode_fixed_s + 2e-3)  # + the step overhead once


def test_the_committed_cpu_profile_loads():
    profile = load_profile("examples/profiles/cpu-epyc-2core.yaml")
    assert profile.device_type == "CPU-worker" and profile.memory_bandwidth_gbs > 0


def test_example_cluster_names_its_profile():
    from hexgen.cluster import load_cluster

    gpu = load_cluster("examples/clusters/local-cpu-profiled.yaml").machine("localhost").gpu
    profile = load_profile("examples/profiles/cpu-epyc-2core-1thread.yaml")
    assert gpu.measured_bandwidth_gbs == profile.memory_bandwidth_gbs


def test_the_h200_profile_calibrated_on_an_8b_predicts_the_steps_the_h200_measured():
    """The H200 measured an 8B-shaped decode step at 5.30 ms (batch 1) and 7.71 ms (batch 128; docs/bench-gpu.md):
    the cost model on the committed calibrated profile stays within 10% of both."""
    from hexgen.cluster import load_cluster
    from hexgen.models import load_model_spec

    gpu = load_cluster("examples/clusters/one-h200.yaml").machine("gpu-box").gpu
    calibrated = load_profile("examples/profiles/gpu-h200-bf16-llama-3-8b.yaml")
    assert gpu.layer_overhead_ms == calibrated.layer_overhead_ms
    spec = load_model_spec("llama-3-8b")
    cost = stage_cost(spec, gpu, 1, spec.num_layers, Link(100, 0.01), CostConfig(dtype_bytes=2),
                      is_first=True, is_last=True)
    for batch, measured_ms in ((1, 5.30), (128, 7.71)):
        assert 1000 * cost.decode_step_s(batch, batch * 144) == pytest.approx(measured_ms, rel=0.1)
