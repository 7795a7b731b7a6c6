"""The scheduler alone (no model, no torch) under random configurations and request schedules, checked against brute
force.

Hypothesis draws a SchedulerConfig (block size, a KV pool small enough to force preemptions, batch and token limits,
prefix caching, draft tokens, context), how the driver keeps steps in flight (one at a time, a look-ahead step as on
one GPU, or two or three disjoint micro-batches as in a pipeline; as Engine.step does), and a schedule of requests
(prompts sharing prefixes, max_new_tokens, stop tokens, EOS or ignore_eos, penalties, prompt log-probabilities)
arriving and aborted at given steps. A fake device runs each plan in launch order over a fake KV pool whose slots
hold (position, token, hash of every token up to it): it fills fed-back tokens from the previous plan's samples and
samples each drawn position with a fake model whose next token is a function of the last one to three tokens (so
sequences fall into loops, and n-gram drafts sometimes hit and sometimes miss).

Every request's expected tokens and finish reason come from running the fake model on that request alone (greedy,
cut at a stop token, EOS, max_new_tokens or the context). Checked:
- a request not aborted emits exactly those tokens and that finish reason, then nothing; an aborted one a strict
  prefix of them, then one "abort" event; a request the scheduler cannot hold is refused at add(), and only then;
  prompt log-probabilities score each prompt token once, in order, on the first token's event;
- every step reads KV slots holding exactly its sequence's tokens (brute force), computes its known tokens as they
  are, and writes only blocks its sequence holds alone and that no cached prefix names;
- after every schedule and update: each block is free, cached (registered, held by nobody) or held, its reference
  count is the number of sequences holding it, a block held by several sequences is a registered prefix block at
  the same index in each, and a registered block's slots hold the tokens of its key;
- every plan stays within the token budget and the batch limit, and the scheduler within max_running_seqs;
- when the schedule has run out: nothing running, waiting or in flight, and every block free or only cached.

The same examples every run (derandomized, no example database); HEXGEN_FUZZ_EXAMPLES=N draws N fresh random ones
instead, for a longer search by hand.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from dataclasses import dataclass, field, fields

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from hexgen.engine.messages import GenerationRequest, SamplingParams, StepPlan, TokenEvent, TokenLogprobs
from hexgen.engine.scheduler import FED_BACK, Scheduler, SchedulerConfig

EXAMPLES = os.environ.get("HEXGEN_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(EXAMPLES or 400), derandomize=EXAMPLES is None, database=None, deadline=None)
EOS = 0
MAX_STEPS = 5000  # far more than any drawn schedule needs: a scheduler that stops making progress fails


@dataclass(frozen=True)
class FakeModel:
    """A deterministic next token from the last `memory` tokens only: sequences fall into loops that n-gram drafts
    predict; with a memory of three, a draft after a two-token match can still be wrong."""

    vocab: int
    memory: int
    salt: int

    def next_token(self, tokens: list[int]) -> int:
        x = self.salt
        for token in tokens[-self.memory:]:
            x = (x * 1_000_003 + token + 1) % (1 << 31)
        return ((x * 2_654_435_761) >> 12) % self.vocab


@dataclass(frozen=True)
class Case:
    config: SchedulerConfig
    eos_token_ids: tuple[int, ...]
    model: FakeModel
    depth: int  # steps the driver keeps in flight
    lookahead: bool  # the second one looks ahead of the first (one GPU, overlap_steps)
    micro_batches: int  # disjoint micro-batches (a pipeline): Scheduler.micro_batch_limit
    arrivals: list[tuple[int, GenerationRequest]]  # (step, request), by step
    aborts: list[tuple[int, str]]  # (step, request id), by step

    def __repr__(self) -> str:  # a failing example as short as it can be read: fields left at their defaults go
        requests = ", ".join(f"(step {step}, {r.request_id!r}, prompt={r.prompt_token_ids}, {brief(r.params)})"
                             for step, r in self.arrivals)
        return (f"Case({brief(self.config)}, eos={self.eos_token_ids}, {self.model}, depth={self.depth}, "
                f"lookahead={self.lookahead}, micro_batches={self.micro_batches}, requests=[{requests}], "
                f"aborts={self.aborts})")

    def _repr_pretty_(self, printer, cycle) -> None:  # Hypothesis prints a failing example with this
        printer.text(repr(self))


def brief(settings_object) -> str:
    """A frozen dataclass's repr without the fields left at their defaults."""
    changed = (f"{f.name}={getattr(settings_object, f.name)!r}" for f in fields(settings_object)
               if getattr(settings_object, f.name) != f.default)
    return f"{type(settings_object).__name__}({', '.join(changed)})"


