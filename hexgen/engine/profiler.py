"""`hexgen profile`'s measurements on this machine (torch): matmul rate, weight-scan bandwidth, the engine's
fixed costs per step, per layer and per sequence, and the all-reduce and stage-to-stage link costs.

The fixed costs come from the real engine running tiny random Llamas (hidden 64, so their arithmetic is
negligible): decode steps of 1 and 4 layers at batch 1 and 8 are fitted to t = step + layers x (layer + batch x seq).
With --model, the model's own decode steps (batch 1 and 8 on a CPU; 1, 8 and 64 on a GPU, where a sequence's
cost shows only over tens of them) are fitted by least squares: what the cost model leaves unexplained per step
and per sequence becomes its per-layer and per-sequence overheads. On a CPU the model is also served as two
stages taking turns on this machine's cores (as `hexgen serve` runs a CPU pipeline) beside one process, at batch
1 and 8: the difference per step is the co-located handoff, fitted to t = handoff + batch x handoff_seq; and the
model is served as one TP-t stage for each of its valid TP degrees t from 2 to 4 at batch 1: (the step / the waves
its ranks run in on the cores, as the simulator has it in hexgen/sim/host.py, - the cost model's compute) /
(2 x layers) is the fixed time of an all-reduce at degree t as the engine meets it.
Links are timed with gloo (CPU) or NCCL (two GPUs or more) between two processes, and fitted to the cost model's
own formulas: all-reduce over two ranks = 2 x latency + bytes / bandwidth, a send = latency + bytes / bandwidth.
"""

from __future__ import annotations

import datetime
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hexgen.engine.commbench import measure_collectives
from hexgen.engine.engine import DTYPES, Engine, build_runner, init_rank
from hexgen.engine.messages import GenerationRequest, SamplingParams
from hexgen.engine.scheduler import SchedulerConfig
from hexgen.launch.spec import Layout, RankSpec
from hexgen.machine import usable_cores

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 256, "max_position_embeddings": 512}
OVERHEAD_LAYERS = (1, 4)
OVERHEAD_BATCHES = (1, 8)
HANDOFF_BATCHES = (1, 8)
LINK_TOKENS = (1, 512)  # message sizes [T, hidden] fitted for latency (small) and bandwidth (large)
LINK_ROUNDS = 3
MAX_SERVED_TP = 4  # TP degrees served to fit the all-reduce per degree (as `hexgen serve`'s default plan's widest)
SERVED_CONTEXT = 8 + 12  # the served sequences: 8 prompt tokens, decode steps 2..24 (median near 12)


def _timed_s(fn, seconds: float, sync) -> float:
    """Seconds of one call of fn: the fastest of calls repeated for about `seconds` after a warm-up call (other
    work on the machine only ever adds time)."""
    fn()
    sync()
    samples, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(samples) < 3:
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return min(samples)


def _sync(device: torch.device):
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def matmul_tflops(device: torch.device, dtype: torch.dtype, size: int, seconds: float = 1.0) -> float:
    """Dense [size, size] x [size, size] products per second, as TFLOPS (2 size^3 FLOPs each)."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    return 2 * size**3 / _timed_s(lambda: a @ b, seconds, _sync(device)) / 1e12


def weight_scan_gbs(device: torch.device, dtype: torch.dtype, num_bytes: int, seconds: float = 1.0) -> float:
    """Matrix-vector products over a weight matrix of `num_bytes`: the bytes a decode step streams, per second."""
    cols = 4096
    rows = num_bytes // (cols * torch.tensor([], dtype=dtype).element_size())
    w = torch.randn(rows, cols, dtype=dtype, device=device)
    x = torch.randn(cols, dtype=dtype, device=device)
    return w.numel() * w.element_size() / _timed_s(lambda: w @ x, seconds, _sync(device)) / 1e9


def _tiny_checkpoint(num_layers: int, folder: Path):
    """A random Llama of `num_layers` tiny layers saved as safetensors, and its ModelSource."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hexgen.engine.checkpoint import ModelSource
    from hexgen.models import spec_from_hf_config

    config = LlamaConfig(num_hidden_layers=num_layers, **TINY)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    spec = spec_from_hf_config(json.loads((folder / "config.json").read_text()), f"tiny-{num_layers}")
    return ModelSource(spec.name, folder, spec)


