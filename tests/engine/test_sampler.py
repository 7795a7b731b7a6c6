"""Sampling against HF transformers' logits warpers, greedy special cases, seeding and batch independence."""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from hexgen.engine.messages import SamplingParams
from hexgen.engine.sampler import Sampler, filter_top_k, filter_top_p, warp


def hf_warp(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """HF's order: temperature, top-k, top-p (each only when enabled, as generate() builds them)."""
    scores = logits.unsqueeze(0).clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return scores[0]


def random_logits(seed: int, vocab: int, with_ties: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if with_ties:  # few distinct values: top-k and top-p boundaries fall inside groups of equal logits
        return torch.randint(-3, 4, (vocab,), generator=gen).float()
    return torch.randn(vocab, generator=gen) * 3


@pytest.mark.parametrize("with_ties", [False, True])
@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.9), (0.5, 10, 0.5), (2.0, 3, 0.99),
    (1.0, 1000, 0.3), (0.8, 0, 0.05),
])
def test_warp_matches_hf_warpers(temperature, top_k, top_p, with_ties):
    for seed in range(20):
        logits = random_logits(seed, 64, with_ties)
        ours = warp(logits, SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p))
        theirs = hf_warp(logits, temperature, top_k, top_p)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), f"seed {seed}"
        torch.testing.assert_close(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


def test_filters_hand_computed():
    logits = torch.tensor([1.0, 3.0, 3.0, 2.0, 0.0])
    assert torch.isinf(filter_top_k(logits, 2)).tolist() == [True, False, False, True, True]  # tie at k kept
    # probabilities of [3, 3, 2, 1, 0] are about .40, .40, .15, .05, .02: top_p .5 keeps both 3s
    assert torch.isinf(filter_top_p(logits, 0.5)).tolist() == [True, False, False, True, True]
    assert torch.equal(filter_top_p(logits, 1.0), logits) and torch.equal(filter_top_k(logits, 0), logits)


def sample_many(params: SamplingParams, logits: torch.Tensor, draws: int, others: int = 0) -> list[int]:
    """Draw from slot 0, with `others` extra slots sampled in the same batch each time."""
    sampler = Sampler()
    sampler.join(0, params)
    for slot in range(1, others + 1):
        sampler.join(slot, SamplingParams(temperature=1.0, seed=100 + slot))
    slots = list(range(others + 1))
    batch = logits.expand(len(slots), -1)
    return [sampler.sample(batch, slots)[0] for _ in range(draws)]


def test_temperature_zero_and_top_k_one_are_greedy():
    logits = torch.stack([random_logits(s, 50, False) for s in range(8)])
    expected = logits.argmax(dim=-1).tolist()  # hand reference: argmax per row
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=1.5, top_k=1, seed=3)):
        sampler = Sampler()
        for slot in range(8):
            sampler.join(slot, params)
        assert sampler.sample(logits, list(range(8))) == expected


def test_same_seed_same_tokens_and_batch_independence():
    logits = random_logits(0, 50, False) / 3  # flat enough that draws vary
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    alone = sample_many(params, logits, 30)
    assert sample_many(params, logits, 30) == alone
    assert sample_many(params, logits, 30, others=3) == alone  # neighbours in the batch change nothing
    assert len(set(alone)) > 5
    assert sample_many(SamplingParams(temperature=1.0, top_p=0.95, seed=1235), logits, 30) != alone


def test_sampled_frequencies_follow_hf_probabilities():
    logits = random_logits(5, 12, False) / 2
    params = SamplingParams(temperature=0.8, top_k=6, top_p=0.9, seed=0)
    expected = hf_warp(logits, 0.8, 6, 0.9).softmax(dim=-1)
    draws = torch.tensor(sample_many(params, logits, 4000))
    observed = torch.bincount(draws, minlength=12).float() / 4000
    assert observed[expected == 0].sum() == 0  # never a filtered token
    torch.testing.assert_close(observed, expected, atol=0.03, rtol=0)
