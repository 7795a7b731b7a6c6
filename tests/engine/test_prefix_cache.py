"""Prefix caching: block bookkeeping by hand, the scheduler's hits by hand, and greedy tokens through the engine
with shared prefixes (and with preemptions resuming from cached blocks) equal to HF transformers'."""

from __future__ import annotations

from engine_helpers import greedy_requests, hf_greedy, load_hf, random_prompts, run_in_process

from hexgen.engine.block_manager import BlockManager, block_keys
from hexgen.engine.checkpoint import resolve_model
from hexgen.engine.messages import GenerationRequest, SamplingParams
from hexgen.engine.scheduler import Scheduler, SchedulerConfig


def test_block_keys_chain_the_whole_prefix():
    a = block_keys([1, 2, 3, 4, 5, 6], 2, 3)
    b = block_keys([9, 9, 3, 4, 5, 6], 2, 3)
    assert a[0] == (-1, (1, 2)) and a[1] == (hash(a[0]), (3, 4))
    assert a[1][1] == b[1][1] and a[1] != b[1]  # same tokens after a different prefix: a different block
    assert block_keys([1, 2, 3, 4, 5, 6], 2, 3, first=1, previous=a[0]) == a[1:]


def test_release_keeps_registered_blocks_until_the_pool_needs_them():
    blocks = BlockManager(num_blocks=3, block_size=2)
    keys = block_keys([1, 2, 3, 4], 2, 2)
    table: list[int] = []
    blocks.grow(table, 4)
    assert table == [0, 1]
    blocks.register(table[0], keys[0])
    blocks.register(table[1], keys[1])
    blocks.release(table)
    assert (blocks.num_free, blocks.num_cached, blocks.num_used) == (3, 2, 0)
    assert blocks.match(keys) == [0, 1]
    # A new sequence needing 2 blocks gets the never-used block 2 first, then evicts the least recently
    # released: a table is released tail first, so block 1 goes and the prefix's first block stays usable.
    other: list[int] = []
    blocks.grow(other, 4)
    assert other == [2, 1] and blocks.num_cached == 1
    assert blocks.match(keys) == [0]


def test_taken_blocks_are_shared_and_counted_once():
    blocks = BlockManager(num_blocks=4, block_size=2)
    keys = block_keys([1, 2, 3, 4], 2, 2)
    first: list[int] = []
    blocks.grow(first, 4)
    for block, key in zip(first, keys, strict=True):
        blocks.register(block, key)
    blocks.release(first)
    # Taking the two idle cached blocks and growing to 5 tokens needs one more: 2 idle + 1 new = all but one.
    assert blocks.can_take_and_grow([0, 1], 5, reserve=1)
    assert not blocks.can_take_and_grow([0, 1], 5, reserve=2)
    a = blocks.take([0, 1])
    b = blocks.take([0, 1])
    assert a == b == [0, 1] and blocks.num_used == 2 and blocks.num_cached == 0
    blocks.release(a)
    assert blocks.num_used == 2  # b still holds them
    blocks.release(b)
    assert (blocks.num_used, blocks.num_cached) == (0, 2)
    blocks.register(3, keys[0])  # the same prefix computed twice: the first block keeps the key
    assert blocks.match(keys) == [0, 1]


def request(rid: str, tokens: list[int], max_new_tokens: int = 3) -> GenerationRequest:
    return GenerationRequest(rid, tuple(tokens), SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))


def run(scheduler: Scheduler) -> list:
    plans = []
    while scheduler.has_work:
        plan = scheduler.schedule()
        if plan is not None:
            scheduler.update(plan, [7] * plan.num_sampled)
            plans.append(plan)
    return plans


def test_scheduler_hits_by_hand():
    scheduler = Scheduler(SchedulerConfig(num_kv_blocks=64, block_size=4, prefix_caching=True))
    prompt = list(range(100, 110))  # 10 tokens: blocks [100..103] [104..107] and a partial one
    scheduler.add(request("a", prompt))
    run(scheduler)
    assert scheduler.num_prefix_hit_tokens == 0
    scheduler.add(request("b", prompt))  # the same prompt: 2 full blocks cached, tokens 8 and 9 computed
    scheduler.add(request("c", prompt[:8]))  # 8 tokens: only the first block, so one token is left to compute
    scheduler.add(request("d", [1] + prompt[1:]))  # differs in the first token: nothing
    plans = run(scheduler)
    assert plans[0].seq_ids == [1, 2, 3]
    assert plans[0].starts == [8, 4, 0] and plans[0].lengths == [2, 4, 10]
    assert plans[0].block_tables[0][:2] == plans[0].block_tables[1][:1] + [plans[0].block_tables[0][1]]
    assert scheduler.num_prefix_hit_tokens == 8 + 4
    assert scheduler.blocks.num_used == 0


def test_no_hits_without_prefix_caching():
    scheduler = Scheduler(SchedulerConfig(num_kv_blocks=64, block_size=4))
    for rid in "ab":
        scheduler.add(request(rid, list(range(100, 110))))
        run(scheduler)
    assert scheduler.num_prefix_hit_tokens == 0 and scheduler.blocks.num_cached == 0


def test_shared_prefixes_through_engine_match_hf(tiny_model_dirs):
    directory = tiny_model_dirs["gqa"]
    model = load_hf(directory)
    prefix, s0, s1, s3 = random_prompts(model.config.vocab_size, [20, 5, 7, 3], seed=11)
    assert s0[:4] != s1[:4]
    prompts = [prefix + s0, prefix + s1, prefix + s0, prefix[:12] + s3]
    source = resolve_model(str(directory), progress=False)
    # One sequence at a time, so each request finds the blocks that the ones before it registered.
    config = SchedulerConfig(max_running_seqs=1, block_size=4, max_context=source.spec.max_context,
                             prefix_caching=True)
    engines: list = []
    tokens, _ = run_in_process(source, greedy_requests(prompts, 6), config, engines=engines)
    for i, prompt in enumerate(prompts):
        assert tokens[f"r{i}"] == hf_greedy(model, prompt, 6)[0]
    # by hand: r1 shares the 5 prefix blocks (20 tokens), r2 = r0 all (25 - 1) // 4 = 6 blocks, r3 3 blocks
    assert engines[0].scheduler.num_prefix_hit_tokens == 20 + 24 + 12


def test_preemption_resumes_from_cached_blocks_and_matches_hf(tiny_model_dirs):
    directory = tiny_model_dirs["gqa"]
    model = load_hf(directory)
    prefix = random_prompts(model.config.vocab_size, [8], seed=5)[0]
    prompts = [prefix + tail for tail in random_prompts(model.config.vocab_size, [1, 3, 2, 4], seed=7)]
    source = resolve_model(str(directory), progress=False)
    # 9 blocks of 4 tokens cannot hold four sequences growing to ~20 tokens: some are preempted and resumed.
    small = SchedulerConfig(max_running_seqs=4, block_size=4, num_kv_blocks=9, max_context=32, prefix_caching=True)
    engines: list = []
    tokens, _ = run_in_process(source, greedy_requests(prompts, 10), small, engines=engines)
    for i, prompt in enumerate(prompts):
        assert tokens[f"r{i}"] == hf_greedy(model, prompt, 10)[0]
    scheduler = engines[0].scheduler
    assert scheduler.num_preemptions > 0 and scheduler.num_prefix_hit_tokens > 0
