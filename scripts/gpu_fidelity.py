"""The planner's model of the engine against what the H200 measured (docs/bench-gpu.md, run 2): decode steps of the
Llama-3-8B shape at batch 1-128 from the cost model, and the closed-loop serving loads from the simulator, on
examples/clusters/one-h200.yaml (the H200's measured profile). Prints a Markdown table; no GPU needed.

    .venv/bin/python scripts/gpu_fidelity.py
"""

from __future__ import annotations

import numpy as np

from hexgen.cluster import load_cluster
from hexgen.costmodel import CostConfig, Workload
from hexgen.dispatch import make_policy
from hexgen.models import load_model_spec
from hexgen.plan import plan_from_dict
from hexgen.sim.run import replica_models
from hexgen.sim.simulator import simulate_streams

CLUSTER = "examples/clusters/one-h200.yaml"
PROMPT_TOKENS = 128  # the engine bench's prompt
# Measured on the H200, run 2 of docs/bench-gpu.md: decode ms per step by batch (median of 32 steps after a 128-token
# prompt, 16 new tokens on average into the timed steps), and `hexgen serve` under `hexgen bench serve`.
MEASURED_STEP_MS = {1: 5.30, 8: 5.38, 32: 5.82, 64: 6.43, 128: 7.71}
SERVED_PROMPT_TOKENS = 12  # (step tokens - sampled tokens) / requests in the server's own totals: 3,072 / 256
MEASURED_SERVING = [  # streams, requests, output tokens each, measured output tok/s, measured TPOT p50 ms
    (64, 256, 128, 9026.0, 6.5),
    (1, 8, 128, 195.8, 5.0),
]
MAX_BATCH = 64


def main() -> None:
    cluster = load_cluster(CLUSTER)
    spec, cfg = load_model_spec("llama-3-8b"), CostConfig(dtype_bytes=2)
    plan = plan_from_dict({"model": "llama-3-8b", "replicas": [
        {"stages": [{"machine": "gpu-box", "gpus": [0], "tp": 1, "layers": [0, spec.num_layers]}]}]}, "one H200")
    print(f"Cost model and simulator on `{CLUSTER}` (the H200's measured profile), Llama-3-8B shape, bf16\n")
    print("| what | measured | predicted | predicted / measured |")
    print("|---|---|---|---|")
    [model] = replica_models(plan, cluster, spec, cfg, 128, Workload(PROMPT_TOKENS, 64, 128))
    step = model.cost.sequential
    for batch, measured in MEASURED_STEP_MS.items():
        predicted = 1000 * step.decode_step_s(batch, batch * (PROMPT_TOKENS + 16))
        print(f"| decode step, batch {batch} (ms) | {measured:.2f} | {predicted:.2f} | {predicted / measured:.2f} |")
    for streams, requests, tokens, tok_s, tpot_ms in MEASURED_SERVING:
        [model] = replica_models(plan, cluster, spec, cfg, MAX_BATCH, Workload(SERVED_PROMPT_TOKENS, tokens, MAX_BATCH))
        policy = make_policy("least-outstanding")
        done = simulate_streams([model], streams, requests, SERVED_PROMPT_TOKENS, tokens, policy)
        span = max(c.finish_s for c in done)
        predicted_tok_s = requests * tokens / span
        mean_latency_s = float(np.mean([c.latency_s for c in done]))
        print(f"| `hexgen serve`, {streams} streams: output tok/s | {tok_s:.0f} | {predicted_tok_s:.0f} "
              f"| {predicted_tok_s / tok_s:.2f} |")
        print(f"| `hexgen serve`, {streams} streams: mean latency / {tokens} tokens (ms; measured: TPOT p50) "
              f"| {tpot_ms:.1f} | {1000 * mean_latency_s / tokens:.1f} "
              f"| {1000 * mean_latency_s / tokens / tpot_ms:.2f} |")


if __name__ == "__main__":
    main()
