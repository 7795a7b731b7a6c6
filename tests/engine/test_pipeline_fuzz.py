"""test_engine_fuzz.py's random configurations and request mixes on a multi-rank replica (spawned gloo ranks, CPU,
fp32): each request checked against the same request run alone in one process.

Every layout runs: two stages, a TP pair and a stage, a stage with a TP pair between two stages, each at depth 0
(a micro-batch per stage in flight, disjoint sequences in each) and 1 (the stages take turns on one), and a TP pair
alone. Per layout hypothesis draws the layers each stage holds and test_engine_fuzz's SchedulerConfig and schedule
of requests (arrivals at given steps, aborts, shared prefixes, greedy and seeded draws, penalties, stop tokens, EOS,
log-probabilities, a pool small enough to preempt, chunked prompts, prefix caching, drafts), with three requests or
more and up to 8 running at once. The driver steps the engine as test_engine_fuzz.drive does
(engine_helpers.drive_arrivals: it runs in a spawned rank); the checks, the lone-request reference and its allowance
for near-tied greedy logits are test_engine_fuzz's own.

Spawning the ranks costs seconds, so each layout has two examples, and a failing one is reported as drawn (not
shrunk). The examples are derandomized (the same every run); HEXGEN_FUZZ_EXAMPLES=N draws N fresh random ones per
layout instead.
"""

from __future__ import annotations

import os
from dataclasses import replace
from itertools import pairwise

import pytest
from engine_helpers import run_layout_schedule
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from test_engine_fuzz import Case, Run, cases, check

from hexgen.engine.checkpoint import resolve_model
from hexgen.engine.messages import TokenLogprobs

NUM_LAYERS = 6  # TINY_CONFIGS["gqa"]
# TP degree per stage and depth: 0 keeps a micro-batch per stage in flight, 1 one in all (the stages take turns)
LAYOUTS = [([1, 1], 0), ([1, 1], 1), ([2, 1], 0), ([2, 1], 1), ([1, 2, 1], 0), ([1, 2, 1], 1), ([2], 0)]
FRESH_EXAMPLES = int(os.environ.get("HEXGEN_FUZZ_EXAMPLES", "0"))


@pytest.fixture(scope="module")
def source(tiny_model_dirs):
    return resolve_model(str(tiny_model_dirs["gqa"]), progress=False)


@st.composite
def layer_splits(draw, num_stages: int) -> list[int]:
    """Layers per stage, each at least one."""
    cuts = sorted(draw(st.sets(st.integers(1, NUM_LAYERS - 1), min_size=num_stages - 1, max_size=num_stages - 1)))
    bounds = [0, *cuts, NUM_LAYERS]
    return [b - a for a, b in pairwise(bounds)]


@st.composite
def pipeline_cases(draw) -> Case:
    """test_engine_fuzz's cases with three requests or more, up to 8 of them running at once (so that the
    micro-batches in flight hold several sequences each) and a pool of 1-2x what the longest needs, as there."""
    case = draw(cases().filter(lambda c: len(c.arrivals) >= 3))
    max_running_seqs = draw(st.integers(2, 8))
    longest = max(len(a.request.prompt_token_ids) + a.request.params.max_new_tokens for a in case.arrivals)
    blocks_needed = max(-(-longest // case.config.block_size), max_running_seqs)
    config = replace(case.config, max_running_seqs=max_running_seqs,
                     num_kv_blocks=draw(st.integers(blocks_needed, blocks_needed * 2)))
    return replace(case, config=config)


def runs_of(steps: list[list[tuple]], case: Case) -> dict[str, Run]:
    """The driver's events as test_engine_fuzz's Runs (no logits: those are the lone runs' only)."""
    runs = {a.request.request_id: Run([], None, [], []) for a in case.arrivals}
    for events in steps:
        for rid, token, finish, logprobs in events:
            run = runs[rid]
            if token is not None:
                run.tokens.append(token)
                run.logprobs.append(None if logprobs is None else TokenLogprobs(*logprobs))
            if finish is not None:
                run.finish = finish
    return runs


@pytest.mark.parametrize(("tp", "depth"), LAYOUTS, ids=[f"tp{'+'.join(map(str, tp))}-depth{d}" for tp, d in LAYOUTS])
@settings(max_examples=FRESH_EXAMPLES or 2, deadline=None, derandomize=not FRESH_EXAMPLES, database=None,
          phases=[Phase.explicit, Phase.generate],  # no shrinking: each try spawns the ranks again
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(case=pipeline_cases(), data=st.data())
def test_each_request_of_a_random_mix_on_a_pipeline_equals_the_request_alone(tp, depth, case, data, source,
                                                                             tiny_model_dirs, tmp_path_factory):
    layers = data.draw(layer_splits(len(tp)), label="layers")
    for feature, on in (("prefix cache", case.config.prefix_caching), ("drafts", case.config.speculative_tokens)):
        if on:
            event(feature)
    arrivals = [(a.request, a.at_step, a.abort_after_tokens) for a in case.arrivals]
    record = run_layout_schedule(tiny_model_dirs["gqa"], tp, layers, depth, case.config, case.eos, arrivals,
                                 tmp_path_factory.mktemp("pipeline-fuzz"))
    check(case, runs_of(record["steps"], case), source)
    if record["preemptions"]:
        event("preempted")
    if record["prefix_hits"]:
        event("prefix cache hit")
    assert record["idle"]
