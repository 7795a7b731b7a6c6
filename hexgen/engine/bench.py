"""`hexgen bench engine`: hexgen's engine beside HF transformers in one run, plus what splitting costs.

Reported, all on the same model, dtype and machine:
  - prefill tokens/s and decode ms/token at batch 1 of the single-process engine and of HF `generate`
    (runs interleaved, median of repeats, so machine noise hits both alike);
  - decode ms/token of multi-process layouts (e.g. TP [1 1], [3], [3 1]);
  - the raw cost of one stage boundary (send/recv of [T, H]) and of one TP all-reduce of [T, H].
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass

import torch

from hexgen.engine.checkpoint import ModelSource
from hexgen.engine.commbench import measure_collectives
from hexgen.engine.engine import DTYPES, Engine, build_runner, init_rank
from hexgen.engine.generation import run_requests
from hexgen.engine.messages import GenerationRequest, SamplingParams
from hexgen.engine.replica import open_local_replica
from hexgen.engine.scheduler import SchedulerConfig, default_block_size
from hexgen.errors import UserError
from hexgen.launch.spec import Layout, RankSpec
from hexgen.models import ModelSpec
from hexgen.plan import single_replica_plan


@dataclass(frozen=True)
class BenchConfig:
    prompt_tokens: int = 128
    new_tokens: int = 32
    repeats: int = 3
    dtype: str = "float32"
    layouts: tuple[tuple[tuple[int, ...], tuple[int, ...] | None], ...] = ()
    enforce_eager: bool = False  # CUDA: no graphs for decode steps


BENCH_CONTEXT = 4096  # the engines' context in a benchmark, unless its tokens need more
BENCH_MARGIN_TOKENS = 128  # past the timed tokens: the decode-step table profiles a few more steps


def bench_context(spec: ModelSpec, cfg: BenchConfig) -> int:
    """The context hexgen's engine is built with for a run: room for the prompt, the new tokens and a margin, at
    least BENCH_CONTEXT, within the model's own. A run that does not fit is refused before anything is timed."""
    needed = cfg.prompt_tokens + cfg.new_tokens + BENCH_MARGIN_TOKENS
    if needed > spec.max_context:
        raise UserError(
            f"--prompt-tokens {cfg.prompt_tokens} + --new-tokens {cfg.new_tokens} do not fit {spec.name}'s context of "
            f"{spec.max_context} tokens (together at most {spec.max_context - BENCH_MARGIN_TOKENS})"
        )
    return min(spec.max_context, max(BENCH_CONTEXT, needed))


def bench_block_size(spec: ModelSpec, cfg: BenchConfig, device: str) -> int:
    """The KV block size `hexgen serve` and `generate` would use here (engine/scheduler.py:default_block_size)."""
    return default_block_size(device, spec.head_dim, DTYPES[cfg.dtype].itemsize)


@dataclass(frozen=True)
class Timing:
    name: str
    prefill_tok_s: float
    decode_ms_per_token: float


def prompt_ids(source: ModelSource, n: int) -> list[int]:
    # A fixed, varied id sequence: the benchmark measures speed, not text.
    return [(17 * i + 101) % (source.spec.vocab_size - 200) + 100 for i in range(n)]


class HexgenSingle:
    def __init__(self, source: ModelSource, dtype: str, device: str, config: SchedulerConfig):
        layout = Layout((1,), ((0, source.spec.num_layers),))
        spec = RankSpec(source, layout, 0, dtype, device)
        self.engine = Engine.create(build_runner(spec, init_rank(spec), config), config, ())

    def prefill_s(self, ids: list[int]) -> float:
        self.engine.add(GenerationRequest("p", tuple(ids), SamplingParams(max_new_tokens=1)))
        start = time.perf_counter()
        while self.engine.has_work:
            self.engine.step()
        return time.perf_counter() - start

    def decode_s_per_token(self, ids: list[int], n: int) -> float:
        self.engine.add(GenerationRequest("d", tuple(ids), SamplingParams(max_new_tokens=n + 1, ignore_eos=True)))
        self.engine.step()  # prefill + first token
        start = time.perf_counter()
        while self.engine.has_work:
            self.engine.step()
        return (time.perf_counter() - start) / n