@dataclass
class Expected:
    """A request run alone: its full token stream (prompt + outputs), the hash chain a KV slot holds at each
    position, its outputs and finish reason."""

    prompt_len: int
    tokens: list[int]
    outputs: list[int]
    reason: str
    chains: list[int] = field(default_factory=list)

    def slot(self, position: int) -> tuple[int, int, int]:
        return position, self.tokens[position], self.chains[position]


def run_alone(request: GenerationRequest, case: Case) -> Expected:
    """Greedy continuation of the request's prompt under the fake model, cut where the scheduler must end it."""
    params, tokens, outputs = request.params, list(request.prompt_token_ids), []
    while True:
        token = case.model.next_token(tokens)
        tokens.append(token)
        outputs.append(token)
        if token in params.stop_token_ids or (not params.ignore_eos and token in case.eos_token_ids):
            reason = "stop"
            break
        if len(outputs) >= params.max_new_tokens or len(tokens) >= case.config.max_context:
            reason = "length"
            break
    expected = Expected(len(request.prompt_token_ids), tokens, outputs, reason)
    chain = 0
    for token in tokens:
        chain = hash((chain, token))
        expected.chains.append(chain)
    return expected


def is_refused(request: GenerationRequest, config: SchedulerConfig) -> bool:
    """Whether add() must refuse the request: no prompt, no room for a new token, or more tokens than the pool."""
    prompt = len(request.prompt_token_ids)
    wanted = min(prompt + request.params.max_new_tokens, config.max_context)
    return prompt == 0 or prompt + 1 > config.max_context or wanted > config.num_kv_blocks * config.block_size


