"""The whole engine in one process (a tiny random Llama, fp32, CPU) under random configurations and request mixes,
each request checked against the same request run alone.

Hypothesis draws a SchedulerConfig (block size, a KV pool small enough to force preemptions, batch and token limits
that cut prompts into chunks, prefix caching, draft tokens, look-ahead steps) and a schedule of requests: prompts
that share prefixes (so the prefix cache hits), greedy or seeded draws with temperature / top-k / top-p,
penalties and logit biases, stop tokens, EOS, log-probabilities, arriving at given steps and some aborted.

The reference for each request is that request alone in a fresh engine with the plainest settings (a pool large
enough for it, no prefix cache, no drafts, no look-ahead, its prompt in one step): the per-sequence path. A
request that is not aborted must emit exactly the reference's tokens and finish reason, and log-probabilities
equal to the reference's to 1e-4; an aborted one a prefix of them and then "abort". A seeded draw depends on
the seed and the token's position only, so this holds for sampled requests as well as greedy ones.

Where batched and lone products differ in their last bits, a greedy token could flip between two logits that are
tied to ~1e-6; the reference's logits say where that is possible (a top-2 gap under TIE_GAP), and the comparison
stops there for that request. The examples are derandomized (the same every run); HEXGEN_FUZZ_EXAMPLES=N draws N
fresh random ones instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hexgen.engine.checkpoint import resolve_model
from hexgen.engine.engine import Engine, build_runner, init_rank
from hexgen.engine.messages import GenerationRequest, SamplingParams, TokenEvent
from hexgen.engine.scheduler import SchedulerConfig
from hexgen.launch.spec import RankSpec, layout_of
from hexgen.plan import single_replica_plan

VOCAB = 256  # token ids drawn: the first 256 of TINY_CONFIGS["gqa"]'s 320
CONTEXT = 96
TIE_GAP = 1e-4
LOGPROB_ATOL = 1e-4
EOS = 7
FRESH_EXAMPLES = int(os.environ.get("HEXGEN_FUZZ_EXAMPLES", "0"))


@dataclass(frozen=True)
class Arrival:
    request: GenerationRequest
    at_step: int
    abort_after_tokens: int | None  # abort once it has this many tokens (None: never)


@dataclass(frozen=True)
class Case:
    config: SchedulerConfig
    arrivals: tuple[Arrival, ...]
    eos: tuple[int, ...]


@dataclass
class Run:
    tokens: list[int]
    finish: str | None
    logprobs: list  # TokenLogprobs or None per token
    logits: list[torch.Tensor]  # per token: the row it was chosen from (alone runs only)


@pytest.fixture(scope="module")
def source(tiny_model_dirs):
    return resolve_model(str(tiny_model_dirs["gqa"]), progress=False)


def new_engine(source, config: SchedulerConfig, eos: tuple[int, ...], record_logits: bool) -> Engine:
    plan = single_replica_plan(source.spec, [1], None)
    spec = RankSpec(source, layout_of(plan.replicas[0], "cpu"), 0, dtype="float32", device="cpu")
    runner = build_runner(spec, init_rank(spec), config)
    runner.record_logits = record_logits
    return Engine.create(runner, config, eos)


def drive(engine: Engine, arrivals: tuple[Arrival, ...], logits: bool = False) -> dict[str, Run]:
    runs = {a.request.request_id: Run([], None, [], []) for a in arrivals}
    pending = sorted(arrivals, key=lambda a: a.at_step)
    step = 0
    while pending or engine.has_work:
        while pending and pending[0].at_step <= step:
            engine.add(pending.pop(0).request)
        events: list[TokenEvent] = engine.step()
        sampled = [e for e in events if e.token_id is not None]
        for row, e in enumerate(sampled):
            run = runs[e.request_id]
            run.tokens.append(e.token_id)
            run.logprobs.append(e.logprobs)
            if logits:
                run.logits.append(engine.runner.last_logits[row].clone())
        for e in events:
            if e.finish_reason is not None:
                runs[e.request_id].finish = e.finish_reason
        for a in arrivals:
            run = runs[a.request.request_id]
            if a.abort_after_tokens is not None and run.finish is None and len(run.tokens) >= a.abort_after_tokens:
                engine.abort(a.request.request_id)
        step += 1
        assert step < 5000, "the engine does not finish"
    return runs


ALONE: dict[tuple, Run] = {}


def alone(source, request: GenerationRequest, eos: tuple[int, ...]) -> Run:
    key = (request.prompt_token_ids, request.params, eos)
    if key not in ALONE:
        config = SchedulerConfig(max_context=CONTEXT, max_running_seqs=1, max_step_tokens=CONTEXT,
                                 num_kv_blocks=CONTEXT // SchedulerConfig().block_size, overlap_steps=False)
        engine = new_engine(source, config, eos, record_logits=True)
        ALONE[key] = drive(engine, (Arrival(request, 0, None),), logits=True)[request.request_id]
    return ALONE[key]


@st.composite
def cases(draw) -> Case:
    block_size = draw(st.sampled_from([1, 2, 4, 16]))
    n = draw(st.integers(1, 7))
    stems = [[draw(st.integers(0, VOCAB - 1)) for _ in range(draw(st.integers(1, 24)))] for _ in range(2)]
    eos = (EOS,) if draw(st.booleans()) else ()
    arrivals, longest = [], 1
    for i in range(n):
        stem = draw(st.sampled_from(stems))[: draw(st.integers(0, 24))]
        tail = [draw(st.integers(0, VOCAB - 1)) for _ in range(draw(st.integers(0 if stem else 1, 12)))]
        prompt = tuple(stem + tail)
        kind = draw(st.sampled_from(["greedy", "sampled", "penalized"]))
        params = dict(max_new_tokens=draw(st.integers(1, 16)), ignore_eos=draw(st.booleans()))
        if kind == "sampled":
            params.update(temperature=draw(st.sampled_from([0.5, 1.0, 1.7])), seed=draw(st.integers(0, 2**40)),
                          top_k=draw(st.sampled_from([0, 1, 5, 50])), top_p=draw(st.sampled_from([1.0, 0.9, 0.3])))
        if kind == "penalized":
            params.update(frequency_penalty=draw(st.sampled_from([0.0, 0.8])),
                          presence_penalty=draw(st.sampled_from([-0.5, 0.0, 1.2])),
                          logit_bias=tuple(sorted({draw(st.integers(0, VOCAB - 1)): 3.0 for _ in range(2)}.items())))
        if draw(st.booleans()):
            params["stop_token_ids"] = (draw(st.integers(0, VOCAB - 1)),)
        if draw(st.integers(0, 3)) == 0:
            params["logprobs"] = draw(st.integers(0, 3))
        request = GenerationRequest(f"r{i}", prompt, SamplingParams(**params))
        longest = max(longest, len(prompt) + params["max_new_tokens"])
        abort = draw(st.integers(0, 6)) if draw(st.integers(0, 5)) == 0 else None
        arrivals.append(Arrival(request, draw(st.integers(0, 6)), abort))
    max_running_seqs = draw(st.integers(1, 6))
    blocks_needed = max(-(-longest // block_size), max_running_seqs)  # the engine refuses fewer than one per seq
    config = SchedulerConfig(
        max_running_seqs=max_running_seqs,
        max_step_tokens=draw(st.sampled_from([1, 3, 8, 64])),
        max_context=CONTEXT,
        block_size=block_size,
        num_kv_blocks=draw(st.integers(blocks_needed, blocks_needed * 2)),  # often too few for all: preemption
        prefix_caching=draw(st.booleans()),
        overlap_steps=draw(st.booleans()),
        speculative_tokens=draw(st.sampled_from([0, 0, 2, 4])),
    )
    return Case(config, tuple(arrivals), eos)


def first_tie(run: Run, upto: int) -> int:
    """The first of the reference's first `upto` greedy tokens chosen between two logits closer than TIE_GAP."""
    for i, row in enumerate(run.logits[:upto]):
        top2 = row.float().topk(2).values
        if top2[0] - top2[1] < TIE_GAP:
            return i
    return upto


