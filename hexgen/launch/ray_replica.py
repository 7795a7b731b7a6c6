"""The ranks of one replica as Ray actors on the machines its plan names; the same interface as RankProcesses.

Each rank is an actor holding one unit of its machine's resource (and one GPU on CUDA). Rank 0's node is the
torch.distributed master; the ranks reach the coordinator over the typed ZeroMQ channel. What an actor receives
as arguments travels by Ray's own mechanism: Ray is the cluster's trusted control plane.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import Any

import ray

from hexgen.launch.channel import ChannelAddress
from hexgen.launch.lifetime import free_port
from hexgen.launch.spec import RankSpec
from hexgen.raycluster.env import local_gpu_index, machine_resource

PLACE_TIMEOUT_S = 60.0  # a rank's actor not placed by then: its machine's slots are taken
MAX_REASON_CHARS = 120


@dataclass(frozen=True)
class RankNode:
    """Where a rank's actor runs."""

    machine: str
    node_id: str
    node_ip: str
    pid: int  # the actor's process on that machine


class RankActor:
    """One rank; `run` blocks for the rank's whole life (load, then drive or follow)."""

    def node(self) -> tuple[str, str, int]:
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), os.getpid()

    def rendezvous(self, needs_port: bool) -> tuple[str, int]:
        """torch.distributed master address of the replica: this node's address and a free port on it."""
        return ray.util.get_node_ip_address(), free_port() if needs_port else 0

    def run(self, spec: RankSpec, scheduler_config: Any, eos_token_ids: tuple[int, ...], address: ChannelAddress,
            rendezvous: tuple[str, int]) -> None:
        master_addr, port = rendezvous
        gpu_index = spec.gpu_index
        if spec.device == "cuda":  # the GPU Ray gave this actor, as this process numbers its devices
            gpu_index = local_gpu_index(ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES"))
        spec = replace(spec, master_addr=master_addr, master_port=port, gpu_index=gpu_index)
        if not Path(spec.source.directory).is_dir():  # an embedded model or GGUF resolves on this machine
            from hexgen.engine.checkpoint import resolve_model

            spec = replace(spec, source=resolve_model(spec.source.name, progress=False))
        from hexgen.launch.entry import run_rank

        run_rank(spec, scheduler_config, eos_token_ids, address)


@cache
def _remote_actor_class() -> Any:
    return ray.remote(RankActor)


class RayRanks:
    """Start, watch and stop the actors of one replica (rank r on machines[r])."""

    def __init__(self, machines: list[str], rank_args: list[tuple[Any, ...]], address: ChannelAddress):
        """rank_args[r] = (RankSpec, SchedulerConfig, eos_token_ids) of rank r."""
        self.machines = machines
        self.rank_args = rank_args
        self.address = address
        self.actors: list[Any] = []
        self.runs: list[Any] = []
        self._located: list[Any] = []
        self._nodes: list[RankNode] = []
        self._started_at = 0.0

    def __len__(self) -> int:
        return len(self.machines)

    def start(self) -> None:
        """Place every actor and start every rank without waiting: rank 0's actor picks the rendezvous address,
        which Ray hands to every rank's run call once it is known."""
        remote = _remote_actor_class()
        self._started_at = time.monotonic()
        for spec, machine in zip((a[0] for a in self.rank_args), self.machines, strict=True):
            gpus = 1 if spec.device == "cuda" else 0
            options = dict(num_cpus=0, num_gpus=gpus, resources={machine_resource(machine): 1}, max_restarts=0)
            self.actors.append(remote.options(**options).remote())
        self._located = [actor.node.remote() for actor in self.actors]
        rendezvous = self.actors[0].rendezvous.remote(len(self) > 1)
        for actor, (spec, config, eos) in zip(self.actors, self.rank_args, strict=True):
            self.runs.append(actor.run.remote(spec, config, eos, self.address, rendezvous))

    def first_failure(self) -> str | None:
        """Why a rank ended (its actor died or its run returned) or could not be placed in time, if so."""
        if not self.runs:
            return None
        done, _ = ray.wait(self.runs, num_returns=1, timeout=0)
        if not done:
            return self._unplaced()
        rank = self.runs.index(done[0])
        node_ip = self.placement(rank).get("node_ip", "node unknown")
        where = f"rank {rank} on machine {self.machines[rank]!r} ({node_ip})"
        try:
            ray.get(done[0], timeout=0)
        except (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError) as err:
            return f"{where}: its actor is gone ({type(err).__name__}: machine down or cut off, or process killed)"
        except Exception as err:  # noqa: BLE001 - described in one line
            first = str(err).strip().splitlines()[0][:MAX_REASON_CHARS] if str(err).strip() else ""
            return f"{where}: {type(err).__name__}{': ' + first if first else ''}"
        return f"{where}: ended"

    def _unplaced(self) -> str | None:
        if time.monotonic() - self._started_at < PLACE_TIMEOUT_S or self.placement(0):
            return None
        placed, _ = ray.wait(self._located, num_returns=len(self), timeout=0)
        rank = next(r for r, ref in enumerate(self._located) if ref not in placed)
        return (f"rank {rank}: no free slot on machine {self.machines[rank]!r} after {PLACE_TIMEOUT_S:.0f} s "
                "(does another server hold its slots?)")

    def stop(self, grace_s: float = 5.0) -> None:
        """Wait up to grace_s for the ranks to end by themselves, then kill every actor."""
        if self.runs and grace_s > 0:
            ray.wait(self.runs, num_returns=len(self.runs), timeout=grace_s)
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - an actor of a lost node is already gone
                pass

    def placement(self, rank: int) -> dict[str, str | int]:
        """The rank's Ray node and process id there, once its actor has been placed ({} before)."""
        if not self._nodes and self._located:
            placed, _ = ray.wait(self._located, num_returns=len(self), timeout=0)
            if len(placed) == len(self):
                located = zip(self.machines, ray.get(self._located), strict=True)
                self._nodes = [RankNode(machine, *where) for machine, where in located]
        if not self._nodes:
            return {}
        node = self._nodes[rank]
        return {"node_id": node.node_id, "node_ip": node.node_ip, "pid": node.pid}
