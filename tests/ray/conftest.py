"""Ray test setup: runs only inside a network namespace whose only interface is loopback (run_isolated.sh);
one session-scoped cluster of three machines started with `hexgen node` on 127.0.0.1-3; the greedy reference."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from ray_helpers import HEAD, MACHINES, hexgen

ISOLATION_HINT = ("Ray tests run only in a network namespace with nothing but loopback (as root: "
                  "sh tests/ray/run_isolated.sh .venv/bin/python -m pytest tests/ray)")


def is_isolated() -> bool:
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def pytest_runtest_setup(item):
    if not is_isolated():
        pytest.skip(ISOLATION_HINT)


@pytest.fixture(scope="session")
def ray_cluster():
    """Machines a (head, 2 slots), b (1 slot), c (2 slots); every Ray file under a short temporary folder."""
    root = Path(tempfile.mkdtemp(prefix="hxray"))  # short: Ray's socket paths must stay under 108 bytes
    for name in ("home", "state", "tmp"):
        (root / name).mkdir()
    os.environ.update({"HOME": str(root / "home"), "HEXGEN_STATE_DIR": str(root / "state"),
                       "RAY_TMPDIR": str(root / "tmp"), "GLOO_SOCKET_IFNAME": "lo"})
    try:
        (ip, slots) = MACHINES["a"]
        hexgen("node", "start", "--head", "--port", HEAD.split(":")[1], "--node-ip-address", ip, "--machine", "a",
               "--slots", str(slots))
        for machine, (ip, slots) in MACHINES.items():
            if machine != "a":
                hexgen("node", "join", HEAD, "--machine", machine, "--slots", str(slots), "--node-ip-address", ip)
        yield HEAD
    finally:
        from hexgen.raycluster.node import node_pids, read_record

        records = [read_record(m) for m in MACHINES if (root / "state" / "nodes" / f"{m}.json").exists()]
        hexgen("node", "stop", check=False)
        left = [pid for record in records for pid in node_pids(record)]
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"Ray processes left after `hexgen node stop`: {left}"


@pytest.fixture(scope="session")
def cluster_file(ray_cluster, tmp_path_factory) -> Path:
    """`hexgen cluster probe` output for the three machines."""
    path = tmp_path_factory.mktemp("probe") / "cluster.yaml"
    hexgen("cluster", "probe", "--ray", ray_cluster, "-o", str(path), "--bulk-mib", "2")
    return path


class Reference:
    """Greedy completions of the one-process engine (one rank, in this process)."""

    def __init__(self, model_dir: Path):
        from hexgen.engine.checkpoint import eos_token_ids, resolve_model
        from hexgen.engine.replica import open_local_replica
        from hexgen.engine.scheduler import SchedulerConfig
        from hexgen.plan import single_replica_plan
        from hexgen.tokenizer import Tokenizer

        source = resolve_model(str(model_dir))
        self.tokenizer = Tokenizer(model_dir)
        plan = single_replica_plan(source.spec, [1], None)
        config = SchedulerConfig(2, max_context=64)
        self.replica = open_local_replica(source, plan.replicas[0], "float32", "cpu", config, eos_token_ids(model_dir))
        self.replica.start()

    def text(self, prompt: str, max_tokens: int) -> str:
        from hexgen.engine.generation import run_requests
        from hexgen.engine.messages import GenerationRequest, SamplingParams
        from hexgen.textstream import TextStream

        params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        request = GenerationRequest("ref", tuple(self.tokenizer.encode(prompt)), params)
        return run_requests(self.replica, [request], {"ref": TextStream(self.tokenizer, ())})[0].text


@pytest.fixture(scope="session")
def reference(tokenizer_model_dir) -> Reference:
    return Reference(tokenizer_model_dir)
