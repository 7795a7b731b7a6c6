"""How long does `hexgen plan` take as the cluster grows? Write seeded random clusters of N machines (four machine
kinds, spread over one or more regions), plan Llama-2-70B on each with `hexgen plan`, and print a Markdown table of
the wall time, the search's own time and the plan it found.

    .venv/bin/python scripts/plan_scaling.py [--machines 25 50 100 200] [--regions 1 3] [--seed 0]

The planner is imported by the interpreter running this script: PYTHONPATH=OTHER_CHECKOUT times another version.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (GPU type, GPUs per machine): GPU types of the paper's heterogeneous cluster, in machines too small to hold a 70B
# model alone (so replicas are pipelines across machines).
KINDS = (("A100-40G", 2), ("A6000", 2), ("A5000", 4), ("RTX3090Ti", 4))
NETWORK = """network:
  intra_machine: {bandwidth_gbps: 4800, latency_ms: 0.005}
  intra_region:  {bandwidth_gbps: 100, latency_ms: 0.1}
  inter_region:  {bandwidth_gbps: 1, latency_ms: 30}
"""


def cluster_yaml(machines: int, regions: int, seed: int) -> tuple[str, int]:
    """The cluster file's text and its number of GPUs."""
    rng = random.Random(seed)
    rows, gpus = [], 0
    for i in range(machines):
        gpu, count = rng.choice(KINDS)
        rows.append(f"  - {{name: m{i}, gpu: {gpu}, count: {count}, region: r{rng.randrange(regions)}}}")
        gpus += count
    return "machines:\n" + "\n".join(rows) + "\n" + NETWORK, gpus


def plan_once(cluster: Path, out: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-m", "hexgen.cli", "plan", "--cluster", str(cluster), "--model", args.model,
           "--rate", str(args.rate), "--slo-scale", str(args.slo_scale), "--seed", str(args.seed), "-o", str(out)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, cwd=out.parent)  # not a checkout: PYTHONPATH decides
    wall_s = time.perf_counter() - start
    plan = json.loads(out.read_text())
    meta = plan["meta"]
    gpus = sum(len(s["gpus"]) for r in plan["replicas"] for s in r["stages"])
    stages = max(len(r["stages"]) for r in plan["replicas"])
    return {"wall_s": wall_s, "search_s": meta["search_s"], "replicas": len(plan["replicas"]), "gpus": gpus,
            "max_stages": stages, "attainment": meta["predicted_slo_attainment"],
            "tail_s": meta["predicted_tail_latency_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--machines", type=int, nargs="+", default=[25, 50, 100, 200])
    p.add_argument("--regions", type=int, nargs="+", default=[1, 3])
    p.add_argument("--model", default="llama-2-70b")
    p.add_argument("--rate", type=float, default=2.0)
    p.add_argument("--slo-scale", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print("| machines (GPUs) | regions | `hexgen plan` wall (s) | search (s) | replicas | GPUs used | most stages "
          "| predicted SLO attainment | predicted p99 latency (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="hexgen-plan-scaling-") as tmp:
        for regions in args.regions:
            for n in args.machines:
                cluster = Path(tmp) / f"cluster-{n}-{regions}.yaml"
                text, total = cluster_yaml(n, regions, args.seed)
                cluster.write_text(text)
                print(f"planning {n} machines in {regions} region(s) ...", file=sys.stderr, flush=True)
                r = plan_once(cluster, Path(tmp) / "plan.json", args)
                print(f"| {n} ({total}) | {regions} | {r['wall_s']:.1f} | {r['search_s']:.1f} | {r['replicas']} "
                      f"| {r['gpus']} | {r['max_stages']} | {r['attainment']:.3f} | {r['tail_s']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
