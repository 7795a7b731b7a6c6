"""The plan / simulate commands end to end, user errors as one line, and no torch anywhere on this path."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from scheduler_helpers import TINY_CLUSTER

from hexgen.cli import main


def test_plan_then_simulate_with_sweeps(tmp_path, capsys):
    cluster = tmp_path / "c.yaml"
    cluster.write_text(TINY_CLUSTER)
    plan = tmp_path / "plan.json"
    rc = main(["plan", "--cluster", str(cluster), "--model", "llama-2-13b", "--rate", "0.5", "--slo", "20",
               "--generations", "5", "--requests", "100", "-o", str(plan)])
    assert rc == 0
    data = json.loads(plan.read_text())
    stage = data["replicas"][0]["stages"][0]
    assert data["model"] == "llama-2-13b" and {"machine", "gpus", "tp", "layers"} <= set(stage)
    assert "planned 8 GPUs in" in capsys.readouterr().out
    rc = main(["simulate", "--cluster", str(cluster), "--plan", str(plan), "--rate", "0.5", "--slo-scale", "4",
               "--requests", "100", "--arrival", "gamma", "--sweep-slo-scales", "1,2,4", "--sweep-rates", "0.2,1",
               "--plot-dir", str(tmp_path)])
    assert rc == 0 and "SLO attainment" in capsys.readouterr().out
    assert (tmp_path / "slo_attainment_vs_scale.png").stat().st_size > 1000
    assert (tmp_path / "slo_attainment_vs_rate.png").stat().st_size > 1000


def test_simulating_free_machines_prints_no_infinite_tokens_per_dollar(capsys):
    """examples/clusters/local-cpu.yaml prices its machine at $0: tokens per dollar has no value, not "inf"."""
    assert main(["simulate", "--cluster", "examples/clusters/local-cpu.yaml", "--plan",
                 "examples/plans/local-default.json", "--rate", "1", "--slo", "10", "--requests", "10"]) == 0
    out = capsys.readouterr().out
    assert "$0.00/h" in out and "- (priced at $0)" in out and "inf" not in out


def test_user_errors_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("machines:\n  - {name: a, gpu: A6000\n")
    rc = main(["plan", "--cluster", str(bad), "--model", "llama-2-7b", "--rate", "1", "--slo", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "malformed YAML at line" in err


def test_no_torch_on_the_scheduler_path(tmp_path):
    cluster = tmp_path / "c.yaml"
    cluster.write_text(TINY_CLUSTER)
    code = f"""
import sys
import hexgen.planner, hexgen.sim, hexgen.dispatch, hexgen.costmodel, hexgen.cluster
import hexgen.planner.search, hexgen.sim.run, hexgen.sim.plots, hexgen.sim.analytic, hexgen.profile
import hexgen.commands.profile_cmd
from hexgen.cli import main
rc = main(["plan", "--cluster", {str(cluster)!r}, "--model", "llama-2-7b", "--rate", "1", "--slo", "10",
           "--generations", "2", "--requests", "50"])
assert rc == 0, rc
assert "torch" not in sys.modules, "torch was imported"
print("NO_TORCH_OK")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "NO_TORCH_OK" in out.stdout, out.stderr[-2000:]


def test_simulate_refuses_bad_sweeps_before_simulating(tmp_path, capsys, monkeypatch):
    """A folder that cannot be made crashed with a traceback, a NaN rate was simulated, and either came only after
    the main simulation (minutes for many requests); now one line, before any simulation."""
    import hexgen.sim.run

    cluster = tmp_path / "c.yaml"
    cluster.write_text(TINY_CLUSTER)
    plan = tmp_path / "plan.json"
    assert main(["plan", "--cluster", str(cluster), "--model", "llama-2-13b", "--rate", "0.5", "--slo", "20",
                 "--generations", "2", "--requests", "50", "-o", str(plan)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(hexgen.sim.run, "run_plan", lambda *a, **k: pytest.fail("simulated before refusing"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    base = ["simulate", "--cluster", str(cluster), "--plan", str(plan), "--rate", "0.5", "--slo", "20"]
    cases = [
        (["--sweep-rates", "1,2", "--plot-dir", str(blocker / "plots")], "--plot-dir"),
        (["--sweep-rates", "nan,1"], "--sweep-rates needs numbers above 0 and at most 1e+06, got 'nan,1'"),
        (["--sweep-slo-scales", "1,x"], "--sweep-slo-scales takes comma-separated numbers"),
        (["--sweep-rates", "1,1e308"], "--sweep-rates needs numbers above 0 and at most 1e+06, got '1,1e308'"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_simulate_request_count_is_bounded(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["simulate", "--cluster", "c.yaml", "--plan", "p.json", "--rate", "1", "--slo", "5",
              "--requests", "2000000"])
    assert stop.value.code == 2
    assert "argument --requests: must be 1 to 1,000,000, got 2000000" in capsys.readouterr().err