class HFGenerate:
    def __init__(self, source: ModelSource, dtype: str, device: str = "cpu"):
        from transformers import AutoModelForCausalLM

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(str(source.directory), dtype=DTYPES[dtype])
        self.model = model.to(device).eval()
        self.device = device

    def _generate_s(self, ids: list[int], n: int) -> float:
        x = torch.tensor([ids], device=self.device)
        start = time.perf_counter()
        self.model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )
        return time.perf_counter() - start

    def prefill_s(self, ids: list[int]) -> float:
        return self._generate_s(ids, 1)

    def decode_s_per_token(self, ids: list[int], n: int) -> float:
        return (self._generate_s(ids, n + 1) - self._generate_s(ids, 1)) / n


def compare_single(source: ModelSource, cfg: BenchConfig, progress) -> list[Timing]:
    ids = prompt_ids(source, cfg.prompt_tokens)
    engines = {
        "hexgen (1 process)": HexgenSingle(source, cfg.dtype, "cpu", SchedulerConfig(
            max_context=bench_context(source.spec, cfg), block_size=bench_block_size(source.spec, cfg, "cpu"))),
        "HF transformers generate": HFGenerate(source, cfg.dtype),
    }
    prefill: dict[str, list[float]] = {k: [] for k in engines}
    decode: dict[str, list[float]] = {k: [] for k in engines}
    for engine in engines.values():  # warm-up: first calls allocate and pick kernels
        engine.prefill_s(ids[:8])
    for _ in range(cfg.repeats):
        for name, engine in engines.items():
            prefill[name].append(engine.prefill_s(ids))
            decode[name].append(engine.decode_s_per_token(ids, cfg.new_tokens))
            progress()
    return [
        Timing(n, cfg.prompt_tokens / statistics.median(prefill[n]), 1000 * statistics.median(decode[n]))
        for n in engines
    ]


def time_layout(source: ModelSource, cfg: BenchConfig, tp: tuple[int, ...], layers: tuple[int, ...] | None) -> Timing:
    plan = single_replica_plan(source.spec, list(tp), list(layers) if layers else None)
    replica_plan = plan.replicas[0]
    config = SchedulerConfig(max_context=bench_context(source.spec, cfg),
                             block_size=bench_block_size(source.spec, cfg, "cpu"))
    replica = open_local_replica(source, replica_plan, cfg.dtype, "cpu", config, ())
    ids = prompt_ids(source, cfg.prompt_tokens)
    try:
        replica.start()
        params = SamplingParams(max_new_tokens=cfg.new_tokens + 1, ignore_eos=True)
        run_requests(replica, [GenerationRequest("warm", tuple(ids[:8]), SamplingParams(max_new_tokens=2))])
        runs = [run_requests(replica, [GenerationRequest(f"r{i}", tuple(ids), params)])[0] for i in range(cfg.repeats)]
    finally:
        replica.close()
    name = "TP " + " ".join(map(str, tp)) + " / layers " + " ".join(str(s.num_layers) for s in replica_plan.stages)
    ttft = statistics.median(c.ttft_s for c in runs)
    return Timing(name, cfg.prompt_tokens / ttft, 1000 * statistics.median(c.decode_s_per_token for c in runs))


def collective_costs(source: ModelSource, cfg: BenchConfig, tp_degree: int) -> list[tuple[str, int, float]]:
    """(operation, T, median seconds) for the stage boundary and the all-reduce over 2 and `tp_degree` ranks."""
    tokens = [1, cfg.prompt_tokens]
    dtype, hidden = DTYPES[cfg.dtype], source.spec.hidden_size
    pair = measure_collectives(2, hidden, tokens, dtype)
    rows = [("stage boundary: leader -> next leader", t, pair[("p2p", t)]) for t in tokens]
    rows += [("TP all-reduce, 2 ranks", t, pair[("all_reduce", t)]) for t in tokens]
    if tp_degree > 2:
        wide = measure_collectives(tp_degree, hidden, tokens, dtype)
        rows += [(f"TP all-reduce, {tp_degree} ranks", t, wide[("all_reduce", t)]) for t in tokens]
    return rows
