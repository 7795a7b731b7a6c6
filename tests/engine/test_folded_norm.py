"""The CPU path's RMSNorm folded into the packed projection after it, against transformers' LlamaRMSNorm followed
by a plain product, in fp32 and in bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hexgen.engine.layers import ColumnParallelLinear, ParallelLMHead, cpu_packs_bf16, packs_for_cpu
from hexgen.engine.parallel import TPGroup

HIDDEN, EPS = 48, 1e-5


def reference_norm(weight: torch.Tensor, eps: float) -> torch.nn.Module:
    """transformers' LlamaRMSNorm with this weight (imported here: the module loads torch's inductor and triton)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(weight.shape[0], eps=eps)
    norm.weight.data.copy_(weight)
    return norm


@pytest.mark.skipif(not packs_for_cpu(torch.empty(1)), reason="oneDNN packing is not available in this torch")
@pytest.mark.parametrize("tokens", [1, 7, 64])
def test_folded_norm_projection_matches_norm_then_product(tokens):
    gen = torch.Generator().manual_seed(tokens)
    projection = ColumnParallelLinear(HIDDEN, [32, 16, 16], TPGroup(0, 1), torch.float32)
    projection.weight.data.copy_(torch.randn(64, HIDDEN, generator=gen))
    norm_weight = torch.rand(HIDDEN, generator=gen) + 0.5
    x = torch.randn(tokens, HIDDEN, generator=gen) * 4  # a residual stream's scale, far from the eps
    x[0] *= 1e-3  # and one row where eps matters
    expected = F.linear(reference_norm(norm_weight, EPS)(x), projection.weight)

    projection.pack(norm_weight, EPS)
    assert projection.folds_norm()
    got = projection.fused(x)  # takes the norm's input
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert [part.shape[1] for part in projection.forward(x)] == [32, 16, 16]


@pytest.mark.skipif(not packs_for_cpu(torch.empty(1)), reason="oneDNN packing is not available in this torch")
def test_folded_final_norm_in_the_lm_head_leaves_the_tied_weight_alone():
    gen = torch.Generator().manual_seed(5)
    head = ParallelLMHead(100, HIDDEN, TPGroup(0, 1), torch.float32)
    head.weight.data.copy_(torch.randn(100, HIDDEN, generator=gen))
    dense = head.weight.detach().clone()
    norm_weight = torch.rand(HIDDEN, generator=gen) + 0.5
    x = torch.randn(3, HIDDEN, generator=gen)

    head.pack(norm_weight, EPS)
    torch.testing.assert_close(head(x), F.linear(reference_norm(norm_weight, EPS)(x), dense), atol=1e-4, rtol=1e-5)
    assert torch.equal(head.weight, dense)  # the embedding it may share is untouched


def test_bf16_folds_the_norm_where_it_packs():
    """bf16 packs (and so folds) only where oneDNN has bf16 products; either way the result is the norm then the
    product up to bf16 rounding."""
    gen = torch.Generator().manual_seed(3)
    projection = ColumnParallelLinear(HIDDEN, [HIDDEN], TPGroup(0, 1), torch.bfloat16)
    projection.weight.data.copy_(torch.randn(HIDDEN, HIDDEN, generator=gen))
    dense = projection.weight.detach().double()
    norm_weight = torch.rand(HIDDEN, generator=gen) + 0.5
    projection.pack(norm_weight.bfloat16(), EPS)
    assert projection.folds_norm() == (projection.packed is not None) == cpu_packs_bf16()
    x = torch.randn(5, HIDDEN, generator=gen).bfloat16()
    normed = reference_norm(norm_weight.double(), EPS).double()(x.double())
    exact = F.linear(normed, dense)
    got = projection.fused(x if projection.folds_norm() else normed.bfloat16())  # unfolded: the caller norms
    assert got.dtype == torch.bfloat16
    # bf16 rounds the normed input and the folded weight (each term off by up to 2 * 2^-9 of its size) and the output
    bound = 2**-8 * F.linear(normed.abs(), dense.abs()) + 2**-8 * exact.abs()
    assert ((got.double() - exact).abs() <= bound).all()
