"""Probe results -> the cluster YAML `hexgen plan` reads: GPU names matched to the built-in table, unknown GPUs and
CPU slots described by their measured figures, one link per measured pair of machines (no Ray, no torch)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from hexgen.cluster import DEFAULT_LINKS, builtin_gpu_types


@dataclass(frozen=True)
class MachineReport:
    """What the probe found on one machine."""

    name: str
    node_ip: str
    slots: int
    memory_gb: float  # the node's memory for Ray tasks, GiB
    devices: dict[str, Any]  # from hexgen.engine.probe_worker.describe_devices


def gpu_type_name(device_name: str, memory_gb: float) -> str | None:
    """The built-in GPU type a device name reports (e.g. 'NVIDIA H100 80GB HBM3' -> 'H100'), by memory among
    variants; None if unknown."""
    flat = re.sub(r"[^A-Z0-9]", "", device_name.upper())
    table = builtin_gpu_types()
    matches = [name for name in table if re.sub(r"[^A-Z0-9]", "", name.split("-")[0].upper()) in flat]
    if not matches:
        return None
    longest = max(len(m.split("-")[0]) for m in matches)  # 'RTX3090Ti' over 'RTX3090' when both match
    matches = [m for m in matches if len(m.split("-")[0]) == longest]
    return min(matches, key=lambda m: abs(table[m].memory_gb - memory_gb))


def cluster_yaml(reports: list[MachineReport], links: dict[tuple[str, str], tuple[float, float]]) -> str:
    """The cluster file: machines, GPU types not in the table with their measured figures, measured links."""
    machines, gpu_types = [], {}
    for report in reports:
        dev = report.devices
        if dev["gpu_count"]:
            gpu = gpu_type_name(dev["gpu_name"], dev["gpu_memory_gb"])
            if gpu is None:
                gpu = re.sub(r"[^A-Za-z0-9-]", "-", dev["gpu_name"]).strip("-")
                gpu_types[gpu] = {"memory_gb": round(dev["gpu_memory_gb"], 1),
                                  "bandwidth_gbs": round(dev["bandwidth_gbs"], 1),
                                  "tflops_fp16": round(dev["tflops"], 2)}
            count = min(report.slots, dev["gpu_count"]) or dev["gpu_count"]
        else:  # CPU worker slots share the machine's memory, bandwidth and compute
            gpu, count = f"CPU-{report.name}", max(1, report.slots)
            gpu_types[gpu] = {"memory_gb": round(report.memory_gb / count, 2),
                              "bandwidth_gbs": round(dev["bandwidth_gbs"] / count, 2),
                              "tflops_fp16": round(dev["tflops"] / count, 4)}
        machines.append({"name": report.name, "gpu": gpu, "count": count, "region": "default"})
    rows = [{"between": [a, b], "bandwidth_gbps": round(bw, 3), "latency_ms": round(lat, 4)}
            for (a, b), (lat, bw) in links.items()]
    slowest = {"bandwidth_gbps": min((r["bandwidth_gbps"] for r in rows), default=10.0),
               "latency_ms": max((r["latency_ms"] for r in rows), default=0.5)}
    intra = DEFAULT_LINKS["intra_machine"]
    network = {"intra_machine": {"bandwidth_gbps": intra.bandwidth_gbps, "latency_ms": intra.latency_ms},
               "intra_region": slowest, "inter_region": dict(slowest), "links": rows}
    data = {"machines": machines, **({"gpu_types": gpu_types} if gpu_types else {}), "network": network}
    header = ("# Written by `hexgen cluster probe`: machines and slots from the Ray cluster, links measured between\n"
              "# probe actors (median ping / 2; one bulk transfer). Regions are not measured: edit them if needed.\n")
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)
