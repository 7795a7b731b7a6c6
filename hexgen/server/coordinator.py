"""Coordinator: checks a request, dispatches it to a replica by the shared policy, fails over, streams text."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace

from hexgen.dispatch import DispatchPolicy, NoReplicaAvailable, ReplicaState
from hexgen.engine.messages import GenerationRequest, SamplingParams, TokenEvent, TokenLogprobs
from hexgen.server.metrics import Metrics
from hexgen.server.protocol import APIError, SamplingFields
from hexgen.server.replica_client import Rejected, ReplicaClient, ReplicaDown, ServerStopping
from hexgen.textstream import TextStream
from hexgen.tokenizer import Tokenizer

RESTART = object()  # the request starts over on another replica; discard what it produced so far
SHUTTING_DOWN = "the server is shutting down; retry elsewhere"


@dataclass(frozen=True)
class ServeConfig:
    model_name: str  # the name clients send as "model"
    max_context: int
    max_outstanding: int  # requests in flight over all replicas before answering 429
    dtype: str  # the replicas' weights and activations (--dtype as resolved: auto is never left)
    device: str  # cpu or cuda
    vocab_size: int  # the model's embedding rows: token ids a replica can take (its tokenizer may have more or fewer)


@dataclass
class TextDelta:
    text: str
    finish_reason: str | None
    completion_tokens: int
    restart: bool = False  # the request starts over on another replica: drop the text received so far
    # (token id, its log-probabilities) of each token generated since the last delta, where the request asked
    logprobs: list[tuple[int, TokenLogprobs]] = field(default_factory=list)
    # on a request's first delta, where it asked: (token id, its score) of each prompt token, None for the first
    prompt_logprobs: list[tuple[int, TokenLogprobs | None]] = field(default_factory=list)


class Admission:
    """Sequences let in under the limit of requests in flight that have not reached a replica yet. They count
    against the limit from admission until each reaches its replica (where it counts as outstanding) or the request
    ends, so a burst of requests cannot all pass the check before any of them is submitted."""

    def __init__(self, coordinator: Coordinator, sequences: int):
        self._coordinator = coordinator
        self.left = sequences

    def reached_replica(self) -> None:
        """One sequence now counts on its replica."""
        if self.left:
            self.left -= 1
            self._coordinator.admitted -= 1

    def close(self) -> None:
        """The request is over (or all its sequences are on replicas): release what is left."""
        self._coordinator.admitted -= self.left
        self.left = 0


class Coordinator:
    def __init__(
        self,
        config: ServeConfig,
        tokenizer: Tokenizer,
        replicas: list[ReplicaClient],
        policy: DispatchPolicy,
        metrics: Metrics,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.replicas = replicas
        self.policy = policy
        self.metrics = metrics
        self.admitted = 0  # sequences admitted that have not reached a replica yet (Admission)
        self.stopping = False  # the server is shutting down: no new requests
        self.ending: str | None = None  # why every running request is being ended (end_requests), once it is

    def stop_admitting(self) -> None:
        """From now on every new request gets a 503; those running go on."""
        self.stopping = True

    def end_requests(self, reason: str) -> None:
        """End every running request with a 503 (a stream: an error event) saying `reason`, those between replicas
        (failing over) too: they hear it before they are re-sent."""
        self.ending = reason
        for replica in self.replicas:
            replica.interrupt(ServerStopping(reason))

    @property
    def is_up(self) -> bool:
        return any(r.state.is_up for r in self.replicas)

    def prepare(self, prompt_ids: list[int], max_tokens: int | None, fields: SamplingFields) -> GenerationRequest:
        """Validate lengths and sampling settings; a 4xx APIError says what is wrong and what is right."""
        context = self.config.max_context
        if not prompt_ids:
            raise APIError(400, "the prompt is empty; send at least one token of text", param="prompt")
        vocab = self.config.vocab_size
        outside = [t for t in prompt_ids if not 0 <= t < vocab]
        if outside:
            raise APIError(400, f"prompt token ids must be in [0, {vocab}) (the model's vocabulary), got {outside[0]}"
                           + (f"; the server's tokenizer has {self.tokenizer.vocab_size} tokens, more than the "
                              "model" if self.tokenizer.vocab_size > vocab else ""), param="prompt")
        if len(prompt_ids) >= context:
            raise APIError(
                400,
                f"the prompt is {len(prompt_ids)} tokens; this model's context is {context} tokens, "
                "so the prompt must be shorter",
                param="prompt",
                code="context_length_exceeded",
            )
        room = context - len(prompt_ids)
        limit = max_tokens if max_tokens is not None else min(fields.default_max_tokens or room, room)
        named = fields.token_limit_field  # as the client sent it: max_tokens or max_completion_tokens
        if limit < 1:
            echo = " (0 only with echo: true, which scores the prompt)" if hasattr(fields, "echo") else ""
            raise APIError(400, f"{named} must be >= 1{echo}, got {limit}", param=named)
        if len(prompt_ids) + limit > context:
            raise APIError(
                400,
                f"this model's maximum context length is {context} tokens, but the request needs "
                f"{len(prompt_ids) + limit} ({len(prompt_ids)} in the prompt, {limit} to generate); "
                f"lower {named} to at most {context - len(prompt_ids)}",
                param=named,
                code="context_length_exceeded",
            )
        biases = fields.token_biases
        if any(token >= vocab for token, _ in biases):
            raise APIError(400, f"logit_bias token ids must be in [0, {vocab}) (the model's vocabulary)",
                           param="logit_bias")
        # top_p 0 (OpenAI's range is 0-1) keeps only the most likely token: top_k 1, which the engine takes as greedy
        # even with a seed (its top_p must be above 0)
        top_k, top_p = (1, 1.0) if fields.top_p == 0 else (fields.top_k, fields.top_p)
        params = SamplingParams(
            max_new_tokens=limit,
            temperature=fields.temperature,
            top_k=top_k,
            top_p=top_p,
            seed=fields.seed,
            ignore_eos=fields.ignore_eos,
            logprobs=fields.logprob_alternatives,
            prompt_logprobs=fields.prompt_logprob_alternatives,
            presence_penalty=fields.presence_penalty,
            frequency_penalty=fields.frequency_penalty,
            logit_bias=biases,
        )
        return GenerationRequest(f"req-{uuid.uuid4().hex}", tuple(prompt_ids), params,
                                 open_ended=max_tokens is None and fields.default_max_tokens is None)

    def choices(self, request: GenerationRequest, n: int) -> list[GenerationRequest]:
        """The sequences of a request's n choices: choice i draws with seed + i when the request has a seed (else
        each with fresh randomness), so a seeded request's choices differ and each is reproducible alone."""
        if n > self.config.max_outstanding:
            raise APIError(400, f"n must be at most {self.config.max_outstanding} on this server (its limit of "
                           f"requests in flight; each choice is one), got {n}", param="n")
        if n == 1:
            return [request]
        seed = request.params.seed
        return [replace(request, request_id=f"{request.request_id}-{i}",
                        params=replace(request.params, seed=None if seed is None else seed + i))
                for i in range(n)]

    def admit(self, sequences: int = 1) -> Admission:
        """Let `sequences` more in if they fit under the limit of requests in flight (those on replicas that are up,
        and those admitted but not yet on a replica), else 429. The caller closes the admission when done."""
        if self.stopping:
            raise APIError(503, SHUTTING_DOWN, type_="server_error")
        outstanding = sum(r.state.outstanding for r in self.replicas if r.state.is_up) + self.admitted
        if outstanding + sequences > self.config.max_outstanding:
            raise APIError(
                429,
                f"the server is at its limit of {self.config.max_outstanding} requests in flight; retry shortly",
                type_="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self.admitted += sequences
        return Admission(self, sequences)

    async def events(self, request: GenerationRequest, restartable: Callable[[], bool],
                     admission: Admission | None = None) -> AsyncIterator[TokenEvent | object]:
        """Token events of one request. If its replica goes down before its first token (or at any time while
        `restartable()` says so), the request is re-sent to another replica; RESTART marks a re-send after tokens."""
        while True:
            if self.ending is not None:
                raise APIError(503, self.ending, type_="server_error")
            replica = self._choose(request)
            if admission is not None:  # from here the request counts as outstanding on its replica
                admission.reached_replica()
                admission = None
            queue = await replica.submit(self.fit(request, replica.state))
            produced, finished, down = False, False, None
            try:
                while True:
                    item = await queue.get()
                    if isinstance(item, ReplicaDown):
                        down = item
                        break
                    if isinstance(item, Rejected):
                        raise APIError(400, item.reason)
                    if isinstance(item, ServerStopping):
                        raise APIError(503, item.reason, type_="server_error")
                    produced, finished = True, item.finish_reason is not None
                    yield item  # the consumer may close us here, right after the last token
                    if finished:
                        return
            finally:
                await replica.release(request.request_id, abort=not finished)
            if produced and not restartable():
                raise APIError(
                    503,
                    f"replica {replica.index} failed while streaming this request ({down.reason}); retry the request",
                    type_="server_error",
                )
            self.metrics.failovers.inc()
            if produced:
                yield RESTART

    def _choose(self, request: GenerationRequest) -> ReplicaClient:
        """The policy's pick among the replicas that are up and whose KV pool holds the request's whole sequence (in
        a heterogeneous plan one replica's pool may hold fewer tokens than the server's context); an open-ended
        request needs room for its prompt and one token."""
        need = len(request.prompt_token_ids) + (1 if request.open_ended else request.params.max_new_tokens)
        up = [r.state for r in self.replicas if r.state.is_up]
        if not up:
            raise APIError(503, "no replica is up; the server cannot generate right now", type_="server_error")
        states = [r.state if fits(r.state, need) else replace(r.state, is_up=False) for r in self.replicas]
        try:
            return self.replicas[self.policy.choose(states)]
        except NoReplicaAvailable:
            if any(fits(r.state, need) for r in self.replicas):  # only replicas that are down hold it
                raise APIError(503, f"the replicas whose KV caches hold this request's {need} tokens are down; "
                               "retry shortly", type_="server_error") from None
            largest = max(s.max_context for s in up if s.max_context is not None)
            prompt = len(request.prompt_token_ids)
            raise APIError(
                400,
                f"the request needs {need} tokens ({prompt} in the prompt, {request.params.max_new_tokens} to "
                f"generate), but the replicas up hold at most {largest} tokens a sequence in their KV caches; "
                + (f"lower max_tokens to at most {largest - prompt}" if prompt < largest else
                   f"the prompt must be shorter than {largest} tokens"),
                param="max_tokens" if prompt < largest else "prompt",
                code="context_length_exceeded",
            ) from None

    @staticmethod
    def fit(request: GenerationRequest, replica: ReplicaState) -> GenerationRequest:
        """An open-ended request generates until EOS or its replica's KV pool is full: where that pool is shorter
        than the server's context, max_new_tokens is lowered to the rest of it."""
        if not request.open_ended or replica.max_context is None:
            return request
        room = replica.max_context - len(request.prompt_token_ids)
        if room >= request.params.max_new_tokens:
            return request
        return replace(request, params=replace(request.params, max_new_tokens=room))

    async def stream_text(
        self, request: GenerationRequest, stop_strings: tuple[str, ...], restartable: bool,
        admission: Admission | None = None, counts_prompt: bool = True, score_only: bool = False,
    ) -> AsyncIterator[TextDelta]:
        """Text deltas cut at stop strings; the last delta carries the finish reason and each delta the
        log-probabilities of the tokens since the one before (where asked). Records metrics, the prompt's tokens
        where `counts_prompt` (a prompt's first choice: usage counts a prompt once, however many choices share it),
        and no generated token where `score_only` (the one token drawn to score the prompt, which usage leaves out).
        If the replica goes down, the request is re-sent while its client has seen none of it, or at any time when
        `restartable` (the answer is sent whole): a delta with `restart` then says to drop what came before."""
        started = time.monotonic()
        first_token_s: float | None = None
        stream, count, logprobs, prompt_logprobs = TextStream(self.tokenizer, stop_strings), 0, [], []
        if counts_prompt:
            self.metrics.prompt_tokens.inc(len(request.prompt_token_ids))
        shown = False  # whether a delta went out: until then a re-send is invisible, streamed or not
        events = self.events(request, lambda: restartable or not shown, admission)
        async with aclosing(events):  # closing aborts on the replica
            async for item in events:
                if item is RESTART:
                    stream, count, first_token_s = TextStream(self.tokenizer, stop_strings), 0, None
                    logprobs, prompt_logprobs = [], []
                    if shown:
                        yield TextDelta("", None, 0, restart=True)
                    continue
                assert isinstance(item, TokenEvent) and item.token_id is not None
                count += 1
                first_token_s = first_token_s or time.monotonic()
                if item.logprobs is not None:
                    logprobs.append((item.token_id, item.logprobs))
                if item.prompt_logprobs is not None:
                    prompt = request.prompt_token_ids
                    prompt_logprobs = [(prompt[0], None), *zip(prompt[1:], item.prompt_logprobs, strict=True)]
                delta = stream.add(item.token_id)
                finish = "stop" if stream.stopped else item.finish_reason
                if finish is not None and not stream.stopped:
                    delta += stream.finish()
                if delta or finish is not None:
                    shown = True
                    yield TextDelta(delta, finish, count, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
                    logprobs, prompt_logprobs = [], []
                if finish is not None:
                    self._record(started, first_token_s, 0 if score_only else count)
                    return

    def _record(self, started: float, first_token_s: float | None, count: int) -> None:
        now = time.monotonic()
        self.metrics.generation_tokens.inc(count)
        self.metrics.e2e.observe(now - started)
        if first_token_s is not None:
            self.metrics.ttft.observe(first_token_s - started)
            if count > 1:
                self.metrics.tpot.observe((now - first_token_s) / (count - 1))


async def merge_choices(streams: list[AsyncIterator[TextDelta]]) -> AsyncIterator[tuple[int, TextDelta]]:
    """The deltas of a request's choices as they come, each with its choice's index. An error of one choice ends
    the whole (the caller reports it); closing the merge, or its end, closes every choice's stream (aborting what
    is still generating on its replica)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[TextDelta]) -> None:
        try:
            async with aclosing(stream):
                async for delta in stream:
                    await queue.put((index, delta))
        except Exception as err:  # an APIError (or a bug): the consumer raises it rather than wait for this choice
            await queue.put((index, err))
            return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # the merge is closing
                raise
            # a cancellation from below this choice (a bug): an error, rather than a consumer waiting for ever
            await queue.put((index, RuntimeError(f"choice {index} was cancelled from within")))
            return
        await queue.put((index, None))  # this choice is done

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def fits(state: ReplicaState, tokens: int) -> bool:
    """Whether a sequence of `tokens` tokens fits the replica's KV pool."""
    return state.max_context is None or tokens <= state.max_context


def served_context(max_context: int, replicas: list[ReplicaClient]) -> int:
    """The longest sequence the server takes: --max-context, or less where no replica's KV pool holds it."""
    pools = [r.state.max_context for r in replicas]
    return max_context if None in pools else min(max_context, max(pools))
