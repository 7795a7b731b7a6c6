"""Decode steps at several batch sizes on one device: hexgen beside HF, the bandwidth floor, kernels per layer.

For a batch of B identical prompts, every sequence is prefilled first; then decode steps are timed while
all B sequences decode, and a few more run under torch.profiler: what each step launches, how long the device
is busy, and which kernels take the time. HF
`generate` runs the same batch (decode time = (time of n + 1 tokens - time of 1 token) / n). The floor is
the bytes one decode step must read (every weight except an untied embedding table, which is only
gathered, plus each sequence's cached keys and values) over the device's measured copy bandwidth.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

from hexgen.engine.bench import (
    BENCH_MARGIN_TOKENS,
    BenchConfig,
    HexgenSingle,
    HFGenerate,
    bench_block_size,
    prompt_ids,
)
from hexgen.engine.checkpoint import ModelSource
from hexgen.engine.engine import Engine
from hexgen.engine.messages import GenerationRequest, SamplingParams
from hexgen.engine.scheduler import SchedulerConfig
from hexgen.errors import UserError
from hexgen.models import ModelSpec

PROFILED_STEPS = 3
TOP_KERNELS = 8  # kernels (ops) listed per profiled batch size
NAME_CHARS = 70  # kernel names are cut to this many characters (templated GEMM names run to hundreds)


@dataclass(frozen=True)
class KernelShare:
    """One kernel (CUDA) or top-level torch op (CPU) name's share of a decode step."""

    name: str
    ms_per_step: float
    calls_per_step: float


@dataclass(frozen=True)
class StepProfile:
    """What torch.profiler saw over some decode steps, per step."""

    ops: float  # CUDA: kernels launched (copies and memsets not counted); CPU: top-level torch ops
    busy_ms: float  # their summed durations: the device's busy time (CUDA) or the time inside torch ops (CPU)
    largest: tuple[KernelShare, ...]  # the TOP_KERNELS names with the most time, largest first


@dataclass(frozen=True)
class StepTiming:
    batch: int
    hexgen_ms: float  # one decode step of the whole batch
    serial_ms: float | None  # the same with steps in series, where the engine overlaps them (CUDA); else None
    hf_ms: float
    floor_ms: float
    hexgen_ops_per_layer: float  # per step / layers, embedding, head and sampling included. CUDA: kernels;
    # CPU: top-level torch ops
    profile: StepProfile  # torch.profiler over a few more steps of the same batch


@dataclass(frozen=True)
class BatchedResult:
    device_name: str
    copy_gbps: float  # bytes read + written per second by a device-to-device copy, in GB/s
    weight_bytes_read: int  # per decode step
    rows: list[StepTiming]
    engine_mode: str = ""  # how hexgen ran its decode steps, e.g. "CUDA graphs, Triton kernels"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"