def _decode_steps_s(source, batches: tuple[int, ...], dtype: str, device: str, threads: int, steps: int = 24,
                    runs: int = 1) -> dict[int, float]:
    """{batch: median seconds of the engine's decode steps with `batch` sequences} on one in-process rank, the
    model loaded once; the fastest of `runs` runs at each batch (other work on the machine only ever adds time)."""
    layout = Layout((1,), ((0, source.spec.num_layers),))
    spec = RankSpec(source, layout, 0, dtype, device, num_threads=threads)
    config = SchedulerConfig(max_running_seqs=max(batches), max_context=256)
    engine = Engine.create(build_runner(spec, init_rank(spec), config), config, ())
    params = SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
    out = {}
    for batch in batches:
        medians = []
        for run in range(runs):
            for i in range(batch):
                engine.add(GenerationRequest(f"b{batch}-{run}-{i}", tuple(range(10, 18)), params))
            engine.step()  # the prefill
            times = []
            while engine.has_work:
                t0 = time.perf_counter()
                engine.step()
                times.append(time.perf_counter() - t0)
            medians.append(statistics.median(times[2:]))
        out[batch] = min(medians)
    return out


def _decode_step_s(source, batch: int, dtype: str, device: str, threads: int) -> float:
    """Median seconds of the engine's decode steps with `batch` sequences, one in-process rank."""
    return _decode_steps_s(source, (batch,), dtype, device, threads)[batch]


def engine_overheads_ms(dtype: str, device: str, threads: int) -> dict[str, float]:
    """Fit decode-step times of tiny models to step + layers x (layer + batch x seq), in milliseconds."""
    rows, times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in OVERHEAD_LAYERS:
            source = _tiny_checkpoint(layers, Path(tmp) / f"l{layers}")
            _decode_step_s(source, 1, dtype, device, threads)  # warm-up: the first engine's steps pay one-off costs
            for batch, step_s in _decode_steps_s(source, OVERHEAD_BATCHES, dtype, device, threads, runs=2).items():
                rows.append([1.0, layers, layers * batch])
                times.append(step_s)
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(times), rcond=None)
    step_s, layer_s, seq_s = (max(0.0, float(c)) for c in coef)
    return {"step_overhead_ms": step_s * 1e3, "layer_overhead_ms": layer_s * 1e3, "seq_overhead_ms": seq_s * 1e3}


def overheads_from_steps(figures: dict[str, Any], spec, dtype_bytes: int, step_s: dict[int, float],
                         context_per_seq: int) -> dict[str, float]:
    """Per-layer and per-sequence overheads (fit_overheads) that make the cost model, with these figures (matmul
    rate, weight-scan bandwidth, step overhead), match decode steps of `spec` on one device: {batch: seconds} with
    `context_per_seq` cached tokens per sequence."""
    from hexgen.cluster import GpuType, Link
    from hexgen.costmodel import CostConfig
    from hexgen.costmodel.stage import stage_cost

    gpu = GpuType("measured", 1e6, 1.0, 1.0, measured_bandwidth_gbs=figures["memory_bandwidth_gbs"],
                  measured_tflops=figures["matmul_tflops"], step_overhead_ms=figures["step_overhead_ms"])
    cost = stage_cost(spec, gpu, 1, spec.num_layers, Link(1.0, 0.0), CostConfig(dtype_bytes=dtype_bytes),
                      is_first=True, is_last=True)
    residual = {b: t - cost.decode_step_s(b, b * context_per_seq) for b, t in step_s.items()}
    return fit_overheads(residual, spec.num_layers)


def fit_overheads(residual_s: dict[int, float], num_layers: int) -> dict[str, float]:
    """Per-layer and per-sequence overheads (ms, never negative) from {batch: measured step - the cost model's
    step} by least squares on residual = fixed + batch x per_seq, each spread over the model's layers."""
    batches = sorted(residual_s)
    rows = np.array([[1.0, b] for b in batches])
    (fixed_s, per_seq_s), *_ = np.linalg.lstsq(rows, np.array([residual_s[b] for b in batches]), rcond=None)
    if per_seq_s < 0:  # the steps grow more slowly with the batch than the model says: no per-sequence overhead
        per_seq_s, fixed_s = 0.0, float(np.mean([residual_s[b] for b in batches]))
    return {"layer_overhead_ms": max(0.0, float(fixed_s)) / num_layers * 1e3,
            "seq_overhead_ms": float(per_seq_s) / num_layers * 1e3}


def fit_batches(device: str) -> tuple[int, ...]:
    """Batch sizes of the model's decode steps that fit_to_model times: a GPU's steps are cheap and the cost of a
    sequence shows only over tens of them (an 8B step on an H200: 5.30 ms at batch 1, 5.38 at 8, 6.43 at 64)."""
    return (1, 8, 64) if device == "cuda" else (1, 8)


