"""Sampling against HF transformers' logits warpers, greedy special cases, seeding and batch independence."""

from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from hexgen.engine.messages import SampleRow
from hexgen.engine.sampler import (
    _GOLDEN,
    _MASK32,
    _mix32,
    filter_top_k,
    filter_top_p,
    first_argmax,
    row_key,
    sample_on_device,
    uniform_noise,
    warp,
)


def sample(logits, rows) -> list[int]:
    return sample_on_device(logits, rows).tolist()


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
    logits = torch.stack([random_logits(seed, 64, with_ties) for seed in range(20)])
    # Each row beside rows with other settings: the batched filters must keep rows apart.
    others = [SampleRow(1.0, 0, 1.0, 0, 0), SampleRow(0.9, 7, 0.8, 0, 0)]
    rows = [SampleRow(temperature, top_k, top_p, 0, 0) if i % 2 == 0 else others[i % 4 // 2] for i in range(20)]
    ours = warp(logits, rows)
    for i, row in enumerate(rows):
        theirs = hf_warp(logits[i], row.temperature, row.top_k, row.top_p)
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(theirs)), f"row {i}"
        torch.testing.assert_close(ours[i][~torch.isinf(ours[i])], theirs[~torch.isinf(theirs)])


def test_filters_hand_computed():
    logits = torch.tensor([1.0, 3.0, 3.0, 2.0, 0.0])
    k = lambda n: torch.tensor([n])  # noqa: E731
    p = lambda x: torch.tensor([x])  # noqa: E731
    logits = logits.unsqueeze(0)
    assert torch.isinf(filter_top_k(logits, k(2)))[0].tolist() == [True, False, False, True, True]  # tie at k kept
    # probabilities of [3, 3, 2, 1, 0] are about .40, .40, .15, .05, .02: top_p .5 keeps both 3s
    assert torch.isinf(filter_top_p(logits, p(0.5)))[0].tolist() == [True, False, False, True, True]
    assert torch.equal(filter_top_p(logits, p(1.0)), logits) and torch.equal(filter_top_k(logits, k(0)), logits)


def sample_many(row: SampleRow, logits: torch.Tensor, draws: int, others: int = 0) -> list[int]:
    """Draw `row` at positions 0..draws-1, with `others` extra rows sampled in the same batch each time."""
    tokens = []
    for position in range(draws):
        rows = [SampleRow(row.temperature, row.top_k, row.top_p, row.seed, position)]
        rows += [SampleRow(1.0, 0, 1.0, 100 + i, position + i) for i in range(others)]
        tokens.append(sample(logits.expand(len(rows), -1), rows)[0])
    return tokens


def test_temperature_zero_and_top_k_one_are_greedy():
    logits = torch.stack([random_logits(s, 50, False) for s in range(8)])
    expected = logits.argmax(dim=-1).tolist()  # hand reference: argmax per row
    for row in (SampleRow(0.0, 0, 1.0, 0, 0), SampleRow(1.5, 1, 1.0, 3, 0)):
        assert sample(logits, [row] * 8) == expected
    mixed = [SampleRow(0.0, 0, 1.0, 0, 0) if i % 2 else SampleRow(1.0, 0, 1.0, i, 0) for i in range(8)]
    assert sample(logits, mixed)[1::2] == expected[1::2]  # greedy rows stay greedy beside sampled ones


def test_same_seed_same_tokens_and_batch_independence():
    logits = random_logits(0, 50, False) / 3  # flat enough that draws vary
    row = SampleRow(1.0, 0, 0.95, 1234, 0)
    alone = sample_many(row, logits, 30)
    assert sample_many(row, logits, 30) == alone
    assert sample_many(row, logits, 30, others=3) == alone  # neighbours in the batch change nothing
    assert len(set(alone)) > 5
    assert sample_many(SampleRow(1.0, 0, 0.95, 1235, 0), logits, 30) != alone
    big_seed = SampleRow(1.0, 0, 0.95, (1 << 62) + 1234, 0)  # the seed's high bits matter too
    assert sample_many(big_seed, logits, 30) != alone


def test_noise_is_uniform_and_distinct_per_coordinate():
    u = uniform_noise(torch.tensor([row_key(1, 0), row_key(2, 0)]), 20000)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005  # U(0,1): 1/2, 1/12
    assert not torch.equal(u[0], u[1])
    assert not torch.equal(uniform_noise(torch.tensor([row_key(1, 1)]), 50)[0], u[0, :50])


@pytest.mark.parametrize("seed", [0, 1, 1234, (1 << 62) + 1234, (1 << 63) - 1])
def test_row_keys_on_the_host_equal_the_hash_of_seed_and_position_on_the_device(seed):
    """The per-row part of the noise moved to the host (fewer GPU launches): the same bits as hashing the seed and
    position tensors elementwise, as the device did before, so a seed draws the tokens it drew then."""
    positions = torch.tensor([0, 7, 4095, (1 << 31) + 5])
    seeds = torch.full_like(positions, seed)
    on_device = _mix32((positions & _MASK32) ^ _mix32(seeds & _MASK32) ^ _mix32(((seeds >> 32) & _MASK32) ^ _GOLDEN))
    assert [row_key(seed, int(p)) for p in positions] == on_device.tolist()


def test_sampled_frequencies_follow_hf_probabilities():
    logits = random_logits(5, 12, False) / 2
    expected = hf_warp(logits, 0.8, 6, 0.9).softmax(dim=-1)
    draws = torch.tensor(sample_many(SampleRow(0.8, 6, 0.9, 0, 0), logits, 4000))
    observed = torch.bincount(draws, minlength=12).float() / 4000
    assert observed[expected == 0].sum() == 0  # never a filtered token
    torch.testing.assert_close(observed, expected, atol=0.03, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_argmax_takes_the_first_of_tied_maxima(dtype):
    gen = torch.Generator().manual_seed(11)
    x = torch.randint(0, 4, (16, 49152), generator=gen).to(dtype)  # many ties at the top value 3
    x[5] = 0  # a row of one value: index 0
    x[7, 40000:] = 9  # the first of a long tied run
    rows = x.float().tolist()
    expected = [row.index(max(row)) for row in rows]  # brute force: list.index finds the first occurrence
    assert first_argmax(x).tolist() == expected
    assert expected[5] == 0 and expected[7] == 40000