def copy_gbps(device: torch.device, size_bytes: int, repeats: int = 10) -> float:
    """Read + write bandwidth of a plain copy of `size_bytes` on `device` (median of `repeats`), GB/s."""
    src = torch.ones(size_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size_bytes / statistics.median(times) / 1e9


def weight_bytes_read(spec: ModelSpec, dtype_bytes: int) -> int:
    """Weights a decode step reads: all layers, the final norm and the LM head (tied or not)."""
    return (spec.num_layers * spec.params_per_layer + spec.hidden_size + spec.embedding_params) * dtype_bytes


def kv_bytes_read(spec: ModelSpec, dtype_bytes: int, batch: int, context: int) -> int:
    return batch * context * spec.num_layers * spec.kv_bytes_per_token(dtype_bytes)


def batch_bytes(spec: ModelSpec, dtype_bytes: int, batch: int, context: int) -> int:
    """What decoding `batch` sequences of `context` tokens holds at least, in either engine: the weights, the KV
    cache, and the step's logits in fp32 twice (the logits and the softmax or sort over them)."""
    return (weight_bytes_read(spec, dtype_bytes) + kv_bytes_read(spec, dtype_bytes, batch, context)
            + 2 * batch * spec.vocab_size * 4)


def free_bytes(device: torch.device) -> int:
    """Memory free for the benchmark: the GPU's free memory, or the host's free pages."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_batch_memory(spec: ModelSpec, dtype_bytes: int, batches: list[int], context: int, free: int) -> None:
    """Refuse batch sizes whose decode cannot fit in `free` bytes, before any model is built (a batch of 100,000
    failed with an allocator traceback)."""
    largest = max(batches)
    need = batch_bytes(spec, dtype_bytes, largest, context)
    if need <= free:
        return
    fits, too_big = 0, largest  # bisection: the largest batch that fits (0: none), in log2(largest) steps
    while too_big - fits > 1:
        middle = (fits + too_big) // 2
        fits, too_big = (middle, too_big) if batch_bytes(spec, dtype_bytes, middle, context) <= free else (fits, middle)
    raise UserError(
        f"--batch-sizes {largest}: decoding it needs at least {need / 2**30:.1f} GiB (weights, the KV cache of "
        f"{context} tokens a sequence, logits), and {free / 2**30:.1f} GiB is free here; no batch above {fits} fits"
    )


def profile_steps(run, device: torch.device, steps: int) -> StepProfile:
    """Profile `run()` (which runs `steps` decode steps): kernels on CUDA (copies and memsets not counted),
    top-level torch ops on CPU; counts and times per step."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
        synchronize(device)
    events = prof.events()
    if device.type == "cuda":
        chosen = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                  and not e.name.startswith(("Memcpy", "Memset"))]
    else:  # the ops called from Python (aten and mkldnn alike), not what they call
        chosen = [e for e in events if e.cpu_parent is None]
    by_name: dict[str, list[float]] = {}  # name -> [microseconds, calls]
    for event in chosen:
        totals = by_name.setdefault(event.name[:NAME_CHARS], [0.0, 0])
        totals[0] += event.time_range.elapsed_us()
        totals[1] += 1
    largest = sorted(by_name.items(), key=lambda item: -item[1][0])[:TOP_KERNELS]
    return StepProfile(
        ops=len(chosen) / steps,
        busy_ms=sum(us for us, _ in by_name.values()) / steps / 1000,
        largest=tuple(KernelShare(name, us / steps / 1000, calls / steps) for name, (us, calls) in largest),
    )


