"""Micro-batches in flight across stages: many concurrent requests on multi-stage, multi-TP layouts give the
same greedy tokens as the one-process engine (which runs one step at a time)."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import greedy_requests, random_prompts, run_in_process, run_layout_with_logits

from hexgen.engine.checkpoint import resolve_model
from hexgen.engine.scheduler import SchedulerConfig

LENGTHS = [5, 17, 3, 9, 12, 1, 8, 20, 6, 11, 4, 14]  # 12 requests with ragged prompts


@pytest.mark.parametrize(("tp", "layers", "depth"), [
    ([1, 1], [3, 3], 0),  # one micro-batch in flight per stage (stages on their own devices)
    ([1, 2, 1], [2, 2, 2], 0),
    ([1, 2, 1], [2, 2, 2], 1),  # stages taking turns (one CPU machine's cores)
])
def test_pipelined_layout_matches_one_process(tp, layers, depth, tiny_model_dirs, tmp_path):
    directory = tiny_model_dirs["gqa"]
    source = resolve_model(str(directory), progress=False)
    requests = greedy_requests(random_prompts(source.spec.vocab_size, LENGTHS, seed=11), 10)
    expected, _ = run_in_process(source, requests, SchedulerConfig(max_context=source.spec.max_context))
    tokens, _ = run_layout_with_logits(directory, tp, layers, requests, tmp_path, depth)
    assert tokens == expected


def test_pipelined_prefix_caching_matches_one_process(tiny_model_dirs, tmp_path):
    """Micro-batches in flight that share cached prefix blocks (four at a time, so later requests find the
    blocks of earlier ones) give the one-process engine's tokens computed without a prefix cache."""
    directory = tiny_model_dirs["gqa"]
    source = resolve_model(str(directory), progress=False)
    prefix = random_prompts(source.spec.vocab_size, [9], seed=12)[0]
    tails = random_prompts(source.spec.vocab_size, LENGTHS[:8], seed=13)
    requests = greedy_requests([prefix + tail for tail in tails], 8)
    expected, _ = run_in_process(source, requests, SchedulerConfig(max_context=source.spec.max_context))
    config = SchedulerConfig(max_running_seqs=4, block_size=4, max_context=source.spec.max_context,
                             prefix_caching=True)
    tokens, _ = run_layout_with_logits(directory, [1, 2, 1], [2, 2, 2], requests, tmp_path, 0, config)
    assert tokens == expected
    assert torch.load(tmp_path / "hits.pt") > 0


def test_plans_of_any_size_reach_the_next_stage_whole_and_in_order(tmp_path):
    """A plan travels in one fixed-size message, the rest of a larger one in a second, while the next stage keeps
    its next receive posted: a small plan, one far over PLAN_BYTES (long block tables), a keep-alive, a small one
    and the shutdown arrive equal to what was sent, in order."""
    import pickle

    from engine_helpers import plan_messages_rank, spawn_ranks

    from hexgen.engine.messages import StepPlan
    from hexgen.engine.pipeline import PLAN_BYTES

    def plan(seqs: int, blocks: int) -> StepPlan:
        return StepPlan(seq_ids=list(range(seqs)), starts=[blocks * 16] * seqs, lengths=[1] * seqs,
                        token_ids=list(range(seqs)), block_tables=[list(range(b * blocks, (b + 1) * blocks))
                                                                   for b in range(seqs)], sample=[True] * seqs)

    plans = [plan(2, 3), plan(64, 300), StepPlan(keepalive=True), plan(5, 1), StepPlan(shutdown=True)]
    assert len(pickle.dumps(plans[1])) > 2 * PLAN_BYTES
    out = tmp_path / "received.pkl"
    spawn_ranks(plan_messages_rank, 2, (plans, str(out)))
    assert pickle.loads(out.read_bytes()) == plans