class FakeDevice:
    """Runs plans in launch order over a fake KV pool, checking what each step reads against brute force."""

    def __init__(self, case: Case):
        self.case = case
        self.block_size = case.config.block_size
        self.pool: list[list[tuple[int, int, int] | None]] = [
            [None] * self.block_size for _ in range(case.config.num_kv_blocks)]
        self.previous: list[int] = []  # the tokens the previous plan sampled

    def slot(self, table: list[int], position: int) -> tuple[int, int, int] | None:
        return self.pool[table[position // self.block_size]][position % self.block_size]

    def run(self, plan: StepPlan, rows: list[Expected]) -> tuple[list[int], list[list[TokenLogprobs]]]:
        """The plan's sampled tokens and, per plan.scored entry, the prompt scores (each encodes its position)."""
        tokens = list(plan.token_ids)
        for index, row in plan.fed_back:
            assert tokens[index] == FED_BACK
            tokens[index] = self.previous[row]
        assert FED_BACK not in tokens
        sampled: list[int] = []
        sampling = iter(plan.sampling)
        offsets = plan.token_starts()
        for r, expected in enumerate(rows):
            start, n, table, drafts = plan.starts[r], plan.lengths[r], plan.block_tables[r], plan.drafts_of(r)
            known = start + n - drafts  # positions before this hold the sequence's known tokens
            assert 0 <= drafts < n and known <= len(expected.tokens), f"row {r} computes past its sequence's end"
            for p in range(start):  # attention reads every earlier position
                assert self.slot(table, p) == expected.slot(p), f"row {r} reads a wrong KV slot at position {p}"
            chain = self.slot(table, start - 1)[2] if start else 0
            for i in range(n):
                p, token = start + i, tokens[offsets[r] + i]
                if p < known:
                    assert token == expected.tokens[p], f"row {r} computes a wrong token at position {p}"
                chain = hash((chain, token))
                self.pool[table[p // self.block_size]][p % self.block_size] = (p, token, chain)
            if plan.sample[r]:
                context = [self.slot(table, p)[1] for p in range(start + n)]
                for p in range(known - 1, start + n):  # after the last known token, then after each draft
                    row = next(sampling, None)
                    assert row is not None and row.position == p + 1, f"row {r}: no sample row for position {p + 1}"
                    sampled.append(self.case.model.next_token(context[: p + 1]))
        assert next(sampling, None) is None
        self.previous = sampled
        return sampled, [self.score(plan, tokens, rows, scored) for scored in plan.scored]

    def score(self, plan: StepPlan, tokens: list[int], rows: list[Expected], scored) -> list[TokenLogprobs]:
        start, offset = plan.starts[scored.row], plan.token_starts()[scored.row]
        expected = rows[scored.row]
        scores = []
        for k, target in enumerate(scored.targets):
            p = start + scored.first + k + 1  # the prompt position scored, by the token before it
            assert scored.first + k < plan.lengths[scored.row] and p < expected.prompt_len
            assert tokens[offset + scored.first + k] == expected.tokens[p - 1] and target == expected.tokens[p]
            scores.append(TokenLogprobs(-float(p), ((target, 0.0),)))
        return scores


def expected_prompt_scores(expected: Expected) -> tuple[TokenLogprobs, ...]:
    return tuple(TokenLogprobs(-float(p), ((expected.tokens[p], 0.0),)) for p in range(1, expected.prompt_len))


# ---------------------------------------------------------------- invariants

def check_plan(scheduler: Scheduler, plan: StepPlan, limit: int | None, lookahead: bool) -> None:
    """Limits and shape of one plan; every block it writes is held by its sequence alone and names no prefix."""
    config, blocks = scheduler.config, scheduler.blocks
    assert 1 <= plan.num_seqs <= (limit or config.max_running_seqs) and len(set(plan.seq_ids)) == plan.num_seqs
    assert plan.num_tokens == sum(plan.lengths) <= config.max_step_tokens
    assert len(scheduler.running) <= config.max_running_seqs
    assert plan.drafts == [] or len(plan.drafts) == plan.num_seqs
    assert all(d <= config.speculative_tokens for d in plan.drafts)
    assert all(plan.sample[r] or not plan.drafts_of(r) for r in range(plan.num_seqs))
    assert lookahead or not plan.fed_back
    for r, (start, n, table) in enumerate(zip(plan.starts, plan.lengths, plan.block_tables, strict=True)):
        assert table == scheduler.running[plan.seq_ids[r]].block_table
        assert len(table) * config.block_size >= start + n
        for b in range(start // config.block_size, (start + n - 1) // config.block_size + 1):
            assert blocks._refs[table[b]] == 1 and table[b] not in blocks._key_of, f"row {r} writes a shared block"


def check_blocks(scheduler: Scheduler, device: FakeDevice) -> None:
    """Every block free, cached or held, with reference counts that match the running sequences' tables; every
    cached prefix block holding the tokens of its key, at the same index in each table that holds it."""
    blocks = scheduler.blocks
    check_cached_blocks(scheduler, device)
    holders: Counter[int] = Counter()
    for seq in scheduler.running.values():
        assert len(set(seq.block_table)) == len(seq.block_table)
        holders.update(seq.block_table)
        for index, block in enumerate(seq.block_table):
            if block in blocks._key_of:
                assert device.pool[block][0][0] == index * blocks.block_size, "a prefix block at another index"
    assert all(not seq.block_table for seq in scheduler.waiting)
    free, cached = set(blocks._free), set(blocks._evictable)
    assert len(free) == len(blocks._free) and not free & cached
    assert cached == {b for b in blocks._key_of if not holders[b]}
    assert len(free) + len(cached) + len(holders) == blocks.num_blocks
    for block in range(blocks.num_blocks):
        assert blocks._refs[block] == holders[block], f"block {block}: refs {blocks._refs[block]} != holders"
        assert holders[block] <= 1 or block in blocks._key_of, f"block {block} shared but not a cached prefix"


def check_cached_blocks(scheduler: Scheduler, device: FakeDevice) -> None:
    blocks = scheduler.blocks
    assert {b: k for k, b in blocks._block_of.items()} == blocks._key_of
    for block, (parent, key_tokens) in blocks._key_of.items():
        slots = device.pool[block]
        assert None not in slots and tuple(s[1] for s in slots) == key_tokens, f"block {block} differs from its key"
        first = slots[0][0]
        assert [s[0] for s in slots] == list(range(first, first + blocks.block_size))
        assert first % blocks.block_size == 0 and (first == 0) == (parent == -1)


def check_idle(scheduler: Scheduler) -> None:
    blocks = scheduler.blocks
    assert not scheduler.has_work and not scheduler.running and not scheduler.waiting
    assert blocks.num_used == 0 and not any(blocks._refs)
    assert len(blocks._free) + len(blocks._evictable) == blocks.num_blocks
    assert blocks.num_cached == len(blocks._key_of)


# ---------------------------------------------------------------- the driver

@dataclass
class Outcome:
    tokens: dict[str, list[int]] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    prompt_scores: dict[str, tuple[TokenLogprobs, ...] | None] = field(default_factory=dict)
    aborted: set[str] = field(default_factory=set)  # aborted before they finished
    refused: set[str] = field(default_factory=set)

    def record(self, events: list[TokenEvent]) -> None:
        for e in events:
            assert e.request_id in self.tokens and e.request_id not in self.reasons, f"stray event {e}"
            if e.token_id is None:
                assert e.finish_reason == "abort" and e.request_id in self.aborted
            else:
                if not self.tokens[e.request_id]:
                    self.prompt_scores[e.request_id] = e.prompt_logprobs
                else:
                    assert e.prompt_logprobs is None
                self.tokens[e.request_id].append(e.token_id)
            if e.finish_reason is not None:
                self.reasons[e.request_id] = e.finish_reason


def arrive(scheduler: Scheduler, outcome: Outcome, request: GenerationRequest) -> None:
    if is_refused(request, scheduler.config):
        with pytest.raises(ValueError):
            scheduler.add(request)
        outcome.refused.add(request.request_id)
    else:
        scheduler.add(request)
        outcome.tokens[request.request_id] = []


def drive(case: Case, expected: dict[str, Expected]) -> tuple[Outcome, Scheduler]:
    """Engine.step's loop over the fake device, with the case's arrivals and aborts between steps."""
    scheduler = Scheduler(case.config, case.eos_token_ids)
    device, outcome = FakeDevice(case), Outcome()
    arrivals, aborts, in_flight = deque(case.arrivals), deque(case.aborts), deque()
    step = 0
    while arrivals or aborts or scheduler.has_work or in_flight:
        assert step < MAX_STEPS, "no progress"
        while arrivals and arrivals[0][0] <= step:
            arrive(scheduler, outcome, arrivals.popleft()[1])
        while aborts and aborts[0][0] <= step:
            rid = aborts.popleft()[1]
            if rid in outcome.tokens and rid not in outcome.reasons:
                outcome.aborted.add(rid)
            scheduler.abort(rid)
        while len(in_flight) < case.depth:
            limit = scheduler.micro_batch_limit(case.micro_batches)
            lookahead = case.lookahead and bool(in_flight)
            plan = scheduler.schedule(limit, lookahead=lookahead)
            if plan is None:
                break
            check_plan(scheduler, plan, limit, lookahead)
            rows = [expected[scheduler.running[s].request.request_id] for s in plan.seq_ids]
            in_flight.append((plan, device.run(plan, rows)))
            check_blocks(scheduler, device)
        if in_flight:
            plan, (sampled, scores) = in_flight.popleft()
            outcome.record(scheduler.update(plan, sampled, None, scores))
        else:
            outcome.record(scheduler.update(StepPlan(), []))
        check_blocks(scheduler, device)
        step += 1
    check_idle(scheduler)
    return outcome, scheduler


# ---------------------------------------------------------------- the cases

@st.composite
def cases(draw) -> Case:
    # as Engine: a look-ahead step on one device (never with drafts), or `micro_batches` steps of disjoint sequences
    mode = draw(st.sampled_from(["serial", "overlap", "pipeline"]))
    micro_batches = draw(st.integers(2, 3)) if mode == "pipeline" else 1
    block_size = draw(st.sampled_from([1, 2, 4, 8]))
    max_context = draw(st.integers(4, 40))
    context_blocks = -(-max_context // block_size)
    # mostly a pool that holds one sequence's whole context and little more (preemptions), at times less (refusals)
    num_kv_blocks = max(1, context_blocks + draw(st.sampled_from([-1, 0, 0, 0, 1, context_blocks])))
    config = SchedulerConfig(
        max_running_seqs=draw(st.sampled_from([1, 2, 3, 4, 6])), max_step_tokens=draw(st.integers(1, 24)),
        max_context=max_context, block_size=block_size, num_kv_blocks=num_kv_blocks, prefix_caching=draw(st.booleans()),
        speculative_tokens=0 if mode == "overlap" else draw(st.sampled_from([0, 1, 2, 4])),
        speculative_max_seqs=draw(st.integers(1, 4)))
    model = FakeModel(draw(st.integers(5, 12)), draw(st.integers(1, 3)), draw(st.integers(0, 1000)))
    tokens = st.integers(0, model.vocab - 1)
    # lengths from fixed choices: Hypothesis would draw mostly short lists, and sequences that short rarely preempt
    shared_len = draw(st.sampled_from([0, 4, 8, 12, 16]))
    shared = draw(st.lists(tokens, min_size=shared_len, max_size=shared_len))
    arrivals = []
    for i in range(draw(st.sampled_from([1, 2, 3, 4, 5, 6, 8]))):
        head = shared[: draw(st.integers(0, len(shared)))]  # prompts start with parts of it: common prefixes
        own_len = draw(st.sampled_from([0, 1, 2, 4, 8])) or int(not head)
        prompt = (head + draw(st.lists(tokens, min_size=own_len, max_size=own_len)))[: max_context - 1]
        params = SamplingParams(
            max_new_tokens=draw(st.sampled_from([1, 2, 3, 8, 16, 24, 32])),
            ignore_eos=draw(st.sampled_from([True, True, False])),
            stop_token_ids=draw(st.sampled_from([(), (), (), (), (model.vocab - 1,), (1, 2)])),
            presence_penalty=draw(st.sampled_from([0.0, 0.0, 0.0, 0.5])),
            prompt_logprobs=draw(st.sampled_from([None, None, None, 0])))
        arrivals.append((draw(st.sampled_from([0, 0, 1, 2, 4, 8])), GenerationRequest(f"r{i}", tuple(prompt), params)))
    aborts = draw(st.lists(st.tuples(st.integers(0, 30), st.integers(0, len(arrivals) - 1)), max_size=2))
    return Case(config, draw(st.sampled_from([(), (EOS,)])), model, 2 if mode == "overlap" else micro_batches,
                mode == "overlap", micro_batches, sorted(arrivals, key=lambda a: a[0]),
                sorted(((step, f"r{i}") for step, i in aborts), key=lambda a: a[0]))


@FUZZ
@given(case=cases())
def test_scheduler_gives_each_request_its_tokens_alone_and_keeps_its_blocks_consistent(case: Case):
    expected = {request.request_id: run_alone(request, case) for _, request in case.arrivals}
    outcome, scheduler = drive(case, expected)
    for _, request in case.arrivals:
        rid, want = request.request_id, expected[request.request_id]
        if rid in outcome.refused:
            assert rid not in outcome.tokens
            continue
        if rid in outcome.aborted:
            assert outcome.reasons[rid] == "abort"
            assert outcome.tokens[rid] == want.outputs[: len(outcome.tokens[rid])]
            assert len(outcome.tokens[rid]) < len(want.outputs)
        else:
            assert (outcome.tokens[rid], outcome.reasons[rid]) == (want.outputs, want.reason), rid
        if request.params.prompt_logprobs is not None and outcome.tokens[rid]:
            assert outcome.prompt_scores[rid] == expected_prompt_scores(want)
    event(f"preempted: {scheduler.num_preemptions > 0}")
    event(f"prefix hits: {scheduler.num_prefix_hit_tokens > 0}")
    event(f"drafts accepted: {scheduler.num_accepted > 0}, rejected: {scheduler.num_accepted < scheduler.num_drafted}")
    event(f"aborted before finishing: {bool(outcome.aborted)}")
