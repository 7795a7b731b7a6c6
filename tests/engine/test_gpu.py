"""CUDA tests: a random word-tokenizer model on 1 and 2 GPUs (NCCL) gives the CPU run's greedy text; CUDA graphs
give the eager run's tokens; torch's ops give the Triton kernels' tokens; a one-GPU replica runs on its own GPU."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import run_cli

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def word_model_dir(tmp_path_factory):
    """A random 4-layer Llama (GQA 4) with a word-level tokenizer of its vocabulary (`w<i>` is token i): text
    prompts without the embedded model, which a GPU machine may lack."""
    from hexgen.engine.bench_shapes import build_random_checkpoint

    directory = tmp_path_factory.mktemp("word-llama") / "model"
    torch.manual_seed(11)
    build_random_checkpoint("tiny", torch.float32, torch.device("cpu"), directory)
    return directory


@pytest.mark.parametrize("layout", [["--tp", "1"], ["--tp", "1", "1"], ["--tp", "2"]])
def test_cuda_matches_cpu(layout, word_model_dir):
    if torch.cuda.device_count() < sum(int(t) for t in layout[1:]):
        pytest.skip("not enough GPUs for this layout")
    args = ["--model", str(word_model_dir), "--prompt", "w5 w17 w300 w9 w1000", "--max-new-tokens", "8",
            "--ignore-eos", *layout]
    code_cpu, out_cpu, err_cpu, _ = run_cli(args)
    code_gpu, out_gpu, err_gpu, left = run_cli([*args, "--device", "cuda"])
    assert code_cpu == 0 and code_gpu == 0, err_cpu + err_gpu
    assert out_gpu == out_cpu and out_cpu.strip()
    assert left == []


@pytest.mark.parametrize("split_min_positions", [None, 16], ids=["default", "key-splits"])
def test_cuda_graphs_match_eager(tiny_model_dirs, monkeypatch, split_min_positions):
    """Decode steps replayed from CUDA graphs give the eager run's greedy tokens (batches of several buckets). With
    key ranges of >= 16 positions (the default, 256, never splits a 64-token context), decode steps split each
    sequence's keys: the graphs with the count their capture chose for the context limit, eager steps with the
    count for their own."""
    from engine_helpers import greedy_requests, random_prompts, run_in_process

    from hexgen.engine.checkpoint import resolve_model
    from hexgen.engine.kernels import attention
    from hexgen.engine.scheduler import SchedulerConfig

    if split_min_positions is not None:
        monkeypatch.setattr(attention, "SPLIT_MIN_POSITIONS", split_min_positions)
        assert attention.choose_kv_splits(1, 1, 64, torch.device("cuda")) > 1

    source = resolve_model(str(tiny_model_dirs["gqa"]), progress=False)
    requests = greedy_requests(random_prompts(source.spec.vocab_size, [5, 9, 3, 12, 7], seed=2), 12)
    config = SchedulerConfig(max_running_seqs=8, max_context=64)
    graphs, _ = run_in_process(source, requests, config, device="cuda")
    eager, _ = run_in_process(source, requests, SchedulerConfig(max_running_seqs=8, max_context=64,
                                                                 enforce_eager=True), device="cuda")
    cpu, _ = run_in_process(source, requests, config)
    assert graphs == eager == cpu


def test_cuda_graphs_match_eager_as_sequences_come_and_go(tiny_model_dirs):
    """Sequences of unequal lengths finish at different steps, so a graph row later holds a shorter sequence's
    table than before (4-token blocks: wide tables): only the columns the batch fills are copied in, and the
    tokens still equal the eager run's and the CPU's."""
    from engine_helpers import random_prompts, run_in_process

    from hexgen.engine.checkpoint import resolve_model
    from hexgen.engine.messages import GenerationRequest, SamplingParams
    from hexgen.engine.scheduler import SchedulerConfig

    source = resolve_model(str(tiny_model_dirs["gqa"]), progress=False)
    prompts = random_prompts(source.spec.vocab_size, [30, 5, 9, 3, 12, 7], seed=3)
    requests = [GenerationRequest(f"r{i}", tuple(p), SamplingParams(max_new_tokens=n, ignore_eos=True))
                for i, (p, n) in enumerate(zip(prompts, [3, 12, 4, 20, 6, 16], strict=True))]
    config = SchedulerConfig(max_running_seqs=8, max_context=64, block_size=4)
    graphs, _ = run_in_process(source, requests, config, device="cuda")
    eager, _ = run_in_process(source, requests, SchedulerConfig(max_running_seqs=8, max_context=64, block_size=4,
                                                                 enforce_eager=True), device="cuda")
    cpu, _ = run_in_process(source, requests, config)
    assert graphs == eager == cpu


def test_torch_path_on_cuda_matches_the_kernels(tiny_model_dirs, monkeypatch):
    """HEXGEN_TRITON=0 keeps CUDA on torch's ops (attention as a gather through the block tables + SDPA; no CUDA
    graphs, which need the kernels): the Triton kernels' greedy tokens and the CPU's."""
    from engine_helpers import greedy_requests, random_prompts, run_in_process

    from hexgen.engine import ops
    from hexgen.engine.checkpoint import resolve_model
    from hexgen.engine.scheduler import SchedulerConfig

    source = resolve_model(str(tiny_model_dirs["gqa"]), progress=False)
    requests = greedy_requests(random_prompts(source.spec.vocab_size, [5, 9, 3, 12, 7], seed=4), 12)
    config = SchedulerConfig(max_running_seqs=8, max_context=64)
    kernels, _ = run_in_process(source, requests, config, device="cuda")
    monkeypatch.setattr(ops, "_triton_ready", lambda: False)  # what HEXGEN_TRITON=0 makes kernels.available say
    torch_ops, _ = run_in_process(source, requests, config, device="cuda")
    assert torch_ops == kernels == run_in_process(source, requests, config)[0]


def test_a_one_gpu_replica_runs_on_its_own_gpu(tiny_model_dirs):
    """A replica of one rank on GPU 1 (as a data-parallel plan places them) keeps its weights, pool and steps
    there: GPU 0's memory is as before, and the tokens are the CPU's."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from engine_helpers import greedy_requests, random_prompts, run_in_process

    from hexgen.engine.checkpoint import resolve_model
    from hexgen.engine.scheduler import SchedulerConfig

    source = resolve_model(str(tiny_model_dirs["gqa"]), progress=False)
    requests = greedy_requests(random_prompts(source.spec.vocab_size, [5, 9, 3], seed=5), 12)
    config = SchedulerConfig(max_running_seqs=4, max_context=64)
    torch.cuda.synchronize(0)
    before = torch.cuda.memory_allocated(0)
    try:
        on_gpu1, _ = run_in_process(source, requests, config, device="cuda", gpu_index=1)
    finally:
        torch.cuda.set_device(0)
    assert torch.cuda.memory_allocated(0) == before
    assert on_gpu1 == run_in_process(source, requests, config)[0]
