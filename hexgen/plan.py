"""The deployment plan: replicas -> pipeline stages -> (machine, GPUs, TP degree, layer range); JSON in and out.

This module checks the plan's *structure* against a model shape (layers cover the model once per
replica, TP degrees legal, no GPU used twice). Memory against a cluster is checked by the scheduler's
validator, which calls `validate_structure` first.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hexgen.errors import PlanError
from hexgen.folders import read_text
from hexgen.models import ModelSpec

LOCAL_MACHINE = "localhost"


@dataclass(frozen=True)
class Stage:
    """One pipeline stage: a TP group of `tp` GPUs on one machine holding layers [first, last+1)."""

    machine: str
    gpus: tuple[int, ...]
    tp: int
    layers: tuple[int, int]

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    def to_dict(self) -> dict[str, Any]:
        return {"machine": self.machine, "gpus": list(self.gpus), "tp": self.tp, "layers": list(self.layers)}


@dataclass(frozen=True)
class Replica:
    """An independent copy of the model: stages run in order, each on its own TP group."""

    stages: tuple[Stage, ...]
    # What the planner expects of this replica; keys carry their unit (e.g. "latency_s").
    predicted: dict[str, float] = field(default_factory=dict, compare=False, hash=False)

    @property
    def world_size(self) -> int:
        """Worker processes (ranks) this replica needs: the sum of its stages' TP degrees."""
        return sum(s.tp for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stages": [s.to_dict() for s in self.stages]}
        if self.predicted:
            out["predicted"] = dict(self.predicted)
        return out


@dataclass(frozen=True)
class DeploymentPlan:
    model: str
    replicas: tuple[Replica, ...]
    # Free-form facts about how the plan was made (workload, SLO, search time); never read by the engine.
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model, "replicas": [r.to_dict() for r in self.replicas]}
        if self.meta:
            out["meta"] = self.meta
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    def validate_structure(self, model: ModelSpec) -> None:
        """Raise PlanError naming the replica, stage and rule that the plan breaks."""
        if not self.replicas:
            raise PlanError("plan has no replicas; a plan needs at least one")
        used: dict[tuple[str, int], str] = {}
        for r, replica in enumerate(self.replicas):
            _check_replica_layers(replica, r, model)
            for s, stage in enumerate(replica.stages):
                where = f"replica {r} stage {s}"
                _check_stage_tp(stage, where, model)
                for gpu in stage.gpus:
                    key = (stage.machine, gpu)
                    if key in used:
                        raise PlanError(
                            f"{where}: GPU {gpu} of machine {stage.machine!r} is already used by {used[key]}"
                        )
                    used[key] = where


def _check_replica_layers(replica: Replica, r: int, model: ModelSpec) -> None:
    if not replica.stages:
        raise PlanError(f"replica {r}: has no stages")
    expected_first = 0
    for s, stage in enumerate(replica.stages):
        first, end = stage.layers
        if first != expected_first:
            raise PlanError(
                f"replica {r} stage {s}: layers start at {first} but must start at {expected_first} "
                "(stages cover the model's layers in order, each exactly once)"
            )
        if end <= first:
            raise PlanError(
                f"replica {r} stage {s}: layer range [{first}, {end}) is empty; every stage needs >= 1 layer"
            )
        expected_first = end
    if expected_first != model.num_layers:
        raise PlanError(
            f"replica {r}: stages cover layers [0, {expected_first}) but {model.name} has {model.num_layers} layers"
        )


def _check_stage_tp(stage: Stage, where: str, model: ModelSpec) -> None:
    if stage.tp < 1:
        raise PlanError(f"{where}: tp must be >= 1, got {stage.tp}")
    if len(stage.gpus) != stage.tp:
        raise PlanError(f"{where}: tp is {stage.tp} but {len(stage.gpus)} GPUs are listed; they must match")
    if len(set(stage.gpus)) != len(stage.gpus):
        raise PlanError(f"{where}: GPU list {list(stage.gpus)} repeats a GPU")
    if model.num_heads % stage.tp or model.num_kv_heads % stage.tp:
        raise PlanError(
            f"{where}: tp {stage.tp} does not divide {model.name}'s {model.num_heads} attention heads and "
            f"{model.num_kv_heads} key/value heads; valid TP degrees: {model.valid_tp_degrees()}"
        )


