"""A rank process starts with its OpenMP spin count already in its environment, set by the parent, so the count
holds even where the rank loads torch before its entry function runs (as when the parent's main module imports
torch); a user's own GOMP_SPINCOUNT wins, and the parent's environment is left as it was. A CUDA rank selects
its own GPU before anything runs on one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from engine_helpers import report_spin_count

from hexgen.launch.local import RankProcesses
from hexgen.launch.spec import SHARED_SPIN_COUNT, Layout, RankSpec


def spawned_spin_counts(tmp_path: Path, spin_counts: list[int]) -> list[str]:
    specs = [RankSpec(None, Layout((1,), ((0, 1),)), rank, spin_count=n) for rank, n in enumerate(spin_counts)]
    outs = [str(tmp_path / f"rank{rank}.txt") for rank in range(len(specs))]
    processes = RankProcesses(report_spin_count, list(zip(specs, outs, strict=True)))
    processes.start()
    processes.stop(grace_s=60)
    return [Path(out).read_text() for out in outs]


def test_each_rank_starts_with_its_spin_count(tmp_path, monkeypatch):
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert spawned_spin_counts(tmp_path, [SHARED_SPIN_COUNT, 0]) == [str(SHARED_SPIN_COUNT), "unset"]
    assert "GOMP_SPINCOUNT" not in os.environ  # the parent's own environment is as before


@pytest.mark.parametrize("users", ["0", "500"])
def test_a_users_spin_count_wins(tmp_path, monkeypatch, users):
    monkeypatch.setenv("GOMP_SPINCOUNT", users)
    assert spawned_spin_counts(tmp_path, [SHARED_SPIN_COUNT]) == [users]
    assert os.environ["GOMP_SPINCOUNT"] == users


@pytest.mark.parametrize("ranks", [1, 2])
def test_a_cuda_rank_makes_its_gpu_current_whatever_its_replica_size(monkeypatch, ranks):
    """Triton launches, CUDA graph capture and events use the current device, so a rank on GPU 5 must select
    GPU 5 first, a one-rank replica too (it once returned before doing so and ran on GPU 0's stream)."""
    import torch

    from hexgen.engine import engine

    selected = []
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    monkeypatch.setattr(engine.dist, "init_process_group", lambda *a, **k: None)
    monkeypatch.setattr(engine, "init_rank_context", lambda *a, **k: None)
    layout = Layout((1,) * ranks, tuple((i, i + 1) for i in range(ranks)))
    engine.init_rank(RankSpec(None, layout, 0, device="cuda", gpu_index=5, master_port=1))
    assert selected == [5]


@pytest.mark.parametrize("master_addr", ["127.0.0.1", "127.0.0.2"])
def test_a_rank_meets_its_replica_where_its_spec_says_not_where_a_job_around_it_does(monkeypatch, master_addr):
    """MASTER_ADDR inherited from a job around hexgen (torchrun, SLURM) names another rendezvous: a rank uses its
    spec's address (this machine; rank 0's node under Ray)."""
    from hexgen.engine import engine

    monkeypatch.setenv("MASTER_ADDR", "10.9.9.9")
    seen = []
    monkeypatch.setattr(engine.dist, "init_process_group", lambda *a, **k: seen.append(os.environ["MASTER_ADDR"]))
    monkeypatch.setattr(engine, "init_rank_context", lambda *a, **k: None)
    engine.init_rank(RankSpec(None, Layout((1, 1), ((0, 1), (1, 2))), 1, master_port=1, master_addr=master_addr))
    assert seen == [master_addr]
