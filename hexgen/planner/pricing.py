"""The cost model reduced to the DP's scalars: seconds of a layer, a stage's extras, a hop, the token return."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import cache

from hexgen.cluster import Cluster
from hexgen.costmodel import CostConfig, Workload, max_stage_layers
from hexgen.costmodel.stage import layer_cost, stage_extras, token_return_cost, transfer_cost
from hexgen.models import ModelSpec


class StagePricer:
    """Memoised per-machine figures for one (cluster, model, workload, cost config)."""

    def __init__(self, cluster: Cluster, model: ModelSpec, workload: Workload, cfg: CostConfig):
        self.cluster, self.model, self.workload, self.cfg = cluster, model, workload, cfg
        self.per_layer_s = cache(self._per_layer_s)
        self.max_layers = cache(self._max_layers)
        self.stage_extra_s = cache(self._stage_extra_s)
        self.hop_s = cache(self._hop_s)
        self.token_return_s = cache(self._token_return_s)

    def _latency(self, cost) -> float:
        """The DP's objective: one request's latency at batch 1; the time of one full batch when replicas batch
        (its inverse is throughput at full load), so batching replicas are sized for throughput."""
        wl = self.workload
        return cost.batch_time_s(wl.max_batch, wl.prompt_tokens, wl.output_tokens)

    def tp_degrees(self, machine: str) -> list[int]:
        return self.model.valid_tp_degrees(self.cluster.machine(machine).count)

    def _per_layer_s(self, machine: str, tp_degree: int) -> float:
        gpu, link = self.cluster.machine(machine).gpu, self.cluster.tp_link(machine)
        return self._latency(layer_cost(self.model, gpu, tp_degree, link, self.cfg))

    def _max_layers(self, machine: str, tp_degree: int, is_first: bool, is_last: bool) -> int:
        gpu = self.cluster.machine(machine).gpu
        return max_stage_layers(
            self.model, tp_degree, gpu.memory_gb, self.workload, self.cfg, is_first=is_first, is_last=is_last
        )

    def _stage_extra_s(self, machine: str, tp_degree: int, is_first: bool, is_last: bool) -> float:
        """The LM head when last, the input broadcast inside the TP group when not first, the step overhead."""
        gpu, link = self.cluster.machine(machine).gpu, self.cluster.tp_link(machine)
        return self._latency(stage_extras(self.model, gpu, tp_degree, link, self.cfg, is_first=is_first,
                                          is_last=is_last))

    def _hop_s(self, src: str, dst: str) -> float:
        return self._latency(transfer_cost(self.model, self.cluster.link(src, dst), self.cfg))

    def _token_return_s(self, last: str, first: str) -> float:
        return self._latency(token_return_cost(self.cluster.link(last, first)))

    def pipeline_s(self, stages: Sequence[tuple[str, int, int]]) -> float:
        """The DP's objective of a whole pipeline of (machine, TP degree, layers) stages: their times with the
        embedding on the first and the LM head on the last, a hop into every stage after the first, and, past one
        stage, the sampled ids back to the first."""
        last = len(stages) - 1
        total_s = sum(self.stage_extra_s(m, d, i == 0, i == last) + n * self.per_layer_s(m, d)
                      for i, (m, d, n) in enumerate(stages))
        total_s += sum(self.hop_s(a[0], b[0]) for a, b in itertools.pairwise(stages))
        return total_s + (self.token_return_s(stages[-1][0], stages[0][0]) if last > 0 else 0.0)
