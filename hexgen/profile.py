"""Measured device profiles (written by `hexgen profile`): load, validate, and put them in place of datasheet figures.

A profile describes one device type as the engine achieved on it: matmul rate, memory bandwidth, the engine's
fixed costs per step, per layer and per sequence, and the all-reduce and stage-to-stage links between its ranks
on one machine (absent from a one-GPU machine's profile: the cluster file's intra-machine link applies); a CPU
profile calibrated on a model may add what a handoff between two stages sharing the machine's cores costs per step
(`colocated_handoff_ms`, plus `colocated_handoff_seq_ms` per sequence) and the fixed time of a decode all-reduce
at each TP degree it served (`allreduce_ms_by_ranks`, {degree: ms}). Every field name carries its unit. No torch
here: the measuring code is hexgen/engine/profiler.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from hexgen.cluster import Cluster, GpuType, Link
from hexgen.errors import ConfigError
from hexgen.folders import read_text

FORMAT = "hexgen-profile/1"
RATES = ("matmul_tflops", "memory_bandwidth_gbs")
OVERHEADS = ("step_overhead_ms", "layer_overhead_ms", "seq_overhead_ms")
LINKS = ("allreduce", "transfer")
LINK_FIELDS = ("latency_ms", "bandwidth_gbps")
REQUIRED = ("format", "device_type", *RATES, *OVERHEADS)  # links too, except on a one-GPU machine (nothing to link)
OPTIONAL = ("colocated_handoff_ms", "colocated_handoff_seq_ms")  # CPU: stages taking turns on one machine
BY_RANKS = "allreduce_ms_by_ranks"  # optional {TP degree: ms}: all-reduces as served (CPU: ranks sharing cores)
# Descriptive fields: kept in the file for people, never read by the cost model.
DESCRIPTIVE = ("device", "backend", "dtype", "measured_at", "torch_version", "cpu", "notes", "memory_gb",
               "allreduce_ranks", "method", "load_average_1m", "threads",
               "calibrated_on")
# A field without its unit is the most likely slip; name the right one.
UNITLESS = {"matmul": "matmul_tflops", "tflops": "matmul_tflops", "memory_bandwidth": "memory_bandwidth_gbs",
            "bandwidth": "memory_bandwidth_gbs", "step_overhead": "step_overhead_ms",
            "layer_overhead": "layer_overhead_ms", "seq_overhead": "seq_overhead_ms", "latency": "latency_ms"}


@dataclass(frozen=True)
class DeviceProfile:
    """What the engine achieves on one device type (see the module docstring for the fields)."""

    device_type: str
    matmul_tflops: float
    memory_bandwidth_gbs: float
    step_overhead_ms: float
    layer_overhead_ms: float
    seq_overhead_ms: float
    allreduce: Link | None  # None: not measured (one GPU); the cluster file's intra-machine link applies
    transfer: Link | None
    source: str = "profile"
    colocated_handoff_ms: float = 0.0
    colocated_handoff_seq_ms: float = 0.0
    allreduce_ms_by_ranks: tuple[tuple[int, float], ...] = ()

    def applied_to(self, gpu_types: dict[str, GpuType], where: str) -> GpuType:
        """The known GPU type this profile measures, with the measured figures in place of datasheet ones."""
        if self.device_type not in gpu_types:
            raise ConfigError(
                f"{where}: {self.source} measures device type {self.device_type!r}, which is unknown; known types: "
                f"{', '.join(sorted(gpu_types))} (describe it under gpu_types, or fix device_type)"
            )
        return replace(
            gpu_types[self.device_type], measured_bandwidth_gbs=self.memory_bandwidth_gbs,
            measured_tflops=self.matmul_tflops, step_overhead_ms=self.step_overhead_ms,
            layer_overhead_ms=self.layer_overhead_ms, seq_overhead_ms=self.seq_overhead_ms,
            allreduce_link=self.allreduce, transfer_link=self.transfer,
            colocated_handoff_ms=self.colocated_handoff_ms, colocated_handoff_seq_ms=self.colocated_handoff_seq_ms,
            allreduce_ms_by_ranks=self.allreduce_ms_by_ranks,
        )


def _positive(data: dict[str, Any], key: str, where: str, *, allow_zero: bool = False) -> float:
    value = data[key]
    if (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0
            or (value == 0 and not allow_zero)):  # YAML's .nan / .inf are floats
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{where}: {key} must be a number {bound}, got {value!r}")
    return float(value)


def _check_keys(data: dict[str, Any], required: tuple[str, ...], known: set[str], where: str) -> None:
    for key in map(str, data):
        if key not in known and key in UNITLESS:
            raise ConfigError(f"{where}: field {key!r} lacks its unit; profile fields carry units, e.g. "
                              f"{UNITLESS[key]!r}")
    unknown = sorted(set(map(str, data)) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; expected: {', '.join(sorted(known))}")
    missing = [k for k in required if k not in data]
    if missing:
        raise ConfigError(f"{where}: missing field(s) {', '.join(missing)} (a profile written by `hexgen profile` "
                          "has them all)")


def _link(data: Any, where: str) -> Link:
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected {{latency_ms: ..., bandwidth_gbps: ...}}")
    _check_keys(data, LINK_FIELDS, {*LINK_FIELDS, "ranks"}, where)
    return Link(_positive(data, "bandwidth_gbps", where), _positive(data, "latency_ms", where, allow_zero=True))


def _by_ranks(data: Any, where: str) -> tuple[tuple[int, float], ...]:
    """{TP degree >= 2: milliseconds >= 0}, sorted by degree."""
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{where}: expected a mapping of TP degree to milliseconds, e.g. {{3: 1.4}}")
    out = []
    for degree, ms in data.items():
        if isinstance(degree, bool) or not isinstance(degree, int) or degree < 2:
            raise ConfigError(f"{where}: TP degree {degree!r} must be an integer >= 2")
        out.append((degree, _positive({str(degree): ms}, str(degree), where, allow_zero=True)))
    return tuple(sorted(out))


def profile_from_dict(data: Any, source: str = "profile") -> DeviceProfile:
    """Validate one profile mapping; every mistake names the file and the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a profile is a mapping of measured figures (run `hexgen profile` to write one)")
    _check_keys(data, REQUIRED, {*REQUIRED, *LINKS, *OPTIONAL, BY_RANKS, *DESCRIPTIVE}, source)
    if data["format"] != FORMAT:
        raise ConfigError(f"{source}: format {data['format']!r} is not {FORMAT!r}")
    figures = {k: _positive(data, k, source) for k in RATES}
    figures |= {k: _positive(data, k, source, allow_zero=True) for k in OVERHEADS}
    figures |= {k: _positive(data, k, source, allow_zero=True) for k in OPTIONAL if k in data}
    if not set(LINKS) <= set(data) and data.get("backend") != "cuda":
        missing = ", ".join(k for k in LINKS if k not in data)
        raise ConfigError(f"{source}: missing field(s) {missing} (only a one-GPU machine's profile has no links)")
    links = {k: _link(data[k], f"{source}: {k}") if k in data else None for k in LINKS}
    by_ranks = _by_ranks(data[BY_RANKS], f"{source}: {BY_RANKS}") if BY_RANKS in data else ()
    return DeviceProfile(str(data["device_type"]), **figures, **links, source=source, allreduce_ms_by_ranks=by_ranks)


