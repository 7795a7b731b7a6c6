"""Continuous-batching scheduler: hand-driven step plans over a paged KV cache (block tables, admission,
preemption, micro-batches in flight), and chunked prefill / preemption through the engine vs HF."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import greedy_requests, hf_greedy, load_hf, random_prompts, run_in_process

from hexgen.engine.checkpoint import resolve_model
from hexgen.engine.messages import GenerationRequest, SamplingParams, StepPlan
from hexgen.engine.scheduler import Scheduler, SchedulerConfig


def config(**kwargs) -> SchedulerConfig:
    return SchedulerConfig(**{"num_kv_blocks": 1024, **kwargs})


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
    scheduler = Scheduler(config())
    scheduler.add(request("a", 4, max_new_tokens=3))
    assert run_to_end(scheduler)["a"] == [(5, None), (5, None), (5, "length")]


def test_eos_stops_unless_ignored():
    scheduler = Scheduler(config(), eos_token_ids=(5,))
    scheduler.add(request("a", 4, max_new_tokens=4))
    scheduler.add(request("b", 4, max_new_tokens=4, ignore_eos=True))
    events = run_to_end(scheduler)
    assert events["a"] == [(5, "stop")]
    assert events["b"] == [(5, None)] * 3 + [(5, "length")]


def test_context_limit_gives_length():
    scheduler = Scheduler(config(max_context=10))
    scheduler.add(request("a", 8, max_new_tokens=100))
    assert run_to_end(scheduler)["a"] == [(5, None), (5, "length")]  # 8 + 2 = 10 tokens
    with pytest.raises(ValueError, match="context of 10"):
        scheduler.add(request("b", 10))


def test_a_request_longer_than_the_pool_is_refused_not_cut_short():
    # 4 blocks of 4 tokens: the pool holds 16 tokens a sequence though the context allows 100
    scheduler = Scheduler(config(num_kv_blocks=4, block_size=4, max_context=100))
    with pytest.raises(ValueError, match=r"needs 17 tokens \(8 in the prompt and up to 9 new\).* holds 16 tokens"):
        scheduler.add(request("a", 8, max_new_tokens=9))
    with pytest.raises(ValueError, match=r"needs 21 tokens \(20 in the prompt and up to 1 new\).* holds 16 tokens"):
        scheduler.add(request("long prompt", 20, max_new_tokens=1))  # within the context, beyond the pool
    scheduler.add(request("b", 8, max_new_tokens=8))  # 16: fits exactly, and runs to the end
    assert len(run_to_end(scheduler)["b"]) == 8
    # asking past the context is not the pool's fault: the sequence ends by length at the context, as before
    scheduler = Scheduler(config(num_kv_blocks=4, block_size=4, max_context=12))
    scheduler.add(request("c", 8, max_new_tokens=100))
    assert run_to_end(scheduler)["c"] == [(5, None)] * 3 + [(5, "length")]  # 8 + 4 = 12 tokens


def test_chunked_prefill_plans_hand_computed():
    scheduler = Scheduler(config(max_step_tokens=4))
    scheduler.add(request("a", 10, max_new_tokens=2))
    plans = [step(scheduler)[0] for _ in range(4)]
    assert [(p.starts, p.lengths, p.sample) for p in plans] == [
        ([0], [4], [False]), ([4], [4], [False]), ([8], [2], [True]), ([10], [1], [True])]
    assert plans[0].token_ids == [10, 11, 12, 13] and plans[3].token_ids == [5]


def test_abort_frees_the_blocks_and_they_are_reused():
    scheduler = Scheduler(config(max_running_seqs=1, block_size=4))
    scheduler.add(request("a", 6, max_new_tokens=50))
    scheduler.add(request("b", 3, max_new_tokens=1))
    first, _ = step(scheduler)
    assert first.seq_ids == [0] and first.block_tables == [[0, 1]]  # b waits: one sequence at a time
    scheduler.abort("a")
    plan, events = step(scheduler)
    assert ("a", None, "abort") in [(e.request_id, e.token_id, e.finish_reason) for e in events]
    assert plan.seq_ids == [1] and plan.block_tables == [[0]]  # a's blocks came back, lowest id first
    assert [(e.request_id, e.finish_reason) for e in events if e.token_id is not None] == [("b", "length")]
    assert scheduler.blocks.num_used == 0


def test_block_tables_grow_at_block_boundaries():
    scheduler = Scheduler(config(block_size=4))
    scheduler.add(request("a", 4, max_new_tokens=6))
    plans = [step(scheduler)[0] for _ in range(6)]
    # 4 prompt tokens fill block 0; the 5th token (first decode input) opens block 1, the 9th block 2.
    assert [(p.starts[0], p.block_tables[0]) for p in plans] == [
        (0, [0]), (4, [0, 1]), (5, [0, 1]), (6, [0, 1]), (7, [0, 1]), (8, [0, 1, 2])]
    assert not scheduler.has_work and scheduler.blocks.num_free == 1024


def test_admission_waits_for_free_blocks():
    # 6 blocks of 4 tokens; each 8-token prompt needs 2 blocks, plus one block kept free per running sequence.
    scheduler = Scheduler(config(block_size=4, num_kv_blocks=6))
    for rid in "abc":
        scheduler.add(request(rid, 8, max_new_tokens=1))
    plan, _ = step(scheduler)
    assert plan.seq_ids == [0, 1]  # c would leave fewer free blocks than running sequences
    plan, _ = step(scheduler)
    assert plan.seq_ids == [2]


def test_preemption_when_blocks_run_out_and_resumption():
    # 5 blocks of 2 tokens; 4-token prompts take 2 blocks each, so after admitting both one block is free.
    scheduler = Scheduler(config(block_size=2, num_kv_blocks=5))
    scheduler.add(request("a", 4, max_new_tokens=5))
    scheduler.add(request("b", 4, max_new_tokens=3))
    plans, preemptions = [], []
    for i in range(4):
        plans.append(step(scheduler, token=7 + i)[0])
        preemptions.append(scheduler.num_preemptions)
    assert preemptions == [0, 0, 0, 1]
    assert plans[0].seq_ids == [0, 1] and plans[0].block_tables == [[0, 1], [2, 3]]
    # a (older) takes the free block for its 5th token; b has none left and waits, holding its blocks
    assert plans[1].seq_ids == [0] and plans[1].block_tables == [[0, 1, 4]]
    assert plans[2].seq_ids == [0]
    # a's 7th token needs a 4th block: b, the newest, is preempted and its blocks go to a
    assert plans[3].seq_ids == [0] and plans[3].block_tables == [[0, 1, 4, 2]]
    assert [seq.request.request_id for seq in scheduler.waiting] == ["b"]
    resumed = [p for p in iter(lambda: step(scheduler, token=20)[0], None) if 1 in p.seq_ids]
    # b is recomputed from its prompt and the token it had produced (7), then samples its 6th token
    assert resumed[0].starts == [0] and resumed[0].token_ids == [10, 11, 12, 13, 7]
    assert resumed[0].sampling[0].position == 5
    assert scheduler.blocks.num_used == 0


def test_micro_batches_in_flight_are_disjoint():
    scheduler = Scheduler(config())
    for rid in "abcde":
        scheduler.add(request(rid, 2, max_new_tokens=4))
    first = scheduler.schedule(max_seqs=3)
    second = scheduler.schedule(max_seqs=3)
    assert first.seq_ids == [0, 1, 2] and second.seq_ids == [3, 4]
    assert scheduler.schedule(max_seqs=3) is None  # everything is in flight
    scheduler.update(first, [5, 5, 5])
    third = scheduler.schedule(max_seqs=3)
    assert third.seq_ids == [0, 1, 2] and third.starts == [2, 2, 2]
    scheduler.abort("d")  # in flight: its blocks stay until its step comes back
    used = scheduler.blocks.num_used
    scheduler.update(second, [5, 5])
    assert scheduler.blocks.num_used == used - 1 and 3 not in scheduler.running


def test_micro_batch_limit_splits_active_sequences_over_stages():
    scheduler = Scheduler(config(max_running_seqs=8))
    for i in range(11):
        scheduler.add(request(f"r{i}", 2))
    # 11 active, capped at the batch limit 8: 8 / 3 stages -> 3 per micro-batch; one stage: no limit
    assert [scheduler.micro_batch_limit(stages) for stages in (3, 2, 1)] == [3, 4, None]
    assert Scheduler(config()).micro_batch_limit(4) == 1  # nothing active: still one sequence per micro-batch


def test_abort_of_waiting_request():
    scheduler = Scheduler(config(max_running_seqs=1))
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


def test_preemption_through_engine_matches_hf(tiny_model_dirs):
    directory = tiny_model_dirs["gqa"]
    model = load_hf(directory)
    prompts = random_prompts(model.config.vocab_size, [9, 7, 11, 5], seed=3)
    source = resolve_model(str(directory), progress=False)
    # 8 blocks of 4 tokens cannot hold four sequences growing to ~20 tokens: some are preempted and recomputed.
    small = SchedulerConfig(max_running_seqs=4, block_size=4, num_kv_blocks=8, max_context=32)
    tokens, _ = run_in_process(source, greedy_requests(prompts, 10), small)
    for i, prompt in enumerate(prompts):
        assert tokens[f"r{i}"] == hf_greedy(model, prompt, 10)[0]
