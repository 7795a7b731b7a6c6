"""Turn `hexgen generate` arguments into a checked job; every check runs before a process starts."""

from __future__ import annotations

import argparse
import sys
import uuid
from dataclasses import dataclass

from rich.console import Console
from rich.progress import Progress

from hexgen.commands.engine_args import check_engine_args, check_memory, scheduler_config
from hexgen.engine.checkpoint import ModelSource, embedded_spec, eos_token_ids, resolve_model
from hexgen.engine.generation import Completion, run_requests
from hexgen.engine.messages import GenerationRequest, SamplingParams
from hexgen.engine.scheduler import SchedulerConfig
from hexgen.errors import ConfigError, UserError
from hexgen.plan import Replica, single_replica_plan
from hexgen.textstream import TextStream
from hexgen.tokenizer import Tokenizer


def load_tokenizer(source: ModelSource) -> Tokenizer:
    if not source.has_tokenizer:
        raise ConfigError(f"{source.directory} has no tokenizer (tokenizer.json); text prompts need one")
    return Tokenizer(source.directory)


def encode_prompts(tokenizer: Tokenizer, prompts: list[str], chats: list[str]) -> list[list[int]]:
    encoded = [tokenizer.encode(text) for text in prompts]
    encoded += [tokenizer.apply_chat_template([{"role": "user", "content": text}]) for text in chats]
    return encoded


@dataclass
class GenerationJob:
    source: ModelSource
    replica_plan: Replica
    tokenizer: Tokenizer
    requests: list[GenerationRequest]
    stop_strings: tuple[str, ...]
    dtype: str
    device: str
    eos_token_ids: tuple[int, ...]
    config: SchedulerConfig  # every prompt runs at once; the context as long as the longest request needs

    def open_replica(self):
        from hexgen.engine.replica import open_local_replica  # torch loads only once every check has passed

        return open_local_replica(
            self.source, self.replica_plan, self.dtype, self.device, self.config, self.eos_token_ids
        )

    def start(self, replica) -> None:
        total = sum(s.num_layers * s.tp for s in self.replica_plan.stages)
        with Progress(transient=True, console=Console(stderr=True)) as bar:
            task = bar.add_task(f"loading weights on {replica.world_size} rank(s)", total=total)
            replica.start(lambda n: bar.advance(task, n))

    def run(self, replica, on_text) -> list[Completion]:
        streams = {r.request_id: TextStream(self.tokenizer, self.stop_strings) for r in self.requests}
        return run_requests(replica, self.requests, streams, on_text)

    def report(self, completions: list[Completion], load_s: float) -> None:
        stages = " | ".join(f"TP {s.tp} layers {s.layers[0]}-{s.layers[1] - 1}" for s in self.replica_plan.stages)
        print(f"hexgen: {self.source.name} {self.dtype} on {stages}; weights loaded in {load_s:.1f} s", file=sys.stderr)
        for c, r in zip(completions, self.requests, strict=True):
            print(
                f"hexgen: request {c.request_id}: prompt {len(r.prompt_token_ids)} tokens, "
                f"generated {len(c.token_ids)} ({c.finish_reason}); first token after {c.ttft_s * 1000:.0f} ms, "
                f"then {c.decode_s_per_token * 1000:.1f} ms/token",
                file=sys.stderr,
            )


def load_for_generation(args: argparse.Namespace) -> GenerationJob:
    layers = list(args.tp), list(args.layers) if args.layers else None
    check_engine_args(args)
    known = embedded_spec(args.model)
    if known is not None:  # check the layout and memory before a first-use conversion of the embedded model
        check_memory(args, known, single_replica_plan(known, *layers).replicas, max_running_seqs=1)
    try:
        base = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            ignore_eos=args.ignore_eos,
        )
    except ValueError as err:  # the message starts with the field name; the user typed its flag
        field, _, rest = str(err).partition(" ")
        raise UserError(f"--{field.replace('_', '-')} {rest}") from None
    source = resolve_model(args.model)
    plan = single_replica_plan(source.spec, *layers)
    check_memory(args, source.spec, plan.replicas, max_running_seqs=1)
    if args.device == "cuda":
        _check_cuda(plan.replicas[0].world_size)
    tokenizer = load_tokenizer(source)
    requests = []
    for i, ids in enumerate(encode_prompts(tokenizer, args.prompt, args.chat)):
        limit = source.spec.max_context - 1
        if not ids or len(ids) > limit:
            raise UserError(
                f"prompt {i + 1} is {len(ids)} tokens; it must be 1 to {limit} tokens "
                f"(the model's context is {source.spec.max_context})"
            )
        outside = [t for t in ids if not 0 <= t < source.spec.vocab_size]
        if outside:  # the embedding would be indexed past its end on a rank: an IndexError traceback
            raise UserError(
                f"prompt {i + 1} has token id {outside[0]}, outside --model {args.model}'s vocabulary of "
                f"{source.spec.vocab_size} tokens: its tokenizer ({tokenizer.vocab_size} tokens) does not match "
                "its weights"
            )
        seed = None if args.seed is None else args.seed + i
        params = SamplingParams(**{**base.__dict__, "seed": seed})
        requests.append(GenerationRequest(f"{i}-{uuid.uuid4().hex[:8]}", tuple(ids), params))
    check_memory(args, source.spec, plan.replicas, max_running_seqs=len(requests))
    longest = max(len(r.prompt_token_ids) for r in requests) + args.max_new_tokens
    config = scheduler_config(args, source.spec, len(requests), min(source.spec.max_context, longest))
    return GenerationJob(
        source,
        plan.replicas[0],
        tokenizer,
        requests,
        tuple(args.stop),
        args.dtype,
        args.device,
        eos_token_ids(source.directory),
        config,
    )


def _check_cuda(world_size: int) -> None:
    from hexgen.engine.devices import cuda_device_count

    available = cuda_device_count()
    if available < world_size:
        raise UserError(f"--device cuda needs {world_size} GPUs for this layout; {available} visible")
