"""The shared-memory all-reduce of CPU TP groups against gloo's and against the sum computed in one process."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import spawn_ranks
from shm_ranks import inputs, shm_rank

from hexgen.engine.shm_allreduce import usable

pytestmark = pytest.mark.skipif(not usable(), reason="needs x86 and /dev/shm")


@pytest.mark.parametrize("world", [2, 3])
def test_every_rank_gets_the_same_sum_as_gloo_and_as_one_process(world, tmp_path):
    spawn_ranks(shm_rank, world, (world, str(tmp_path)))
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    per_rank = [inputs(r) for r in range(world)]
    assert outs[0]["used"][-1] is False and all(outs[0]["used"][:-8])  # the last shape is larger than a slot
    for call, used in enumerate(outs[0]["used"]):
        parts = [per_rank[r][call] for r in range(world)]
        expected = parts[0].clone()
        for part in parts[1:]:  # in rank order, as every rank adds them
            expected.add_(part)
        for r in range(world):
            if used:
                assert torch.equal(outs[r]["shm"][call], outs[0]["shm"][call])  # bitwise the same on every rank
                assert torch.equal(outs[r]["shm"][call], expected)
            torch.testing.assert_close(outs[r]["gloo"][call], expected, rtol=1e-2 if parts[0].dtype == torch.bfloat16
                                       else 1e-5, atol=1e-2)