def fit_to_model(figures: dict[str, Any], source, dtype: str, device: str, threads: int) -> dict[str, float]:
    """Per-layer and per-sequence overheads that make the cost model match the engine's decode steps on `source`
    (one rank, at fit_batches): what the real model adds beyond its matmuls and weight scan (attention over the
    paged pool, norms, RoPE, sampling, host work around a GPU's graph replay), spread over its layers. The step
    overhead of the tiny fit is kept."""
    measured = _decode_steps_s(source, fit_batches(device), dtype, device, threads, runs=2)
    return overheads_from_steps(figures, source.spec, DTYPES[dtype].itemsize, measured, SERVED_CONTEXT)


def _served_decode_s(source, tp_degrees: list[int], batch: int, dtype: str, threads: int, steps: int = 24) -> float:
    """Median seconds between tokens of `batch` concurrent requests on a local CPU replica of `tp_degrees` stages
    (layers split evenly; one process, or a process per rank with `threads` threads each)."""
    from hexgen.engine.generation import run_requests
    from hexgen.engine.replica import open_local_replica
    from hexgen.plan import single_replica_plan

    replica_plan = single_replica_plan(source.spec, tp_degrees, None).replicas[0]
    config = SchedulerConfig(max_running_seqs=batch, max_context=256)
    replica = open_local_replica(source, replica_plan, dtype, "cpu", config, (), threads or None)
    params = SamplingParams(max_new_tokens=steps + 1, ignore_eos=True)
    try:
        replica.start()
        run_requests(replica, [GenerationRequest("warm", tuple(range(10, 18)), SamplingParams(max_new_tokens=3))])
        runs = []
        for attempt in range(2):  # the faster of two: other work on the machine only ever adds time
            requests = [GenerationRequest(f"a{attempt}-{i}", tuple(range(10, 18)), params) for i in range(batch)]
            runs.append(statistics.median(c.decode_s_per_token for c in run_requests(replica, requests)))
    finally:
        replica.close()
    return min(runs)


def colocated_handoff_ms(source, dtype: str, threads: int) -> dict[str, float]:
    """What a decode step costs beyond one process when the model runs as two stages taking turns on this machine
    (plan and activations over gloo, the other process waking): fitted to handoff + batch x handoff_seq."""
    extra = {b: _served_decode_s(source, [1, 1], b, dtype, threads) - _served_decode_s(source, [1], b, dtype, threads)
             for b in HANDOFF_BATCHES}
    low, high = HANDOFF_BATCHES
    per_seq_s = max(0.0, (extra[high] - extra[low]) / (high - low))
    return {"colocated_handoff_ms": max(0.0, extra[low] - low * per_seq_s) * 1e3,
            "colocated_handoff_seq_ms": per_seq_s * 1e3}


def served_allreduce_ms(figures: dict[str, Any], source, dtype: str) -> dict[int, float]:
    """{t: fixed ms of one decode all-reduce over t ranks} for each valid TP degree 2..MAX_SERVED_TP of the model,
    fitted to the model served as one TP-t stage of `threads`-thread ranks on this machine's cores at batch 1:
    served step / waves = compute (the cost model with these figures and a free all-reduce) + 2 x layers x it."""
    from dataclasses import replace

    from hexgen.cluster import GpuType
    from hexgen.costmodel import CostConfig
    from hexgen.costmodel.stage import stage_cost
    from hexgen.profile import profile_from_dict
    from hexgen.sim.host import pace

    cores = usable_cores()
    spec, cfg = source.spec, CostConfig(dtype_bytes=DTYPES[dtype].itemsize)
    degrees = [t for t in spec.valid_tp_degrees(MAX_SERVED_TP) if t > 1]
    base = profile_from_dict({**figures, "device_type": "measured"}).applied_to(
        {"measured": GpuType("measured", 1e6, 1.0, 1.0)}, "measured profile")
    out = {}
    for t in degrees:
        gpu = replace(base, allreduce_ms_by_ranks=((t, 0.0),))
        compute = stage_cost(spec, gpu, t, spec.num_layers, base.allreduce_link, cfg, is_first=True, is_last=True)
        served_s = _served_decode_s(source, [t], 1, dtype, figures["threads"])
        waves = pace(cores, t * figures["threads"], cores)
        out[t] = max(0.0, served_s / waves - compute.decode_step_s(1, SERVED_CONTEXT)) / (2 * spec.num_layers) * 1e3
    return out


