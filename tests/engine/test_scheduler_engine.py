"""Continuous-batching scheduler: hand-driven step plans, and chunked prefill through the engine vs HF."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import greedy_requests, hf_greedy, load_hf, random_prompts, run_in_process

from hexgen.engine.checkpoint import resolve_model
from hexgen.engine.messages import GenerationRequest, SamplingParams, StepPlan
from hexgen.engine.scheduler import Scheduler, SchedulerConfig


def request(rid: str, prompt_len: int, **params) -> GenerationRequest:
    return GenerationRequest(rid, tuple(range(10, 10 + prompt_len)), SamplingParams(**params))


def step(scheduler: Scheduler, token: int = 5):
    """One step with a fake model that samples `token` for every sequence that samples."""
    plan = scheduler.schedule()
    if plan is None:
        return None, scheduler.update(StepPlan(), [])
    return plan, scheduler.update(plan, [token] * plan.num_sampled)


def run_to_end(scheduler: Scheduler, token: int = 5) -> dict[str, list]:
    events: dict[str, list] = {}
    while scheduler.has_work:
        _, new = step(scheduler, token)
        for e in new:
            events.setdefault(e.request_id, []).append((e.token_id, e.finish_reason))
    return events


def test_max_new_tokens_counts_tokens():
    scheduler = Scheduler(SchedulerConfig())
    scheduler.add(request("a", 4, max_new_tokens=3))
    assert run_to_end(scheduler)["a"] == [(5, None), (5, None), (5, "length")]


def test_eos_stops_unless_ignored():
    scheduler = Scheduler(SchedulerConfig(), eos_token_ids=(5,))
    scheduler.add(request("a", 4, max_new_tokens=4))
    scheduler.add(request("b", 4, max_new_tokens=4, ignore_eos=True))
    events = run_to_end(scheduler)
    assert events["a"] == [(5, "stop")]
    assert events["b"] == [(5, None)] * 3 + [(5, "length")]


def test_context_limit_gives_length():
    scheduler = Scheduler(SchedulerConfig(max_context=10))
    scheduler.add(request("a", 8, max_new_tokens=100))
    assert run_to_end(scheduler)["a"] == [(5, None), (5, "length")]  # 8 + 2 = 10 tokens
    with pytest.raises(ValueError, match="context of 10"):
        scheduler.add(request("b", 10))


def test_chunked_prefill_plans_hand_computed():
    scheduler = Scheduler(SchedulerConfig(max_step_tokens=4))
    scheduler.add(request("a", 10, max_new_tokens=2))
    plans = [step(scheduler)[0] for _ in range(4)]
    assert [(p.starts, p.lengths, p.sample) for p in plans] == [
        ([0], [4], [False]), ([4], [4], [False]), ([8], [2], [True]), ([10], [1], [True])]
    assert plans[0].token_ids == [10, 11, 12, 13] and plans[3].token_ids == [5]


def test_abort_frees_the_slot_and_slots_are_reused():
    scheduler = Scheduler(SchedulerConfig(max_running_seqs=1))
    scheduler.add(request("a", 3, max_new_tokens=50))
    scheduler.add(request("b", 3, max_new_tokens=1))
    first, _ = step(scheduler)
    assert list(first.joining) == [0] and first.slots == [0]  # b waits: one slot only
    scheduler.abort("a")
    plan, events = step(scheduler)
    assert ("a", None, "abort") in [(e.request_id, e.token_id, e.finish_reason) for e in events]
    assert plan.freed == [0] and list(plan.joining) == [0]  # a's slot released on every rank and reused by b
    assert [(e.request_id, e.finish_reason) for e in events if e.token_id is not None] == [("b", "length")]


def test_abort_of_waiting_request():
    scheduler = Scheduler(SchedulerConfig(max_running_seqs=1))
    scheduler.add(request("a", 3, max_new_tokens=2))
    scheduler.add(request("b", 3, max_new_tokens=2))
    scheduler.abort("b")
    events = run_to_end(scheduler)
    assert events["b"] == [(None, "abort")] and events["a"][-1] == (5, "length")


@pytest.mark.parametrize("max_step_tokens", [3, 5])
def test_chunked_prefill_through_engine_matches_hf(max_step_tokens, tiny_model_dirs):
    directory = tiny_model_dirs["gqa"]
    model = load_hf(directory)
    prompts = random_prompts(model.config.vocab_size, [13, 6, 9], seed=42)
    source = resolve_model(str(directory), progress=False)
    config = SchedulerConfig(max_step_tokens=max_step_tokens, max_context=source.spec.max_context)
    tokens, logits = run_in_process(source, greedy_requests(prompts, 6), config)
    for i, prompt in enumerate(prompts):
        hf_tokens, hf_logits = hf_greedy(model, prompt, 6)
        assert tokens[f"r{i}"] == hf_tokens
        torch.testing.assert_close(logits[f"r{i}"], hf_logits, atol=1e-4, rtol=1e-4)
