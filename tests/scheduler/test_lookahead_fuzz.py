"""The scheduler's look-ahead against its plain schedule, on many random workloads, with a stand-in model that
reads its whole history back through the plans' block tables from a paged store: a token written to a wrong slot,
a block reused too early, a wrong position or a fed-back token taken from the wrong row changes what it samples.
Overlapped and plain runs must give every request the same tokens and finish reason, and free every block."""

from __future__ import annotations

import random
from collections import deque

import pytest

from hexgen.engine.messages import GenerationRequest, SamplingParams, StepPlan, TokenEvent
from hexgen.engine.scheduler import FED_BACK, Scheduler, SchedulerConfig

VOCAB = 40


class PagedStandIn:
    """Runs a plan like the device: writes each token into its KV slot, then samples, for each sampling sequence,
    a hash of the tokens read back from the slots of positions 0..last. Plans run in launch order (stream order)."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.slots: dict[int, int] = {}

    def slot(self, table: list[int], position: int) -> int:
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def run(self, plan: StepPlan, previous_sampled: list[int] | None) -> list[int]:
        tokens = list(plan.token_ids)
        for index, row in plan.fed_back:
            assert tokens[index] == FED_BACK and previous_sampled is not None
            tokens[index] = previous_sampled[row]
        assert FED_BACK not in tokens
        sampled, offset = [], 0
        for start, n, table, samples in zip(plan.starts, plan.lengths, plan.block_tables, plan.sample, strict=True):
            for j in range(n):
                self.slots[self.slot(table, start + j)] = tokens[offset + j]
            offset += n
            if samples:
                history = [self.slots[self.slot(table, p)] for p in range(start + n)]
                sampled.append(sum((i + 7) * t * 2654435761 for i, t in enumerate(history)) % 1000003 % VOCAB)
        return sampled


def workload(rng: random.Random) -> tuple[SchedulerConfig, list[GenerationRequest], dict[str, int]]:
    block_size = rng.choice([1, 2, 4])
    config = SchedulerConfig(
        max_running_seqs=rng.randint(1, 6), max_step_tokens=rng.choice([3, 8, 64]), max_context=48,
        block_size=block_size, num_kv_blocks=rng.randint(48 // block_size, 160 // block_size),
        prefix_caching=rng.random() < 0.5)
    shared = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 9))]  # a common prefix of some prompts
    requests = []
    for i in range(rng.randint(1, 9)):
        own = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))]
        prompt = (shared if rng.random() < 0.5 else []) + own
        stop = tuple(rng.sample(range(VOCAB), rng.randint(0, 2)))
        requests.append(GenerationRequest(f"r{i}", tuple(prompt), SamplingParams(
            max_new_tokens=rng.randint(1, 20), stop_token_ids=stop, ignore_eos=True)))
    # abort some requests once they have produced this many tokens (0: before their first)
    aborts = {r.request_id: rng.randint(0, 6) for r in requests if rng.random() < 0.2}
    return config, requests, aborts


def run(config: SchedulerConfig, requests: list[GenerationRequest], aborts: dict[str, int], overlap: bool
        ) -> tuple[dict[str, tuple[list[int], str | None]], int]:
    scheduler = Scheduler(config)
    model = PagedStandIn(config.block_size)
    out: dict[str, tuple[list[int], str | None]] = {r.request_id: ([], None) for r in requests}
    late = requests[len(requests) // 2:]  # half arrive once a first token is out (or nothing is left to run)
    for r in requests[: len(requests) // 2] or late[:1]:
        scheduler.add(r)
    pending = [r for r in late if r.request_id not in scheduler._by_request]
    for rid, count in aborts.items():
        if count == 0 and rid in scheduler._by_request:
            scheduler.abort(rid)
    in_flight: deque[tuple[StepPlan, list[int]]] = deque()
    fed = 0

    def take(events: list[TokenEvent]) -> None:
        for event in events:
            tokens, reason = out[event.request_id]
            assert reason is None, f"{event.request_id}: an event after it finished"
            if event.token_id is not None:
                tokens.append(event.token_id)
            out[event.request_id] = (tokens, event.finish_reason)
            if event.finish_reason is None and aborts.get(event.request_id) == len(tokens):
                scheduler.abort(event.request_id)

    for _ in range(5000):
        if not (scheduler.has_work or in_flight or pending):
            break
        if pending and (any(tokens for tokens, _ in out.values()) or not (scheduler.has_work or in_flight)):
            for r in pending:
                scheduler.add(r)
                if aborts.get(r.request_id) == 0:
                    scheduler.abort(r.request_id)
            pending = []
        while len(in_flight) < (2 if overlap else 1):
            plan = scheduler.schedule(lookahead=overlap and bool(in_flight))
            if plan is None:
                break
            fed += len(plan.fed_back)
            in_flight.append((plan, model.run(plan, in_flight[-1][1] if in_flight else None)))
        if in_flight:
            plan, sampled = in_flight.popleft()
            take(scheduler.update(plan, sampled))
        else:
            take(scheduler.update(StepPlan(), []))
    else:
        raise AssertionError("did not finish")
    assert scheduler.blocks.num_used == 0 and not scheduler.running and not scheduler.waiting
    return out, fed


@pytest.mark.parametrize("seed", range(200))
def test_lookahead_gives_the_plain_schedules_tokens(seed):
    config, requests, aborts = workload(random.Random(seed))
    plain, plain_fed = run(config, requests, aborts, overlap=False)
    overlapped, _ = run(config, requests, aborts, overlap=True)
    assert overlapped == plain and plain_fed == 0
    for rid, (_, reason) in plain.items():
        assert reason in ("stop", "length", "abort"), rid


def test_the_fuzz_does_look_ahead_and_stop_early():
    """The workloads reach the cases they are there for: fed-back tokens, stop tokens, aborts, preemption."""
    fed_total, reasons = 0, set()
    for seed in range(200):
        config, requests, aborts = workload(random.Random(seed))
        out, fed = run(config, requests, aborts, overlap=True)
        fed_total += fed
        reasons |= {reason for _, reason in out.values()}
    assert fed_total > 1000 and reasons == {"stop", "length", "abort"}