def load_profile(path: str | Path) -> DeviceProfile:
    text = read_text(path, "profile", ConfigError)
    try:
        data = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML or JSON ({getattr(err, 'problem', None) or err})") from None
    return profile_from_dict(data, str(path))


def profiles_from_cluster_entry(entry: Any, where: str, base_dir: Path) -> list[DeviceProfile]:
    """A cluster file's `profiles`: a list of profile file paths (relative to the cluster file) or inline mappings."""
    if not isinstance(entry, list):
        raise ConfigError(f"{where}: expected a list of profile files or mappings")
    out = []
    for i, item in enumerate(entry):
        if isinstance(item, str):
            path = Path(item) if Path(item).is_absolute() else base_dir / item
            out.append(load_profile(path))
        else:
            out.append(profile_from_dict(item, f"{where}[{i}]"))
    return out


def apply_profiles(cluster: Cluster, profiles: list[DeviceProfile]) -> Cluster:
    """The cluster with each profile's figures on every machine of its device type (`--profile`)."""
    types = {m.gpu.name: m.gpu for m in cluster.machines}
    for profile in profiles:
        if profile.device_type not in types:
            raise ConfigError(
                f"{profile.source} measures device type {profile.device_type!r}, but the cluster has no machine of "
                f"that type; its types: {', '.join(sorted(types))}"
            )
        types[profile.device_type] = profile.applied_to(types, profile.source)
    machines = tuple(replace(m, gpu=types[m.gpu.name]) for m in cluster.machines)
    return Cluster(machines, cluster.network)
