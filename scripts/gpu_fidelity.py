"""The planner's model of the engine against what the H200 measured (docs/bench-gpu.md, run 2): decode steps of the
Llama-3-8B shape at batch 1-128 from the cost model, and the closed-loop serving loads from the simulator, on one
H200 with two profiles: as `hexgen profile --device cuda` measured it (overheads fitted on tiny models), and with
its per-layer and per-sequence overheads fitted on the 8B's own decode steps at batch 1, 8 and 64 (what `hexgen
profile --model` does on a GPU; batches 32 and 128 and the serving runs are not in the fit). Prints a Markdown
table; no GPU needed.

    .venv/bin/python scripts/gpu_fidelity.py
    .venv/bin/python scripts/gpu_fidelity.py --write-profile examples/profiles/gpu-h200-bf16-llama-3-8b.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml

from hexgen.cluster import Cluster, load_cluster
from hexgen.costmodel import CostConfig, Workload
from hexgen.dispatch import make_policy
from hexgen.engine.profiler import fit_batches, overheads_from_steps
from hexgen.models import load_model_spec
from hexgen.plan import plan_from_dict
from hexgen.profile import apply_profiles, profile_from_dict
from hexgen.sim.run import replica_models
from hexgen.sim.simulator import simulate_streams

CLUSTER = "examples/clusters/one-h200.yaml"
MEASURED_PROFILE = "examples/profiles/gpu-h200-bf16.yaml"  # `hexgen profile --device cuda`, run 2
PROMPT_TOKENS = 128  # the engine bench's prompt
CONTEXT_TOKENS = PROMPT_TOKENS + 16  # per sequence, on average over the timed steps (16 new tokens into them)
# Measured on the H200, run 2 of docs/bench-gpu.md: decode ms per step by batch (median of 32 steps after a 128-token
# prompt), and `hexgen serve` under `hexgen bench serve`.
MEASURED_STEP_MS = {1: 5.30, 8: 5.38, 32: 5.82, 64: 6.43, 128: 7.71}
SERVED_PROMPT_TOKENS = 12  # (step tokens - sampled tokens) / requests in the server's own totals: 3,072 / 256
MEASURED_SERVING = [  # streams, requests, output tokens each, measured output tok/s, measured TPOT p50 ms
    (64, 256, 128, 9026.0, 6.5),
    (1, 8, 128, 195.8, 5.0),
]
MAX_BATCH = 64
DTYPE_BYTES = 2  # bf16
CALIBRATED_ON = ("llama-3-8b shape, random weights: `hexgen bench engine --device cuda` decode steps at batch "
                 "{batches} on the H200 (docs/bench-gpu.md, run 2, 2026-11-30), fitted by scripts/gpu_fidelity.py")


def calibrated_profile(measured: dict) -> dict:
    """The measured profile with its per-layer and per-sequence overheads fitted on the 8B's decode steps."""
    batches = fit_batches("cuda")
    steps_s = {b: MEASURED_STEP_MS[b] / 1e3 for b in batches}
    fitted = overheads_from_steps(measured, load_model_spec("llama-3-8b"), DTYPE_BYTES, steps_s, CONTEXT_TOKENS)
    fitted = {key: round(value, 5) for key, value in fitted.items()}
    return {**measured, **fitted, "calibrated_on": CALIBRATED_ON.format(batches=", ".join(map(str, batches)))}


def predictions(cluster: Cluster) -> list[float]:
    """Predicted decode steps (ms, in MEASURED_STEP_MS's order), then output tok/s and mean ms per output token of
    each serving load."""
    spec, cfg = load_model_spec("llama-3-8b"), CostConfig(dtype_bytes=DTYPE_BYTES)
    plan = plan_from_dict({"model": "llama-3-8b", "replicas": [
        {"stages": [{"machine": "gpu-box", "gpus": [0], "tp": 1, "layers": [0, spec.num_layers]}]}]}, "one H200")
    [model] = replica_models(plan, cluster, spec, cfg, 128, Workload(PROMPT_TOKENS, 64, 128))
    out = [1000 * model.cost.sequential.decode_step_s(b, b * CONTEXT_TOKENS) for b in MEASURED_STEP_MS]
    for streams, requests, tokens, _, _ in MEASURED_SERVING:
        [model] = replica_models(plan, cluster, spec, cfg, MAX_BATCH, Workload(SERVED_PROMPT_TOKENS, tokens, MAX_BATCH))
        policy = make_policy("least-outstanding")
        done = simulate_streams([model], streams, requests, SERVED_PROMPT_TOKENS, tokens, policy)
        out.append(requests * tokens / max(c.finish_s for c in done))
        out.append(1000 * float(np.mean([c.latency_s for c in done])) / tokens)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-profile", type=Path, help="also write the calibrated profile (YAML) here")
    args = parser.parse_args()
    measured = yaml.safe_load(Path(MEASURED_PROFILE).read_text())
    calibrated = calibrated_profile(measured)
    base = load_cluster(CLUSTER)
    columns = [predictions(apply_profiles(base, [profile_from_dict(p, name)]))
               for p, name in ((measured, MEASURED_PROFILE), (calibrated, "calibrated profile"))]
    labels = [f"decode step, batch {b} (ms){'' if b in fit_batches('cuda') else ', not fitted'}"
              for b in MEASURED_STEP_MS]
    measured_values = list(MEASURED_STEP_MS.values())
    for streams, _, tokens, tok_s, tpot_ms in MEASURED_SERVING:
        load = f"`hexgen serve`, {streams} stream{'s' if streams > 1 else ''}"
        labels += [f"{load}: output tok/s", f"{load}: mean latency / {tokens} tokens (ms; measured: TPOT p50)"]
        measured_values += [tok_s, tpot_ms]
    print(f"Cost model and simulator on one H200, Llama-3-8B shape, bf16; overheads (ms) as measured: layer "
          f"{measured['layer_overhead_ms']}, sequence {measured['seq_overhead_ms']}; calibrated: layer "
          f"{calibrated['layer_overhead_ms']}, sequence {calibrated['seq_overhead_ms']}\n")
    print("| what | measured | predicted, profile as measured | ratio | predicted, calibrated on the 8B | ratio |")
    print("|---|---|---|---|---|---|")
    for label, value, before, after in zip(labels, measured_values, *columns, strict=True):
        cells = [f"{v:,.0f}" if value >= 100 else f"{v:.2f}" for v in (value, before, after)]
        print(f"| {label} | {cells[0]} | {cells[1]} | {before / value:.2f} | {cells[2]} | {after / value:.2f} |")
    if args.write_profile:
        args.write_profile.write_text(yaml.safe_dump(calibrated, sort_keys=False))
        print(f"\nwrote {args.write_profile}")


if __name__ == "__main__":
    main()
