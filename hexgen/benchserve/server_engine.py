"""What a hexgen server's engines did during a run, read from its /status before and after: mean step time, batch
size and how busy each replica's driver was. The client-side figures (TTFT, TPOT) say how fast; these say why: a
driver busy 60% of a saturated run waits on the server, a slow mean step on the device.

Other servers (vLLM, llama.cpp) have no such /status: the figures are then simply absent.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import httpx

TOTALS = ("steps", "step_tokens", "sampled_tokens", "busy_s")  # a replica's "engine" entry in /status
SETTLE_LIMIT_S = 3.0  # how long to wait for the replicas' last heartbeats once the load has stopped
POLL_S = 0.05

Totals = dict[int, dict[str, float]]  # replica index -> TOTALS


@dataclass(frozen=True)
class EngineFigures:
    """Summed over the replicas that stepped during the run (their drivers' totals, after minus before)."""

    replicas: int  # replicas whose driver ran at least one step
    steps: int
    step_tokens: int
    sampled_tokens: int
    busy_s: float
    duration_s: float  # the run's wall time

    def as_dict(self) -> dict[str, float]:
        """The totals and the means they give (for the JSON file)."""
        return {"replicas": self.replicas, "steps": self.steps, "step_tokens": self.step_tokens,
                "sampled_tokens": self.sampled_tokens, "busy_s": self.busy_s, "duration_s": self.duration_s,
                "mean_step_ms": self.mean_step_ms, "tokens_per_step": self.tokens_per_step,
                "sampled_per_step": self.sampled_per_step, "busy_fraction": self.busy_fraction}

    @property
    def mean_step_ms(self) -> float:
        return 1000 * self.busy_s / self.steps

    @property
    def tokens_per_step(self) -> float:
        return self.step_tokens / self.steps

    @property
    def sampled_per_step(self) -> float:
        """Sequences sampled per step: the decode batch size, once prompts are in."""
        return self.sampled_tokens / self.steps

    @property
    def busy_fraction(self) -> float:
        """Of the run's wall time, the share the drivers spent in their steps (mean over the replicas)."""
        return self.busy_s / (self.replicas * self.duration_s)


def status_url(base_url: str) -> str:
    """hexgen serves /status beside /v1."""
    return base_url.removesuffix("/v1") + "/status"


async def engine_totals(client: httpx.AsyncClient, base_url: str, headers: dict[str, str]) -> Totals | None:
    """Each replica's engine totals once the server is idle and its replicas' reports have settled (two reads in a
    row agree); None when the server has no hexgen /status."""
    deadline = time.monotonic() + SETTLE_LIMIT_S
    previous = None
    while True:
        try:
            response = await client.get(status_url(base_url), headers=headers, timeout=5.0)
            if response.status_code != 200:
                return None
            replicas = response.json()["replicas"]
            totals = {r["index"]: {k: r["engine"][k] for k in TOTALS} for r in replicas}
            idle = all(r["running"] == 0 and r["waiting"] == 0 for r in replicas if r["status"] == "up")
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return None
        if not totals:
            return None
        if (idle and totals == previous) or time.monotonic() > deadline:
            return totals
        previous = totals
        await asyncio.sleep(POLL_S)


def engine_figures(before: Totals | None, after: Totals | None, duration_s: float) -> EngineFigures | None:
    """The run's share of the totals; None without both reads or without a step."""
    if before is None or after is None:
        return None
    deltas = [{k: after[i][k] - before[i][k] for k in TOTALS} for i in after if i in before]
    stepped = [d for d in deltas if d["steps"] > 0]
    if not stepped or duration_s <= 0:
        return None
    return EngineFigures(
        replicas=len(stepped), steps=int(sum(d["steps"] for d in stepped)),
        step_tokens=int(sum(d["step_tokens"] for d in stepped)),
        sampled_tokens=int(sum(d["sampled_tokens"] for d in stepped)),
        busy_s=sum(d["busy_s"] for d in stepped), duration_s=duration_s,
    )