def check(case: Case, runs: dict[str, Run], source) -> None:
    for arrival in case.arrivals:
        request, got = arrival.request, runs[arrival.request.request_id]
        want = alone(source, request, case.eos)
        n = len(want.tokens)
        if request.params.temperature == 0:
            n = first_tie(want, n)
            if n < len(want.tokens):
                event("a greedy token chosen between near-tied logits")
        if got.finish == "abort":
            assert arrival.abort_after_tokens is not None, f"{request.request_id} aborted unasked"
            assert len(got.tokens) <= len(want.tokens)
        elif n == len(want.tokens):
            assert got.finish == want.finish, f"{request.request_id}: finish {got.finish}, alone {want.finish}"
            assert len(got.tokens) == len(want.tokens), f"{request.request_id}: {got.tokens} alone {want.tokens}"
        m = min(n, len(got.tokens))
        assert got.tokens[:m] == want.tokens[:m], f"{request.request_id}: {got.tokens} alone {want.tokens}"
        for i in range(m):
            mine, theirs = got.logprobs[i], want.logprobs[i]
            assert (mine is None) == (theirs is None)
            if mine is not None:
                assert abs(mine.logprob - theirs.logprob) <= LOGPROB_ATOL
                assert [t for t, _ in mine.top] == [t for t, _ in theirs.top] or n < len(want.tokens)
                for (_, a), (_, b) in zip(mine.top, theirs.top, strict=True):
                    assert abs(a - b) <= LOGPROB_ATOL


@settings(max_examples=FRESH_EXAMPLES or 40, deadline=None, derandomize=not FRESH_EXAMPLES, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases())
def test_each_request_of_a_random_mix_equals_the_request_alone(case, source):
    for feature, on in (("pool of 1-2x the longest request", True),
                        ("prefix cache", case.config.prefix_caching), ("drafts", case.config.speculative_tokens),
                        ("look-ahead", case.config.overlap_steps)):
        if on:
            event(feature)
    engine = new_engine(source, case.config, case.eos, record_logits=False)
    runs = drive(engine, case.arrivals)
    check(case, runs, source)
    scheduler = engine.scheduler
    if scheduler.num_preemptions:
        event("preempted")
    if scheduler.num_prefix_hit_tokens:
        event("prefix cache hit")
    assert not scheduler.running and not scheduler.waiting