def single_replica_plan(model: ModelSpec, tp_degrees: list[int], layer_counts: list[int] | None,
                        layout_flag: str | None = None) -> DeploymentPlan:
    """The `--tp T0 T1 .. --layers L0 L1 ..` shorthand: one replica on this machine, GPUs numbered in order.

    With no layer counts the layers are split as evenly as possible (earlier stages take the remainder). A broken
    rule is a PlanError naming the flags the user typed: --tp and --layers, or `layout_flag` (e.g. `--layout "3 1:20
    10"`) where one flag holds both.
    """
    tp_flag = layout_flag or f"--tp {' '.join(map(str, tp_degrees))}"
    if min(tp_degrees, default=0) < 1:
        raise PlanError(f"{tp_flag}: every stage's TP degree must be >= 1; valid TP degrees for {model.name}: "
                        f"{model.valid_tp_degrees()}")
    if layer_counts is None:
        base, extra = divmod(model.num_layers, len(tp_degrees))
        layer_counts = [base + (1 if i < extra else 0) for i in range(len(tp_degrees))]
    if len(layer_counts) != len(tp_degrees):
        raise PlanError(
            f"{layout_flag}: gives {len(tp_degrees)} TP degrees but {len(layer_counts)} layer counts; give one count "
            "per stage" if layout_flag else
            f"--tp gives {len(tp_degrees)} stages but --layers gives {len(layer_counts)}; give one count per stage"
        )
    if sum(layer_counts) != model.num_layers or min(layer_counts) < 1:
        layers_flag = f"{layout_flag}: the layer counts" if layout_flag else "--layers"
        raise PlanError(
            f"{layers_flag} {' '.join(map(str, layer_counts))} must be >= 1 each and sum to {model.name}'s "
            f"{model.num_layers} layers (they sum to {sum(layer_counts)})"
        )
    stages, first_layer, first_gpu = [], 0, 0
    for tp, count in zip(tp_degrees, layer_counts, strict=True):
        gpus = tuple(range(first_gpu, first_gpu + tp))
        stages.append(Stage(LOCAL_MACHINE, gpus, tp, (first_layer, first_layer + count)))
        first_layer += count
        first_gpu += tp
    plan = DeploymentPlan(model=model.name, replicas=(Replica(tuple(stages)),))
    try:
        plan.validate_structure(model)
    except PlanError as err:  # "replica 0 stage 1: tp 3 does not divide ..." said of the flag the user typed
        raise PlanError(f"{tp_flag}: {str(err).removeprefix('replica 0 ')}") from None
    return plan


def plan_from_dict(data: Any, source: str = "plan") -> DeploymentPlan:
    """Parse the JSON form; every malformed field is reported with its path."""
    if not isinstance(data, dict) or "replicas" not in data or "model" not in data:
        raise PlanError(f"{source}: a plan is an object with 'model' and 'replicas'")
    replicas = []
    for r, rep in enumerate(_as_list(data["replicas"], f"{source}: replicas")):
        where = f"{source}: replicas[{r}]"
        if not isinstance(rep, dict):
            raise PlanError(f"{where} must be an object with 'stages'")
        stages = tuple(
            _stage_from_dict(st, f"{where}.stages[{s}]")
            for s, st in enumerate(_as_list(rep.get("stages"), f"{where}.stages"))
        )
        replicas.append(Replica(stages, _predicted(rep.get("predicted") or {}, f"{where}.predicted")))
    meta = data.get("meta") or {}
    if not isinstance(meta, dict):
        raise PlanError(f"{source}: meta must be an object")
    if not isinstance(data["model"], str) or not data["model"]:
        raise PlanError(f"{source}: model must be a model's name, got {json.dumps(data['model'])}")
    return DeploymentPlan(model=data["model"], replicas=tuple(replicas), meta=meta)


def _predicted(data: Any, where: str) -> dict[str, float]:
    """What the planner expects of a replica: numbers by name (not read by the engine; the server reports them)."""
    def number(v: Any) -> bool:
        return not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v) and v >= 0

    if not isinstance(data, dict) or not all(map(number, data.values())):
        raise PlanError(f"{where} must be an object of non-negative numbers, got {json.dumps(data)}")
    return {str(k): float(v) for k, v in data.items()}


def load_plan(path: str | Path) -> DeploymentPlan:
    try:
        data = json.loads(read_text(path, "plan file", PlanError))
    except json.JSONDecodeError as err:
        raise PlanError(f"{path}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from None
    return plan_from_dict(data, str(path))


def _as_list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise PlanError(f"{where} must be a list")
    return value


def _integer(value: Any, where: str, minimum: int) -> int:
    """A JSON integer (not a bool, not a float such as 1e400, which JSON reads as infinity) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PlanError(f"{where} must be an integer >= {minimum}, got {json.dumps(value)}")
    return value


def _stage_from_dict(data: Any, where: str) -> Stage:
    if not isinstance(data, dict):
        raise PlanError(f"{where} must be an object with machine, gpus, tp, layers")
    for key in ("machine", "gpus", "layers"):
        if key not in data:
            raise PlanError(f"{where} lacks {key!r}")
    machine = data["machine"]
    if not isinstance(machine, str) or not machine:
        raise PlanError(f"{where}.machine must be a machine's name, got {json.dumps(machine)}")
    gpus = tuple(_integer(g, f"{where}.gpus[{i}]", 0) for i, g in enumerate(_as_list(data["gpus"], f"{where}.gpus")))
    layers = _as_list(data["layers"], f"{where}.layers")
    if len(layers) != 2:
        raise PlanError(f"{where}.layers must be [first, last+1], got {json.dumps(layers)}")
    tp = _integer(data.get("tp", len(gpus)), f"{where}.tp", 1)
    return Stage(machine, gpus, tp, (_integer(layers[0], f"{where}.layers[0]", 0),
                                     _integer(layers[1], f"{where}.layers[1]", 0)))
