"""Server test setup: a tiny random Llama with SmolLM2's real tokenizer, the engine's one-process greedy output
as the reference, and `hexgen serve` subprocesses that are always stopped (and checked to leave no process)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from serve_helpers import EOS_AT, EOS_PROMPT, MAX_POSITIONS


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    """LlamaForCausalLM (64 hidden, 4 layers, 4 heads / 2 KV heads, random weights) with SmolLM2's tokenizer and
    chat template. Its EOS id is the EOS_AT-th greedy token after EOS_PROMPT (per transformers), so
    finish_reason "stop" can be checked."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hexgen.engine.checkpoint import resolve_model
    from hexgen.tokenizer import Tokenizer

    tokenizer_dir = resolve_model("smollm2-135m", progress=False).directory
    torch.manual_seed(7)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=0.3,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.tensor([Tokenizer(tokenizer_dir).encode(EOS_PROMPT)])
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=EOS_AT, do_sample=False)[0, ids.shape[1] :].tolist()
    assert greedy[-1] not in greedy[:-1], "pick another seed: the EOS token would come earlier"
    model.config.eos_token_id = greedy[-1]
    model.generation_config.eos_token_id = greedy[-1]
    out = tmp_path_factory.mktemp("server-model") / "tiny-chat"
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


class Reference:
    """Greedy output of the engine in this process on one rank (the reference for every served layout),
    one request at a time."""

    def __init__(self, model_dir: Path):
        from hexgen.engine.checkpoint import eos_token_ids, resolve_model
        from hexgen.engine.replica import open_local_replica
        from hexgen.engine.scheduler import SchedulerConfig
        from hexgen.plan import single_replica_plan
        from hexgen.tokenizer import Tokenizer

        source = resolve_model(str(model_dir))
        plan = single_replica_plan(source.spec, [1], None)
        self.tokenizer = Tokenizer(model_dir)
        self.replica = open_local_replica(
            source,
            plan.replicas[0],
            "float32",
            "cpu",
            SchedulerConfig(4, max_context=512),
            eos_token_ids(model_dir),
        )
        self.replica.start()
        self._cache: dict = {}

    def complete(self, prompt_ids: list[int], max_tokens: int, stop: tuple[str, ...] = (), ignore_eos: bool = False):
        """Completion(token_ids, text, finish_reason) of one request run alone."""
        import torch

        from hexgen.engine.generation import run_requests
        from hexgen.engine.messages import GenerationRequest, SamplingParams
        from hexgen.textstream import TextStream

        key = (tuple(prompt_ids), max_tokens, stop, ignore_eos)
        if key not in self._cache:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # a tiny model: one thread is several times faster on a busy 2-core CI box
            params = SamplingParams(max_new_tokens=max_tokens, temperature=0.0, ignore_eos=ignore_eos)
            request = GenerationRequest(f"ref-{len(self._cache)}", tuple(prompt_ids), params)
            streams = {request.request_id: TextStream(self.tokenizer, stop)}
            self._cache[key] = run_requests(self.replica, [request], streams)[0]
            while self.replica.engine.has_work:  # an early stop leaves an abort event to drain
                self.replica.poll()
            torch.set_num_threads(threads)
        return self._cache[key]

    def text(self, prompt: str, max_tokens: int, **kwargs):
        return self.complete(self.tokenizer.encode(prompt), max_tokens, **kwargs)


@pytest.fixture(scope="session")
def reference(chat_model_dir) -> Reference:
    return Reference(chat_model_dir)
