"""OpenAI's presence / frequency penalties and logit biases: greedy tokens against a brute-force reference (HF
transformers one token at a time, the adjustment applied to its logits by hand), in one process with and without
look-ahead steps and through a pipeline; seeded draws with penalties independent of the batch."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import load_hf, random_prompts, run_in_process, run_layout_with_logits

from hexgen.engine.checkpoint import resolve_model
from hexgen.engine.messages import GenerationRequest, SampleRow, SamplingParams
from hexgen.engine.sampler import adjust_logits, sample_on_device
from hexgen.engine.scheduler import SchedulerConfig

NEW_TOKENS = 24
SETTINGS = [  # greedy requests, one of them plain
    dict(frequency_penalty=1.5, presence_penalty=0.5),
    dict(),
    dict(presence_penalty=-2.0, logit_bias=((3, 4.0),)),
    dict(logit_bias=((11, 2.5), (62, -100.0))),  # 62: the second token plain greedy decoding makes here
]


def requests_of(prompts: list[list[int]]) -> list[GenerationRequest]:
    return [GenerationRequest(f"r{i}", tuple(prompt), SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True,
                                                                    **extra))
            for i, (prompt, extra) in enumerate(zip(prompts, SETTINGS, strict=True))]


def brute_force(model, prompt: list[int], params: SamplingParams) -> list[int]:
    """Greedy decoding recomputing every token from scratch, OpenAI's adjustment applied to each step's logits."""
    ids, out = list(prompt), []
    for _ in range(params.max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        for token in set(out):
            logits[token] -= params.frequency_penalty * out.count(token) + params.presence_penalty
        for token, bias in params.logit_bias:
            logits[token] += bias
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


@pytest.fixture(scope="module")
def reference(tiny_model_dirs):
    directory = tiny_model_dirs["gqa"]
    source = resolve_model(str(directory), progress=False)
    prompts = random_prompts(source.spec.vocab_size, [13, 4, 9, 6], seed=31)
    model = load_hf(directory)
    requests = requests_of(prompts)
    expected = {r.request_id: brute_force(model, list(r.prompt_token_ids), r.params) for r in requests}
    plain = {r.request_id: brute_force(model, list(r.prompt_token_ids), SamplingParams(max_new_tokens=NEW_TOKENS))
             for r in requests}
    # every adjustment changes what greedy decoding makes, so a sampler that ignored one would fail
    assert all(expected[r] != plain[r] for r in ("r0", "r2", "r3")) and expected["r1"] == plain["r1"]
    return directory, source, requests, expected


@pytest.mark.parametrize("overlap", [False, True])
def test_greedy_with_penalties_and_biases_matches_brute_force(overlap, reference):
    """With `overlap` the engine looks ahead for the plain request only: a penalized draw waits for every token
    before it to be known on the host."""
    _, source, requests, expected = reference
    config = SchedulerConfig(max_context=source.spec.max_context, max_step_tokens=8, overlap_steps=overlap)
    tokens, _ = run_in_process(source, requests, config)
    assert tokens == expected


def test_penalties_through_a_pipeline_match_brute_force(reference, tmp_path):
    directory, _, requests, expected = reference
    tokens, _ = run_layout_with_logits(directory, [1, 2, 1], [2, 2, 2], requests, tmp_path, depth=1)
    assert tokens == expected


def test_a_seeded_draw_with_penalties_does_not_depend_on_its_batch(reference):
    _, source, requests, _ = reference
    params = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.8, top_k=40, seed=9, ignore_eos=True,
                            frequency_penalty=0.7, presence_penalty=0.3, logit_bias=((5, 1.5),))
    seeded = GenerationRequest("seeded", requests[0].prompt_token_ids, params)
    config = SchedulerConfig(max_context=source.spec.max_context)
    alone, _ = run_in_process(source, [seeded], config)
    together, _ = run_in_process(source, [*requests, seeded], config)
    assert together["seeded"] == alone["seeded"]


def test_adjustment_hand_computed():
    """Earlier outputs 1, 1, 3: token 1 loses 2 x 0.5 + 0.25, token 3 0.5 + 0.25; a bias of 2 on token 4."""
    row = SampleRow(0.0, 0, 1.0, 0, 0, presence_penalty=0.25, frequency_penalty=0.5, output_token_ids=(1, 1, 3))
    biased = SampleRow(0.0, 0, 1.0, 0, 0, presence_penalty=0.25, frequency_penalty=0.5, logit_bias=((4, 2.0),),
                       output_token_ids=(1, 1, 3))
    plain = SampleRow(0.0, 0, 1.0, 0, 0)
    logits = torch.zeros(3, 5)
    adjusted = adjust_logits(logits, [row, biased, plain])
    assert adjusted.tolist() == [[0, -1.25, 0, -0.75, 0], [0, -1.25, 0, -0.75, 2], [0, 0, 0, 0, 0]]
    assert logits.abs().sum() == 0  # the model's logits are left as they were (log-probabilities use them)
    assert sample_on_device(logits, [row, biased, plain]).tolist() == [0, 4, 0]


def test_a_penalized_and_biased_token_is_adjusted_in_hfs_order_without_repeated_keys(monkeypatch):
    """Token 2 was output once (frequency penalty 0.3) and has a bias of 0.7: its logit is (0.1 - 0.3) + 0.7 in
    float32, penalty first, as HF applies them; and no index_add repeats a (row, token), since CUDA's atomic adds
    would then sum the repeats in any order, changing the last bit from run to run."""
    calls = []
    index_add = torch.Tensor.index_add_

    def recording(self, dim, index, source, **kwargs):
        calls.append(index.tolist())
        return index_add(self, dim, index, source, **kwargs)

    monkeypatch.setattr(torch.Tensor, "index_add_", recording)
    row = SampleRow(0.0, 0, 1.0, 0, 0, frequency_penalty=0.3, logit_bias=((2, 0.7), (4, -1.0)), output_token_ids=(2,))
    logits = torch.full((1, 5), 0.1)
    adjusted = adjust_logits(logits, [row])
    step = torch.tensor(0.1) - torch.tensor(0.3)
    assert adjusted[0, 2].item() == (step + torch.tensor(0.7)).item()
    assert adjusted[0, 4].item() == (torch.tensor(0.1) - torch.tensor(1.0)).item()
    assert calls and all(len(set(keys)) == len(keys) for keys in calls), calls