def link_figures(hidden: int, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """All-reduce over two ranks and one-way sends, fitted to latency + bytes / bandwidth (gloo on loopback).
    Each is the fastest of LINK_ROUNDS rounds with fresh processes: on the 2-core EPYC a round's median all-reduce
    came out either near 0.4 ms or near 3 ms (a round whose processes the kernel left sharing a core)."""
    rounds = [measure_collectives(2, hidden, list(LINK_TOKENS), dtype) for _ in range(LINK_ROUNDS)]
    measured = {key: min(r[key] for r in rounds) for key in rounds[0]}
    element = torch.tensor([], dtype=dtype).element_size()
    small, large = (t * hidden * element for t in LINK_TOKENS)

    def fit(kind: str, latency_factor: float) -> dict[str, float]:
        t_small, t_large = measured[(kind, LINK_TOKENS[0])], measured[(kind, LINK_TOKENS[1])]
        per_byte = max((t_large - t_small) / (large - small), 1e-15)
        latency = max(0.0, (t_small - small * per_byte) / latency_factor)
        return {"latency_ms": round(latency * 1e3, 5), "bandwidth_gbps": round(8 / per_byte / 1e9, 3)}

    return {"allreduce": {**fit("all_reduce", 2.0), "ranks": 2}, "transfer": fit("p2p", 1.0)}


def _lscpu_summary() -> str:
    """lscpu's model name, cores and the vector / matrix extensions that decide CPU matmul speed."""
    import subprocess

    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return "lscpu unavailable"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    vector = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return (f"{fields.get('Model name', '?').strip()}; {fields.get('CPU(s)', '?').strip()} CPUs; "
            f"flags: {' '.join(vector) or 'no AVX'}")


def measure_profile(device_type: str, dtype: str, device: str, describe: str, threads: int = 0,
                    model: str | None = None) -> dict[str, Any]:
    """Every figure of a profile file, as written by `hexgen profile`; `threads` torch threads (0: torch's default,
    which is what a one-rank replica gets; a rank of a W-rank replica gets cores / W)."""
    if threads:
        torch.set_num_threads(threads)
    torch_device = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
    torch_dtype = DTYPES[dtype]
    big = device == "cuda"
    out: dict[str, Any] = {
        "format": "hexgen-profile/1", "device_type": device_type, "device": describe, "backend": device,
        "dtype": dtype, "measured_at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch_version": str(torch.__version__), "cpu": _lscpu_summary(), "threads": torch.get_num_threads(),
        "matmul_tflops": round(matmul_tflops(torch_device, torch_dtype, 8192 if big else 1024), 4),
        "memory_bandwidth_gbs": round(weight_scan_gbs(torch_device, torch_dtype, (2 << 30) if big else (256 << 20)), 3),
    }
    out |= {k: round(v, 4) for k, v in engine_overheads_ms(dtype, device, threads).items()}
    # engine/commbench.py times gloo over loopback on CPU tensors: a CPU's own figures, not a GPU's (NVLink / PCIe
    # over NCCL), so a GPU profile leaves the links to the cluster file rather than price TP by a CPU's TCP
    links_measured = device != "cuda"
    if links_measured:
        out |= link_figures(4096, torch_dtype)
    if model is not None:
        from hexgen.engine.checkpoint import resolve_model

        source = resolve_model(model)
        out |= {k: round(v, 4) for k, v in fit_to_model(out, source, dtype, device, threads).items()}
        if device == "cpu" and source.spec.num_layers >= 2:
            out |= {k: round(v, 4) for k, v in colocated_handoff_ms(source, dtype, threads).items()}
            by_ranks = served_allreduce_ms(out, source, dtype)
            if by_ranks:
                out["allreduce_ms_by_ranks"] = {t: round(ms, 4) for t, ms in by_ranks.items()}
        out["calibrated_on"] = model
    links = ("links: 2 ranks, [1 and 512, 4096] messages" if links_measured
             else "links: not measured on GPUs (gloo on the CPU is all this times; the cluster file's links apply)")
    handoff = (f"; co-located handoff: the model as TP 1 | TP 1 vs one process, batch {HANDOFF_BATCHES}"
               if "colocated_handoff_ms" in out else "")
    by_degree = ("; all-reduce by degree: the model served as one TP-t stage, batch 1"
                 if "allreduce_ms_by_ranks" in out else "")
    out["method"] = (f"matmul {'8192' if big else '1024'}^2; weight scan = matrix-vector product over "
                     f"{'2 GiB' if big else '256 MiB'}; overheads fitted on the engine's decode steps of tiny Llamas "
                     f"({OVERHEAD_LAYERS} layers x batch {OVERHEAD_BATCHES}); {links}{handoff}{by_degree}")
    return out