def start_decoding(engine: Engine, ids: list[int], batch: int, decode_steps: int) -> list[str]:
    """Submit `batch` requests of prompt `ids` and step the engine until each has its first token, so that every
    following step decodes all of them (for at least `decode_steps` steps). Returns their request ids."""
    prefill_steps = -(-batch * len(ids) // engine.scheduler.config.max_step_tokens) + 1  # chunked prefill, at most
    params = SamplingParams(max_new_tokens=prefill_steps + decode_steps + 2, ignore_eos=True)
    request_ids = [f"b{batch}-{i}" for i in range(batch)]
    for request_id in request_ids:
        engine.add(GenerationRequest(request_id, tuple(ids), params))
    started: set[str] = set()
    for _ in range(4 * prefill_steps + 16):
        started.update(event.request_id for event in engine.step())
        if len(started) == batch:
            return request_ids
    raise RuntimeError(f"only {len(started)} of {batch} sequences started; is the KV pool big enough?")


def stop_decoding(engine: Engine, request_ids: list[str]) -> None:
    """Abort the requests and step until the engine is idle again."""
    for request_id in request_ids:
        engine.abort(request_id)
    while engine.has_work:
        engine.step()


def hexgen_decode(engine: Engine, ids: list[int], batch: int, steps: int, device: torch.device
                  ) -> tuple[float, float | None, StepProfile]:
    """(seconds of a decode step with `batch` sequences decoding; the same with the engine's steps in series where
    it overlaps them by default, else None; a profile of a few more steps). See _timed_steps."""
    request_ids = start_decoding(engine, ids, batch, steps + PROFILED_STEPS)
    step_s = _timed_steps(engine, steps, device)
    profiled = profile_steps(lambda: [engine.step() for _ in range(PROFILED_STEPS)], device, PROFILED_STEPS)
    stop_decoding(engine, request_ids)
    serial_s = None
    if engine.overlap:
        engine.set_overlap(False)
        request_ids = start_decoding(engine, ids, batch, steps)
        serial_s = _timed_steps(engine, steps, device)
        stop_decoding(engine, request_ids)
        engine.set_overlap(True)
    return step_s, serial_s, profiled


def _timed_steps(engine: Engine, steps: int, device: torch.device) -> float:
    """Seconds of one of `steps` decode steps: steps in series, the median step, each timed from one device
    synchronization to the next (robust to a noisy machine); overlapped steps, the mean over the run, timed as a
    whole (synchronizing around each step would keep it from overlapping the next)."""
    if engine.overlap:
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        synchronize(device)
        return (time.perf_counter() - start) / steps
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        engine.step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_decode(hf: HFGenerate, ids: list[int], batch: int, steps: int, repeats: int, device: torch.device) -> float:
    """Median seconds of one decode step of HF `generate` with `batch` identical prompts."""
    x = torch.tensor([ids] * batch, device=device)

    def generate_s(n: int) -> float:
        synchronize(device)
        start = time.perf_counter()
        hf.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
        synchronize(device)
        return time.perf_counter() - start

    generate_s(2)  # warm-up: allocations, kernel choices
    return statistics.median((generate_s(steps + 1) - generate_s(1)) / steps for _ in range(repeats))


def run_batched(
    source: ModelSource, cfg: BenchConfig, device: torch.device, batches: list[int], progress
) -> BatchedResult:
    """Both engines at every batch size, one engine at a time so each has the device's memory to itself."""
    spec, dtype_bytes = source.spec, torch.finfo(getattr(torch, cfg.dtype)).bits // 8
    context = cfg.prompt_tokens + cfg.new_tokens + 64  # covers prefill, the timed steps and the profiled ones
    check_batch_memory(spec, dtype_bytes, batches, context, free_bytes(device))
    ids = prompt_ids(source, cfg.prompt_tokens)
    bandwidth = copy_gbps(device, 2**30 if device.type == "cuda" else 2**28)

    hf = HFGenerate(source, cfg.dtype, device.type)
    hf_s = {}
    for batch in batches:
        hf_s[batch] = hf_decode(hf, ids, batch, cfg.new_tokens, cfg.repeats, device)
        progress()
    del hf
    if device.type == "cuda":
        torch.cuda.empty_cache()

    config = SchedulerConfig(max_running_seqs=max(batches), max_context=cfg.prompt_tokens + cfg.new_tokens
                             + BENCH_MARGIN_TOKENS, enforce_eager=cfg.enforce_eager,
                             block_size=bench_block_size(source.spec, cfg, device.type))
    single = HexgenSingle(source, cfg.dtype, device.type, config)
    hexgen_decode(single.engine, ids, 2, 2, device)  # warm-up: allocations, kernel compiles
    rows = []
    for batch in batches:
        step_s, serial_s, profiled = hexgen_decode(single.engine, ids, batch, cfg.new_tokens, device)
        mean_context = cfg.prompt_tokens + cfg.new_tokens // 2
        floor_bytes = weight_bytes_read(spec, dtype_bytes) + kv_bytes_read(spec, dtype_bytes, batch, mean_context)
        serial_ms = None if serial_s is None else 1000 * serial_s
        rows.append(StepTiming(batch, 1000 * step_s, serial_ms, 1000 * hf_s[batch],
                               1000 * floor_bytes / (bandwidth * 1e9), profiled.ops / spec.num_layers, profiled))
        progress()
    return BatchedResult(device_name(device), bandwidth, weight_bytes_read(spec, dtype_bytes), rows,
                         engine_mode(single.engine))


def engine_mode(engine: Engine) -> str:
    """How an engine runs its decode steps: graphs or eager; Triton kernels, or torch ops with or without the CPU
    attention kernel."""
    runner = engine.runner
    steps = "CUDA graphs" if runner.graphs is not None else "eager"
    overlap = ", steps overlapped" if engine.overlap else ""
    ops = "Triton kernels" if runner.use_kernel else "torch ops"
    if runner.attention_kernel is not None:
        ops += " + CPU attention kernel"
    return f"{steps}, {ops}{overlap}"
