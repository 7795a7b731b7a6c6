"""The GPU pool: machines, GPU types (a built-in table plus overrides) and the link between any two machines."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from hexgen.errors import ConfigError
from hexgen.folders import read_text

GIB = 2**30


@dataclass(frozen=True)
class Link:
    """A network path: bandwidth in gigabits per second and one-way latency in milliseconds."""

    bandwidth_gbps: float
    latency_ms: float

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_gbps * 1e9 / 8

    @property
    def latency_s(self) -> float:
        return self.latency_ms / 1e3

    def transfer_s(self, num_bytes: float) -> float:
        """Time to send one message of `num_bytes` over this link: latency + size / bandwidth."""
        return self.latency_s + num_bytes / self.bytes_per_s


@dataclass(frozen=True)
class GpuType:
    """One GPU model's figures: memory in GiB, memory bandwidth in GB/s, dense fp16 TFLOPS, USD per GPU-hour.

    The datasheet peaks are scaled by the cost model's efficiencies. A measured profile (`hexgen profile`,
    hexgen/profile.py) sets the achieved rates instead, the engine's fixed costs per step, per layer and per
    sequence, and the links its ranks use on one machine (all-reduce inside a TP group, stage-to-stage sends).
    """

    name: str
    memory_gb: float
    bandwidth_gbs: float
    tflops_fp16: float
    price_per_hour: float = 0.0
    measured_bandwidth_gbs: float | None = None
    measured_tflops: float | None = None
    step_overhead_ms: float = 0.0  # per engine step of one stage
    layer_overhead_ms: float = 0.0  # per layer per step
    seq_overhead_ms: float = 0.0  # per sequence per layer per step
    allreduce_link: Link | None = None
    transfer_link: Link | None = None
    colocated_handoff_ms: float = 0.0  # per step, between stages sharing a CPU machine's cores
    colocated_handoff_seq_ms: float = 0.0  # the same, per sequence
    # (TP degree, ms): the fixed time of one decode all-reduce over that many ranks as the engine met it on this
    # device type (CPU: ranks sharing the cores); replaces the ring formula's 2 (t - 1) x latency at that degree
    allreduce_ms_by_ranks: tuple[tuple[int, float], ...] = ()

    def allreduce_fixed_ms(self, tp_degree: int) -> float | None:
        """The measured fixed time of an all-reduce over `tp_degree` ranks, None where not measured."""
        return dict(self.allreduce_ms_by_ranks).get(tp_degree)

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * GIB

    def memory_bytes_per_s(self, efficiency: float) -> float:
        """Achieved memory bandwidth: measured, else the datasheet peak x `efficiency`."""
        if self.measured_bandwidth_gbs is not None:
            return self.measured_bandwidth_gbs * 1e9
        return self.bandwidth_gbs * 1e9 * efficiency

    def flops_per_s(self, efficiency: float) -> float:
        """Achieved dense matmul rate: measured, else the datasheet peak x `efficiency`."""
        if self.measured_tflops is not None:
            return self.measured_tflops * 1e12
        return self.tflops_fp16 * 1e12 * efficiency


@dataclass(frozen=True)
class Machine:
    """A host with `count` GPUs of one type in one region; `price_per_hour` (whole machine) overrides the table.
    `cpu_cores`: the "GPUs" are CPU worker slots sharing this many cores (the simulator then shares them among the
    ranks it runs there, as `hexgen serve` does); None: a device per slot."""

    name: str
    gpu: GpuType
    count: int
    region: str
    price_per_hour: float | None = None
    cpu_cores: int | None = None

    @property
    def cost_per_hour(self) -> float:
        return self.price_per_hour if self.price_per_hour is not None else self.gpu.price_per_hour * self.count


@dataclass(frozen=True)
class Network:
    """Default links by locality plus overrides keyed by an unordered pair of region or machine names."""

    intra_machine: Link
    intra_region: Link
    inter_region: Link
    overrides: tuple[tuple[frozenset[str], Link], ...] = ()


@dataclass(frozen=True)
class Cluster:
    """The machines one deployment may use and how they are connected."""

    machines: tuple[Machine, ...]
    network: Network

    @cached_property
    def _by_name(self) -> dict[str, Machine]:
        return {m.name: m for m in self.machines}

    @cached_property
    def _overrides(self) -> dict[frozenset[str], Link]:
        return dict(self.network.overrides)

    def machine(self, name: str) -> Machine:
        if name in self._by_name:
            return self._by_name[name]
        raise ConfigError(f"machine {name!r} is not in the cluster; machines: {', '.join(self.machine_names)}")

    @property
    def machine_names(self) -> list[str]:
        return [m.name for m in self.machines]

    @property
    def num_gpus(self) -> int:
        return sum(m.count for m in self.machines)

    @property
    def cost_per_hour(self) -> float:
        return sum(m.cost_per_hour for m in self.machines)

    @property
    def regions(self) -> list[str]:
        return sorted({m.region for m in self.machines})

    def link(self, a: str, b: str) -> Link:
        """The link between machines `a` and `b`: a machine-pair override, then a region-pair one, then defaults
        (inside one machine: its GPU type's measured stage-to-stage link, if profiled)."""
        ma, mb = self.machine(a), self.machine(b)
        overrides = self._overrides
        if frozenset((a, b)) in overrides:
            return overrides[frozenset((a, b))]
        if a == b:
            return ma.gpu.transfer_link or self.network.intra_machine
        if frozenset((ma.region, mb.region)) in overrides:
            return overrides[frozenset((ma.region, mb.region))]
        return self.network.intra_region if ma.region == mb.region else self.network.inter_region

    def tp_link(self, name: str) -> Link:
        """The path a TP group's all-reduces take on machine `name`: measured for its GPU type, else intra-machine."""
        return self.machine(name).gpu.allreduce_link or self.link(name, name)


def builtin_gpu_types() -> dict[str, GpuType]:
    """The table in hexgen/data/gpus.yaml, keyed by name."""
    text = resources.files("hexgen").joinpath("data/gpus.yaml").read_text()
    return {name: _gpu_type(name, row, "built-in GPU table") for name, row in yaml.safe_load(text).items()}


MAX_MACHINE_COUNT = 1024  # GPUs (or CPU worker slots) of one machine: a count beyond is a typo, not a machine


def single_machine_cluster(gpu: GpuType, count: int, name: str = "localhost") -> Cluster:
    """A cluster of one machine (by default the local one, which plans call `localhost`)."""
    link = Link(bandwidth_gbps=256.0, latency_ms=0.01)
    return Cluster((Machine(name, gpu, count, "local"),), Network(link, link, link))


def load_cluster(path: str | Path) -> Cluster:
    """Read a cluster YAML file; every mistake is reported with the file and what would be right."""
    return parse_cluster(read_text(path, "cluster file", ConfigError), str(path), Path(path).parent)


def parse_cluster(text: str, source: str = "cluster", base_dir: Path | None = None) -> Cluster:
    """A cluster from YAML text; `profiles` paths are read relative to `base_dir` (the cluster file's folder)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{source}: malformed YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a cluster file is a mapping with 'machines' and 'network'")
    _reject_unknown(data, {"machines", "gpu_types", "network", "profiles"}, source)
    gpu_types = builtin_gpu_types()
    for name, row in (data.get("gpu_types") or {}).items():
        gpu_types[str(name)] = _gpu_type(str(name), row, f"{source}: gpu_types.{name}", gpu_types.get(str(name)))
    if data.get("profiles"):
        from hexgen.profile import profiles_from_cluster_entry

        for profile in profiles_from_cluster_entry(data["profiles"], f"{source}: profiles", base_dir or Path(".")):
            gpu_types[profile.device_type] = profile.applied_to(gpu_types, f"{source}: profiles")
    machines = _machines(data.get("machines"), gpu_types, source)
    network = _network(data.get("network") or {}, machines, source)
    return Cluster(machines, network)


def _reject_unknown(data: dict[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(map(str, data)) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; expected: {', '.join(sorted(known))}")


def _number(row: dict[str, Any], key: str, where: str, default: float | None = None) -> float:
    value = row.get(key, default)
    if value is None:
        raise ConfigError(f"{where}: missing {key!r}")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where}: {key} must be a non-negative number, got {value!r}")  # YAML spells NaN .nan
    return float(value)


def _gpu_type(name: str, row: Any, where: str, base: GpuType | None = None) -> GpuType:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected a mapping of memory_gb, bandwidth_gbs, tflops_fp16, price_per_hour")
    _reject_unknown(row, {"memory_gb", "bandwidth_gbs", "tflops_fp16", "price_per_hour", "source"}, where)
    fields = ("memory_gb", "bandwidth_gbs", "tflops_fp16", "price_per_hour")
    defaults = {f: getattr(base, f) if base else (0.0 if f == "price_per_hour" else None) for f in fields}
    values = {f: _number(row, f, where, defaults[f]) for f in fields}
    for f in ("memory_gb", "bandwidth_gbs", "tflops_fp16"):
        if values[f] <= 0:
            raise ConfigError(f"{where}: {f} must be positive")
    return GpuType(name, **values)


def _machines(rows: Any, gpu_types: dict[str, GpuType], source: str) -> tuple[Machine, ...]:
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"{source}: 'machines' must be a non-empty list of {{name, gpu, count, region}}")
    machines, seen = [], set()
    for i, row in enumerate(rows):
        where = f"{source}: machines[{i}]"
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: expected a mapping with name, gpu, count, region")
        _reject_unknown(row, {"name", "gpu", "count", "region", "price_per_hour", "cpu_cores"}, where)
        for key in ("name", "gpu", "count"):
            if key not in row:
                raise ConfigError(f"{where}: missing {key!r}")
        name, gpu = str(row["name"]), str(row["gpu"])
        if name in seen:
            raise ConfigError(f"{where}: machine name {name!r} is used twice")
        if gpu not in gpu_types:
            raise ConfigError(
                f"{where}: unknown GPU type {gpu!r}; known types: {', '.join(sorted(gpu_types))} "
                "(or describe it under gpu_types)"
            )
        count = row["count"]
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_MACHINE_COUNT:
            raise ConfigError(f"{where}: count must be an integer in 1..{MAX_MACHINE_COUNT} (GPUs or CPU worker slots "
                              f"of one machine), got {count!r}")
        price = _number(row, "price_per_hour", where) if "price_per_hour" in row else None
        cores = row.get("cpu_cores")
        if cores is not None and (isinstance(cores, bool) or not isinstance(cores, int) or cores < 1):
            raise ConfigError(f"{where}: cpu_cores must be a positive integer (the cores its CPU worker slots "
                              f"share), got {cores!r}")
        machines.append(Machine(name, gpu_types[gpu], count, str(row.get("region", "default")), price, cores))
        seen.add(name)
    return tuple(machines)


DEFAULT_LINKS = {
    "intra_machine": Link(256.0, 0.01),
    "intra_region": Link(10.0, 0.5),
    "inter_region": Link(1.0, 30.0),
}


def _link(row: Any, where: str) -> Link:
    if not isinstance(row, dict):
        raise ConfigError(f"{where}: expected {{bandwidth_gbps: ..., latency_ms: ...}}")
    _reject_unknown(row, {"bandwidth_gbps", "latency_ms", "between"}, where)
    bandwidth = _number(row, "bandwidth_gbps", where)
    if bandwidth <= 0:
        raise ConfigError(f"{where}: bandwidth_gbps must be positive")
    return Link(bandwidth, _number(row, "latency_ms", where))


def _network(data: Any, machines: tuple[Machine, ...], source: str) -> Network:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: 'network' must be a mapping")
    _reject_unknown(data, {*DEFAULT_LINKS, "links"}, f"{source}: network")
    defaults = {k: _link(data[k], f"{source}: network.{k}") if k in data else v for k, v in DEFAULT_LINKS.items()}
    names = {m.name for m in machines} | {m.region for m in machines}
    overrides = []
    for i, row in enumerate(data.get("links") or []):
        where = f"{source}: network.links[{i}]"
        between = row.get("between") if isinstance(row, dict) else None
        if not isinstance(between, list) or len(between) != 2:
            raise ConfigError(f"{where}: 'between' must list two region or machine names")
        for end in map(str, between):
            if end not in names:
                known = ", ".join(sorted(names))
                raise ConfigError(f"{where}: {end!r} is neither a machine nor a region; known: {known}")
        overrides.append((frozenset(map(str, between)), _link(row, where)))
    return Network(overrides=tuple(overrides), **defaults)
