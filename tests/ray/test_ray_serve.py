"""`hexgen serve --ray` on three simulated machines: a two-stage replica split over machines a and b plus a
one-stage replica on c answer exactly as the one-process engine; /status shows each stage's machine and node;
losing machine b takes down exactly its replica while c's keeps answering; --replan starts a replacement."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from ray_helpers import MACHINES, RayServer, rank_actor_pids, write_plan

PROMPTS = ["The capital of France is", "One two three"]
MAX_TOKENS = 8
DOWN_WITHIN_S = 15.0


@pytest.fixture(scope="module")
def served(cluster_file, tokenizer_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ray-serve")
    plan = write_plan(tmp / "plan.json", tokenizer_model_dir,
                      [[("a", 0, (0, 1)), ("b", 0, (1, 2))], [("c", 0, (0, 2))]])
    server = RayServer(tokenizer_model_dir, plan, tmp / "serve.log", "--replan", "--cluster", str(cluster_file))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_answers_equal_the_one_process_engine(served, reference):
    for prompt in PROMPTS:
        response = served.complete(prompt, MAX_TOKENS)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == reference.text(prompt, MAX_TOKENS)


def test_status_shows_each_stage_machine_and_node(served):
    replicas = served.status()["replicas"]
    placed = [[(s["machine"], [r["node_ip"] for r in s["ranks"]]) for s in rep["stages"]] for rep in replicas]
    assert placed == [[("a", [MACHINES["a"][0]]), ("b", [MACHINES["b"][0]])], [("c", [MACHINES["c"][0]])]]
    assert all(len(r["node_id"]) > 10 for rep in replicas for s in rep["stages"] for r in s["ranks"])
    pids = [r["pid"] for rep in replicas for s in rep["stages"] for r in s["ranks"]]
    assert len(set(pids)) == 3 and set(pids) <= set(rank_actor_pids()), (pids, rank_actor_pids())


def test_lost_machine_downs_its_replica_only_and_replan_replaces_it(served, reference):
    """SIGKILL machine b's raylet (its node is lost), then every other process of its node."""
    from hexgen.raycluster.node import node_pids, read_record

    b_pids = node_pids(read_record("b"))
    rank_on_b = [pid for pid in rank_actor_pids() if pid in b_pids]
    raylet = [pid for pid in b_pids if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"raylet")]
    assert len(rank_actor_pids()) == 3 and len(rank_on_b) == 1 and len(raylet) == 1
    killed_at = time.monotonic()
    os.kill(raylet[0], signal.SIGKILL)
    status = served.wait_for(lambda s: s["replicas"][0]["status"] == "down", DOWN_WITHIN_S, "marked down")
    down_after_s = time.monotonic() - killed_at
    time.sleep(1.0)
    assert not os.path.exists(f"/proc/{rank_on_b[0]}/cmdline") or rank_on_b[0] not in rank_actor_pids(), \
        "the rank on the lost node outlived its raylet"
    for pid in node_pids(read_record("b")):
        os.kill(pid, signal.SIGKILL)
    assert status["replicas"][1]["status"] == "up", status["replicas"]
    assert "'b'" in status["replicas"][0]["down_reason"], status["replicas"][0]
    expected = reference.text(PROMPTS[0], MAX_TOKENS)
    response = served.complete(PROMPTS[0], MAX_TOKENS)  # served by c while the replacement starts
    assert response.status_code == 200 and response.json()["choices"][0]["text"] == expected
    print(f"replica on b marked down {down_after_s:.1f} s after the kill")

    status = served.wait_for(lambda s: len(s["replicas"]) > 2 and s["replicas"][-1]["status"] == "up", 120,
                             "replaced")
    new = status["replicas"][2:]
    assert all(st["machine"] in ("a", "c") for rep in new for st in rep["stages"]), new
    assert [r["status"] for r in status["replicas"][:2]] == ["down", "up"]
    for _ in range(3):  # least-outstanding spreads these over c's replica and the new ones
        response = served.complete(PROMPTS[1], MAX_TOKENS)
        assert response.status_code == 200 and response.json()["choices"][0]["text"] == reference.text(PROMPTS[1],
                                                                                                       MAX_TOKENS)
