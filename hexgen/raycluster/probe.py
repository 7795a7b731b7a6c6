"""`hexgen cluster probe`: one actor per joined machine reports its GPUs (or CPU slots) and measures the link to
every other machine (hexgen/raycluster/cluster_file.py turns that into the cluster YAML)."""

from __future__ import annotations

import itertools
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from hexgen.errors import UserError
from hexgen.raycluster import transfer
from hexgen.raycluster.cluster_file import MachineReport
from hexgen.raycluster.env import MACHINE_RESOURCE_PREFIX

BULK_BYTES = 16 * 2**20
PROBE_TIMEOUT_S = 120.0


class ProbeActor:
    """Runs on one machine: describes it and exchanges bytes with the other machines' actors."""

    def devices(self) -> dict[str, Any]:
        from hexgen.engine.probe_worker import describe_devices

        return describe_devices()

    def listen(self) -> tuple[str, int]:
        host = ray.util.get_node_ip_address()
        return host, transfer.listen(host)

    def measure(self, host: str, port: int, bulk_bytes: int) -> tuple[float, float]:
        return transfer.measure(host, port, bulk_bytes)


def joined_machines() -> dict[str, dict[str, Any]]:
    """Machine name -> its (first) live Ray node."""
    machines: dict[str, dict[str, Any]] = {}
    for node in ray.nodes():
        for key in node.get("Resources", {}) if node.get("Alive") else ():
            if key.startswith(MACHINE_RESOURCE_PREFIX):
                machines.setdefault(key.removeprefix(MACHINE_RESOURCE_PREFIX), node)
    if not machines:
        raise UserError("no machine has joined the Ray cluster with `hexgen node start --head` / `hexgen node join`")
    return dict(sorted(machines.items()))


def probe(bulk_bytes: int = BULK_BYTES) -> tuple[list[MachineReport], dict[tuple[str, str], tuple[float, float]]]:
    """Every machine's report and (latency_ms, bandwidth_gbps) for every pair of machines."""
    machines = joined_machines()
    remote = ray.remote(ProbeActor)
    actors = {name: remote.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
        node["NodeID"], soft=False)).remote() for name, node in machines.items()}
    try:
        devices = ray.get([actors[m].devices.remote() for m in machines], timeout=PROBE_TIMEOUT_S)
        reports = [MachineReport(name, node["NodeManagerAddress"],
                                 int(node["Resources"][MACHINE_RESOURCE_PREFIX + name]),
                                 node["Resources"].get("memory", 0.0) / 2**30, dev)
                   for (name, node), dev in zip(machines.items(), devices, strict=True)]
        links = {}
        for a, b in itertools.combinations(machines, 2):  # one pair at a time, so transfers do not overlap
            host, port = ray.get(actors[b].listen.remote(), timeout=PROBE_TIMEOUT_S)
            links[(a, b)] = ray.get(actors[a].measure.remote(host, port, bulk_bytes), timeout=PROBE_TIMEOUT_S)
    finally:
        for actor in actors.values():
            ray.kill(actor)
    return reports, links
