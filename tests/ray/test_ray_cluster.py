"""`hexgen cluster probe` on three simulated machines (its YAML feeds `hexgen plan`), and `hexgen serve --ray`
refusing bad plans in one line with nothing left running."""

from __future__ import annotations

import json
import time

import pytest
from ray_helpers import HEAD, MACHINES, hexgen, rank_actor_pids, write_plan

from hexgen.cluster import load_cluster


def test_probe_finds_every_machine_and_link(cluster_file, tokenizer_model_dir, tmp_path):
    cluster = load_cluster(cluster_file)
    assert {m.name: m.count for m in cluster.machines} == {name: slots for name, (_, slots) in MACHINES.items()}
    assert all(m.gpu.name == f"CPU-{m.name}" and m.gpu.memory_gb > 0 and m.gpu.tflops_fp16 > 0
               for m in cluster.machines)
    links = dict(cluster.network.overrides)
    assert set(links) == {frozenset(p) for p in (("a", "b"), ("a", "c"), ("b", "c"))}
    assert all(link.bandwidth_gbps > 0 and 0 < link.latency_ms < 50 for link in links.values())
    plan_path = tmp_path / "plan.json"
    hexgen("plan", "--cluster", str(cluster_file), "--model", str(tokenizer_model_dir), "--rate", "1", "--slo", "10",
           "--generations", "3", "--requests", "50", "--prompt-tokens", "16", "--output-tokens", "16",  # context 64
           "-o", str(plan_path))
    machines = {s["machine"] for r in json.loads(plan_path.read_text())["replicas"] for s in r["stages"]}
    assert machines <= set(MACHINES)


@pytest.mark.parametrize("case", ["unknown machine", "too many GPUs", "other model"])
def test_bad_plans_fail_in_one_line_leaving_nothing(case, ray_cluster, tokenizer_model_dir, tmp_path):
    stages = {"unknown machine": [[("z", 0, (0, 2))]],
              "too many GPUs": [[("a", 0, (0, 1)), ("b", 1, (1, 2))]],
              "other model": [[("a", 0, (0, 2))]]}[case]
    expected = {"unknown machine": "machine 'z' is not in the Ray cluster; machines there: a (2 slots), b (1 slots), "
                                   "c (2 slots)",
                "too many GPUs": "uses GPU 1 of machine 'b', which has 1 slots",
                "other model": "the plan is for model 'llama-2-70b' (80 layers"}[case]
    model = "llama-2-70b" if case == "other model" else tokenizer_model_dir
    plan = write_plan(tmp_path / "plan.json", model, stages)
    started = time.monotonic()
    result = hexgen("serve", "--model", str(tokenizer_model_dir), "--plan", str(plan), "--ray", HEAD, "--port", "8124",
                    check=False)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("hexgen serve: error:") and expected in lines[-1], result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 30
    assert not rank_actor_pids()
