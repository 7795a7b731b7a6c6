"""scripts/serve_check.sh (the serving step of scripts/gpu_check.sh) on CPU: a random-shape checkpoint served by
`hexgen serve` under `hexgen bench serve`, its table, and nothing left behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from hexgen.engine.bench_shapes import build_random_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_check_serves_a_random_shape_and_tabulates_each_load(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    build_random_checkpoint("tiny", torch.bfloat16, torch.device("cpu"), model)
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run(
        ["bash", str(REPO_ROOT / "scripts" / "serve_check.sh"), sys.executable, str(model), "cpu", str(out), "120",
         "3 6 8", "1 2 5", "3 6 8 2"],
        capture_output=True, text=True, timeout=180, env={**os.environ, "SERVE_PORT": str(free_port())},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "left behind" not in done.stdout
    rows = [line for line in (out / "serve.md").read_text().splitlines() if line.startswith("| ") and "/" in line]
    assert [row.split(" | ")[:2] for row in rows[1:]] == [["| 3", "6 / 0"], ["| 1", "2 / 0"],
                                                          ["| 3 (logprobs 2)", "6 / 0"]]
    assert all((out / f"serve-{name}.json").is_file() for name in ("3", "1", "3-lp2"))
    for row in rows[1:]:  # the server's own figures: mean engine step, tokens per step, how busy its driver was
        cells = [cell.strip() for cell in row.strip().strip("|").split("|")]
        assert len(cells) == 9, row
        assert float(cells[6]) > 0 and float(cells[7]) >= 1.0 and cells[8].endswith("%"), row
