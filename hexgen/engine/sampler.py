"""Token sampling on the last stage's leader: greedy, or temperature -> top-k -> top-p -> multinomial.

The filters follow HF transformers' logits warpers; each sequence draws from its own seeded
torch.Generator, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import secrets

import torch

from hexgen.engine.messages import SamplingParams


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep logits >= the k-th largest (ties kept); the rest become -inf. logits [V]."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Drop the least likely tokens whose total probability is <= 1 - top_p; always keep the best."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1 - top_p)
    drop_sorted[..., -1] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Apply temperature, top-k and top-p in HF's order; logits [V] fp32."""
    return filter_top_p(filter_top_k(logits / params.temperature, params.top_k), params.top_p)


class Sampler:
    """Per-slot sampling state of the sequences in flight."""

    def __init__(self) -> None:
        self.params: dict[int, SamplingParams] = {}
        self.generators: dict[int, torch.Generator] = {}

    def join(self, slot: int, params: SamplingParams) -> None:
        self.params[slot] = params
        if not params.is_greedy:
            generator = torch.Generator()
            generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
            self.generators[slot] = generator

    def leave(self, slot: int) -> None:
        self.params.pop(slot, None)
        self.generators.pop(slot, None)

    def sample(self, logits: torch.Tensor, slots: list[int]) -> list[int]:
        """logits [B, V] fp32 on any device, one row per slot -> one token per slot."""
        greedy = logits.argmax(dim=-1).tolist()
        tokens = []
        for row, slot in enumerate(slots):
            params = self.params[slot]
            if params.is_greedy:
                tokens.append(greedy[row])
                continue
            probs = warp(logits[row].float().cpu(), params).softmax(dim=-1)
            tokens.append(int(torch.multinomial(probs, 1, generator=self.generators[slot])))
        return tokens
