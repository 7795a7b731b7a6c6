"""--replan: when replicas go down because a machine was lost, plan the free slots of the machines still alive with
the planner (the original plan's objective and workload) and start the new replicas beside the untouched ones."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from dataclasses import replace

from hexgen.cluster import Cluster
from hexgen.costmodel import Workload
from hexgen.models import ModelSpec
from hexgen.plan import DeploymentPlan, Replica
from hexgen.planner.genetic import GAConfig
from hexgen.planner.search import PlanRequest, plan_cluster
from hexgen.server.replica_client import ReplicaClient, ReplicaStartError

WATCH_PERIOD_S = 1.0
NODE_DEATH_WAIT_S = 15.0  # Ray declares a node dead after ~3 s of failed 1 s health checks; margin for busy hosts
REPLAN_GENERATIONS = 20


def plan_request(plan: DeploymentPlan) -> PlanRequest:
    """The request the original plan was searched for (from its meta), with a short search."""
    meta = plan.meta
    workload = Workload(int(meta.get("prompt_tokens", 128)), int(meta.get("output_tokens", 64)),
                        int(meta.get("max_batch", 1)))
    return PlanRequest(float(meta.get("rate_rps", 1.0)), float(meta.get("slo_s", 10.0)), workload,
                       num_requests=200, seed=int(meta.get("seed", 0)),
                       objective=str(meta.get("objective", "attainment")), ga=GAConfig(generations=REPLAN_GENERATIONS))


def free_cluster(cluster: Cluster, live_slots: dict[str, float], replicas: list[ReplicaClient]) -> tuple[
        Cluster, dict[str, list[int]]]:
    """The cluster file's machines that are alive, each with the slots no serving replica holds; and per machine
    those free slot indices."""
    held: dict[str, set[int]] = {}
    for client in replicas:
        if client.status in ("up", "starting"):
            for stage in client.plan.stages:
                held.setdefault(stage.machine, set()).update(stage.gpus)
    machines, free = [], {}
    for machine in cluster.machines:
        slots = min(machine.count, int(live_slots.get(machine.name, 0)))
        indices = [i for i in range(slots) if i not in held.get(machine.name, set())]
        if indices:
            machines.append(replace(machine, count=len(indices)))
            free[machine.name] = indices
    return replace(cluster, machines=tuple(machines)), free


def on_free_slots(replica: Replica, free: dict[str, list[int]]) -> Replica:
    """The planner numbers a machine's GPUs from 0; map them onto that machine's free indices."""
    stages = tuple(replace(s, gpus=tuple(free[s.machine][g] for g in s.gpus)) for s in replica.stages)
    return replace(replica, stages=stages)


class Replanner:
    def __init__(self, replicas: list[ReplicaClient], cluster: Cluster, model: ModelSpec, request: PlanRequest,
                 make_replica: Callable[[int, Replica], ReplicaClient], live_slots: Callable[[], dict[str, float]]):
        """replicas is the coordinator's own list: new replicas are appended to it once they are up."""
        self.replicas = replicas
        self.cluster = cluster
        self.model = model
        self.request = request
        self.make_replica = make_replica
        self.live_slots = live_slots
        self.handled: set[int] = set()

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_PERIOD_S)
            lost = {r.index for r in self.replicas if r.status == "down"} - self.handled
            if lost:
                self.handled |= lost
                await self.replan(lost)

    async def replan(self, lost: set[int]) -> None:
        slots = await self._settled_slots(lost)
        cluster, free = free_cluster(self.cluster, slots, self.replicas)
        where = ", ".join(f"{m.name} ({m.count})" for m in cluster.machines) or "nothing"
        _say(f"replicas {sorted(lost)} down; re-planning on the free slots of live machines: {where}")
        if not cluster.machines:
            return
        try:
            result = await asyncio.to_thread(plan_cluster, cluster, self.model, self.request)
        except Exception as err:  # noqa: BLE001 - the untouched replicas keep serving
            _say(f"re-planning failed: {str(err).splitlines()[0]}")
            return
        for replica in result.plan.replicas:
            client = self.make_replica(len(self.replicas), on_free_slots(replica, free))
            try:
                await client.start()
            except ReplicaStartError as err:
                _say(f"replacement replica failed to start: {err}")
                continue
            self.handled.discard(client.index)
            self.replicas.append(client)
            _say(f"replica {client.index} up: " + " -> ".join(f"{s.machine} TP {s.tp} x {s.num_layers} layers"
                                                             for s in client.plan.stages))


    async def _settled_slots(self, lost: set[int]) -> dict[str, float]:
        """Live slots once Ray has declared a machine of the lost replicas dead (an actor often dies seconds before
        its node is declared dead), or after NODE_DEATH_WAIT_S if none is (a rank failed on a healthy machine)."""
        machines = {s.machine for r in self.replicas if r.index in lost for s in r.plan.stages}
        deadline = time.monotonic() + NODE_DEATH_WAIT_S
        while True:
            slots = await asyncio.to_thread(self.live_slots)
            if not machines <= set(slots) or time.monotonic() > deadline:
                return slots
            await asyncio.sleep(WATCH_PERIOD_S)


def _say(text: str) -> None:
    print(f"hexgen serve: {text}", file=sys.stderr, flush=True)
