"""Cluster files: the documented shape, the GPU table, link lookup, and errors a user can act on."""

from __future__ import annotations

import pytest

from hexgen.cluster import builtin_gpu_types, load_cluster, parse_cluster
from hexgen.errors import ConfigError

ISSUE_EXAMPLE = """
machines:
  - {name: il-a6000-0, gpu: A6000, count: 8, region: illinois}   # price_per_hour optional
  - {name: is-3090ti-0, gpu: RTX3090Ti, count: 8, region: iceland}
  - {name: no-3090ti-0, gpu: RTX3090Ti, count: 3, region: norway, price_per_hour: 2.5}
gpu_types:
  MyCard: {memory_gb: 24, bandwidth_gbs: 936, tflops_fp16: 71, price_per_hour: 0.4}
network:
  intra_machine: {bandwidth_gbps: 256, latency_ms: 0.01}
  intra_region:  {bandwidth_gbps: 10,  latency_ms: 0.5}
  inter_region:  {bandwidth_gbps: 1,   latency_ms: 30}
  links:
    - {between: [iceland, norway], bandwidth_gbps: 2, latency_ms: 15}
    - {between: [il-a6000-0, il-a6000-0], bandwidth_gbps: 900, latency_ms: 0.002}
"""


def test_issue_example_is_accepted_with_links_resolved():
    c = parse_cluster(ISSUE_EXAMPLE)
    assert c.num_gpus == 19
    assert c.link("is-3090ti-0", "no-3090ti-0").latency_ms == 15  # region-pair override
    assert c.link("il-a6000-0", "is-3090ti-0").bandwidth_gbps == 1  # inter-region default
    assert c.link("il-a6000-0", "il-a6000-0").bandwidth_gbps == 900  # machine-pair override on itself
    assert c.link("is-3090ti-0", "is-3090ti-0").bandwidth_gbps == 256  # intra-machine default
    # 8 x A6000 at the table's 0.80 + 8 x 3090 Ti at 0.24 + a machine priced 2.5 as a whole
    assert c.cost_per_hour == pytest.approx(8 * 0.80 + 8 * 0.24 + 2.5)


def test_builtin_table_covers_required_gpus():
    table = builtin_gpu_types()
    for name in ("A100-40G", "A100-80G", "H100", "A6000", "A40", "A5000", "A4000", "RTX3090Ti", "RTX4090", "L4",
                 "T4", "V100", "L40S"):
        assert table[name].memory_gb > 0 and table[name].bandwidth_gbs > 0 and table[name].tflops_fp16 > 0
    assert table["A100-40G"].memory_gb == 40 and table["A100-40G"].bandwidth_gbs == 1555


def test_unknown_gpu_lists_known_types():
    with pytest.raises(ConfigError, match=r"unknown GPU type 'B9000'.*A100-40G.*RTX3090Ti"):
        parse_cluster("machines:\n  - {name: x, gpu: B9000, count: 2}\n")


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("machines:\n  - {name: a, gpu: A6000, count: 2}\n  - {name: b, gpu: [A6000, count: 2}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: malformed YAML at line 3"):
        load_cluster(path)


def test_custom_gpu_type_and_unknown_keys():
    c = parse_cluster("""
machines: [{name: localhost, gpu: CPU-worker, count: 1}]
gpu_types: {CPU-worker: {memory_gb: 64, bandwidth_gbs: 50, tflops_fp16: 1}}
""")
    assert c.machine("localhost").gpu.name == "CPU-worker"
    with pytest.raises(ConfigError, match="unknown key.*colour"):
        parse_cluster("machines: [{name: a, gpu: A6000, count: 1, colour: red}]")
    with pytest.raises(ConfigError, match="neither a machine nor a region"):
        parse_cluster("machines: [{name: a, gpu: A6000, count: 1}]\nnetwork: {links: [{between: [a, mars], "
                      "bandwidth_gbps: 1, latency_ms: 1}]}")
    with pytest.raises(ConfigError, match="count must be an integer in 1..1024"):
        parse_cluster("machines: [{name: a, gpu: A6000, count: 0}]")


@pytest.mark.parametrize("field, value", [("memory_gb", ".nan"), ("memory_gb", ".inf"), ("bandwidth_gbs", ".nan"),
                                          ("tflops_fp16", ".inf"), ("price_per_hour", ".nan")])
def test_a_gpu_type_number_must_be_finite(field, value):
    """YAML's .nan and .inf are floats; a planner fed them crashed (`int(nan)`) or planned on nonsense."""
    row = {"memory_gb": 80, "bandwidth_gbs": 2000, "tflops_fp16": 300, field: value}
    text = ", ".join(f"{k}: {v}" for k, v in row.items())
    with pytest.raises(ConfigError, match=rf"gpu_types.G: {field} must be a non-negative number, got (nan|inf)"):
        parse_cluster(f"machines: [{{name: a, gpu: G, count: 1}}]\ngpu_types: {{G: {{{text}}}}}")


def test_a_link_number_must_be_finite():
    with pytest.raises(ConfigError, match=r"network.inter_region: latency_ms must be a non-negative number, got nan"):
        parse_cluster("machines: [{name: a, gpu: A6000, count: 1}]\n"
                      "network: {inter_region: {bandwidth_gbps: 1, latency_ms: .nan}}")


def test_example_clusters_have_the_papers_prices():
    full = load_cluster("examples/clusters/hetero-full.yaml")
    assert (full.num_gpus, round(full.cost_per_hour, 2)) == (58, 65.04)
    half = load_cluster("examples/clusters/hetero-half.yaml")
    assert (half.num_gpus, round(half.cost_per_hour, 2)) == (30, 29.60)
    a100 = load_cluster("examples/clusters/a100-homogeneous.yaml")
    assert (a100.num_gpus, round(a100.cost_per_hour, 2)) == (16, 65.54)
