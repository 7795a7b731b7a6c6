"""One-process vs multi-process replicas through the public API: same greedy tokens, batched or alone."""

from __future__ import annotations

import pytest
from engine_helpers import random_prompts

from hexgen.engine.checkpoint import resolve_model
from hexgen.engine.generation import run_requests
from hexgen.engine.messages import GenerationRequest, SamplingParams
from hexgen.engine.replica import open_local_replica
from hexgen.engine.scheduler import SchedulerConfig
from hexgen.plan import single_replica_plan

MAX_NEW = 6
GREEDY = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
SAMPLED = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, temperature=1.0, top_p=0.9, seed=11)


def tokens_batched_and_alone(source, tp, layers, prompts):
    """Token ids of all prompts in one call, of each prompt alone, and of a seeded sampled request with
    and without neighbours -- all on one started replica."""
    plan = single_replica_plan(source.spec, tp, layers).replicas[0]
    replica = open_local_replica(source, plan, "float32", "cpu", SchedulerConfig(max_context=256), ())
    try:
        replica.start()
        batched = run_requests(replica, [GenerationRequest(f"b{i}", tuple(p), GREEDY) for i, p in enumerate(prompts)])
        alone = [run_requests(replica, [GenerationRequest(f"a{i}", tuple(p), GREEDY)])[0]
                 for i, p in enumerate(prompts)]
        sampled_alone = run_requests(replica, [GenerationRequest("s", tuple(prompts[0]), SAMPLED)])[0]
        sampled_mixed = run_requests(replica, [GenerationRequest("s2", tuple(prompts[0]), SAMPLED),
                                               *(GenerationRequest(f"n{i}", tuple(p), GREEDY)
                                                 for i, p in enumerate(prompts[1:]))])[0]
    finally:
        replica.close()
    return ([c.token_ids for c in batched], [c.token_ids for c in alone],
            sampled_alone.token_ids, sampled_mixed.token_ids)


@pytest.fixture(scope="module")
def runs(tiny_model_dirs):
    source = resolve_model(str(tiny_model_dirs["gqa"]), progress=False)
    prompts = random_prompts(source.spec.vocab_size, [9, 2, 15, 5], seed=3)
    return {"in_process": tokens_batched_and_alone(source, [1], None, prompts),
            "tp2_1": tokens_batched_and_alone(source, [2, 1], [3, 3], prompts)}


@pytest.mark.parametrize("name", ["in_process", "tp2_1"])
def test_batched_equals_alone(runs, name):
    batched, alone, _, _ = runs[name]
    assert batched == alone
    assert all(len(t) == MAX_NEW for t in batched)
    assert len({tuple(t) for t in batched}) == len(batched)  # different prompts, different continuations


def test_multi_process_equals_in_process(runs):
    assert runs["tp2_1"][0] == runs["in_process"][0]


@pytest.mark.parametrize("name", ["in_process", "tp2_1"])
def test_seeded_sampling_ignores_neighbours(runs, name):
    _, _, sampled_alone, sampled_mixed = runs[name]
    assert sampled_alone == sampled_mixed
