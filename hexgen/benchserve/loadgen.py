"""The load generator: warm-up, then closed-loop (fixed concurrency) or open-loop (Poisson) requests."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from hexgen.benchserve.arrivals import poisson_arrivals_s
from hexgen.benchserve.client import RequestResult, describe_exception, send_request
from hexgen.benchserve.config import BenchConfig
from hexgen.benchserve.server_engine import EngineFigures, engine_figures, engine_totals
from hexgen.errors import UserError

OnResult = Callable[[RequestResult], None]


@dataclass(frozen=True)
class RunResult:
    """Every measured request (warm-up excluded) and the wall time from the first send to the last answer; from a
    hexgen server, also what its engines did meanwhile."""

    config: BenchConfig
    requests: tuple[RequestResult, ...]
    duration_s: float
    engine: EngineFigures | None = None


def run_benchmark(config: BenchConfig, on_result: OnResult | None = None,
                  transport: httpx.AsyncBaseTransport | None = None) -> RunResult:
    """Run the whole benchmark; `transport` lets tests put a fake server in place of the network."""
    return asyncio.run(_run(config, on_result or (lambda _: None), transport))


async def _run(config: BenchConfig, on_result: OnResult, transport: httpx.AsyncBaseTransport | None) -> RunResult:
    limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
    async with httpx.AsyncClient(base_url=config.base_url, transport=transport, limits=limits) as client:
        await _check_reachable(client, config)
        sent = itertools.count()  # the index of each request sent, which picks its prompt
        for _ in range(config.warmup_requests):
            warm = await send_request(client, config, time.perf_counter(), config.prompt_of(next(sent)))
            if not warm.is_ok:
                raise UserError(f"warm-up request to {config.base_url}{config.endpoint} failed: {warm.error}")
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        before = await engine_totals(client, config.base_url, headers)
        run_start = time.perf_counter()
        if config.concurrency is not None:
            results = await _closed_loop(client, config, run_start, on_result, sent)
        else:
            results = await _open_loop(client, config, run_start, on_result, sent)
        duration_s = time.perf_counter() - run_start
        after = await engine_totals(client, config.base_url, headers) if before is not None else None
    return RunResult(config, tuple(sorted(results, key=lambda r: r.start_s)), duration_s,
                     engine_figures(before, after, duration_s))


async def _check_reachable(client: httpx.AsyncClient, config: BenchConfig) -> None:
    """Fail fast with one line when nothing listens at the URL; any HTTP answer at all counts as reachable."""
    try:
        await client.get("/models", headers={"Authorization": f"Bearer {config.api_key}"} if config.api_key else {},
                         timeout=min(config.timeout_s, 10.0))
    except httpx.HTTPError as err:
        raise UserError(f"{config.base_url}: {describe_exception(err, min(config.timeout_s, 10.0))}; "
                        "is the server running, and is --url its base URL (e.g. http://127.0.0.1:8000/v1)?") from None


async def _closed_loop(client: httpx.AsyncClient, config: BenchConfig, run_start: float,
                       on_result: OnResult, sent: itertools.count) -> list[RequestResult]:
    results: list[RequestResult] = []
    issued = itertools.count()

    def may_send() -> bool:
        if config.num_requests is not None:
            return next(issued) < config.num_requests
        return time.perf_counter() - run_start < config.duration_s

    async def stream() -> None:
        while may_send():
            result = await send_request(client, config, run_start, config.prompt_of(next(sent)))
            results.append(result)
            on_result(result)

    await asyncio.gather(*(stream() for _ in range(config.concurrency)))
    return results


async def _open_loop(client: httpx.AsyncClient, config: BenchConfig, run_start: float,
                     on_result: OnResult, sent: itertools.count) -> list[RequestResult]:
    arrivals = poisson_arrivals_s(config.rate_rps, random.Random(config.seed))
    if config.num_requests is not None:
        schedule_s = list(itertools.islice(arrivals, config.num_requests))
    else:
        schedule_s = list(itertools.takewhile(lambda t: t < config.duration_s, arrivals))

    async def one(prompt: str) -> RequestResult:
        result = await send_request(client, config, run_start, prompt)
        on_result(result)
        return result

    tasks = []
    for arrival_s in schedule_s:
        delay_s = arrival_s - (time.perf_counter() - run_start)
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        tasks.append(asyncio.create_task(one(config.prompt_of(next(sent)))))
    return list(await asyncio.gather(*tasks))
