"""The FastAPI application: OpenAI endpoints, health, status and metrics over a Coordinator."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.middleware.cors import CORSMiddleware

from hexgen.engine.messages import GenerationRequest, TokenLogprobs
from hexgen.server.coordinator import Admission, Coordinator, TextDelta, merge_choices
from hexgen.server.errors import BODY_BYTES_PER_TOKEN, MIN_BODY_BYTES, BodyLimit, install_error_handlers
from hexgen.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, SamplingFields
from hexgen.server.responses import ResponseShape, sse

DISCONNECT_POLL_S = 0.25
ENDPOINTS = {"/v1/completions": "completions", "/v1/chat/completions": "chat"}  # hexgen_requests_total's labels


def create_app(
    coordinator: Coordinator, api_key: str | None = None, plan: dict[str, Any] | None = None,
    allowed_origins: tuple[str, ...] = (),
) -> FastAPI:
    """The app; `allowed_origins`: the web pages (origins, or "*" for all) whose scripts may call it (CORS), none
    by default: a server on a workstation should not answer every page its user visits."""
    config = coordinator.config
    max_body_bytes = max(MIN_BODY_BYTES, BODY_BYTES_PER_TOKEN * config.max_outstanding * config.max_context)
    # no redirect_slashes: `POST /v1/completions/` would get a 307 with no body, which clients do not follow for a
    # POST; an unknown path is a 404 in OpenAI's error shape instead
    app = FastAPI(title="hexgen", docs_url=None, redoc_url=None, redirect_slashes=False)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if allowed_origins:  # added last, so outermost: a preflight needs no API key, and a 413 carries the headers too
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins),
                           allow_methods=["GET", "POST", "OPTIONS"], allow_headers=["Authorization", "Content-Type"])

    def count_invalid(request: Request) -> None:
        if endpoint := ENDPOINTS.get(request.url.path):
            coordinator.metrics.requests.labels(endpoint, "invalid").inc()

    install_error_handlers(app, max_body_bytes, count_invalid)

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not secrets.compare_digest(header.removeprefix("Bearer ").strip(), api_key):
            raise APIError(
                401,
                "missing or wrong API key; send 'Authorization: Bearer <key>'",
                type_="authentication_error",
                code="invalid_api_key",
            )

    guarded = [Depends(authorize)]

    @app.api_route("/health", methods=["GET", "HEAD"])  # load balancers probe with HEAD
    async def health() -> JSONResponse:
        up = sum(r.state.is_up for r in coordinator.replicas)
        return JSONResponse({"status": "ok" if up else "down", "replicas_up": up}, status_code=200 if up else 503)

    card = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "hexgen",
            "max_model_len": config.max_context}

    @app.get("/v1/models", dependencies=guarded)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model:path}", dependencies=guarded)
    async def model(model: str) -> dict[str, Any]:
        _check_model_name(coordinator, model)
        return card

    @app.get("/metrics", dependencies=guarded)
    async def metrics() -> Response:
        return Response(coordinator.metrics.render(coordinator.replicas), media_type="text/plain; version=0.0.4")

    @app.get("/status", dependencies=guarded)
    async def status() -> dict[str, Any]:
        return {
            "model": coordinator.config.model_name,
            "dtype": coordinator.config.dtype,
            "device": coordinator.config.device,
            "plan": plan,
            "dispatch": type(coordinator.policy).__name__,
            "replicas": [_replica_status(r) for r in coordinator.replicas],
        }

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        tokenizer = coordinator.tokenizer
        with _counting_refusals(coordinator, "completions", "invalid"):
            _check_model_name(coordinator, body.model)
            # tokenizing a long text takes a while (a 10 MB prompt: 5 s): off the event loop, which streams the others
            prompts = await asyncio.to_thread(
                lambda: [list(p) if isinstance(p, list) else tokenizer.encode(p) for p in body.prompts])
            # echo with max_tokens 0 scores the prompts and generates nothing (OpenAI's legacy API; evaluation
            # harnesses): each sequence draws one token, which the answer leaves out
            score_only = body.echo and body.max_tokens == 0
            sequences = _sequences(coordinator, body, prompts, 1 if score_only else body.max_tokens)
        echoes = None
        if body.echo:  # each prompt's text as sent, token-id prompts decoded (once _sequences has checked their ids)
            echoes = [p if isinstance(p, str) else tokenizer.decode(p) for p in body.prompts]
        return await _generate(coordinator, request, body, prompts, sequences, chat=False, echoes=echoes,
                               score_only=score_only)

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        with _counting_refusals(coordinator, "chat", "invalid"):
            _check_model_name(coordinator, body.model)
            try:
                ids = await asyncio.to_thread(coordinator.tokenizer.apply_chat_template, body.template_messages())
            except Exception as err:  # the template may reject a conversation (e.g. roles out of order)
                raise APIError(400, f"the chat template rejected these messages: {err}", param="messages") from None
            sequences = _sequences(coordinator, body, [ids], body.token_limit)
        return await _generate(coordinator, request, body, [ids], sequences, chat=True)

    return app


@contextmanager
def _counting_refusals(coordinator: Coordinator, endpoint: str, status: str) -> Iterator[None]:
    """A request refused by an APIError inside counted under `status`: "invalid" before admission (a 4xx for a wrong
    model, a prompt past the context, ...; as a request whose fields pydantic refused is, install_error_handlers),
    "rejected" at admission (a 429 or 503), "error" once on its replicas."""
    try:
        yield
    except APIError:
        coordinator.metrics.requests.labels(endpoint, status).inc()
        raise


def _check_model_name(coordinator: Coordinator, name: str) -> None:
    if name != coordinator.config.model_name:
        raise APIError(
            404,
            f"model {name!r} does not exist; this server serves {coordinator.config.model_name!r}",
            param="model",
            code="model_not_found",
        )


def _sequences(
    coordinator: Coordinator, body: SamplingFields, prompts: list[list[int]], max_tokens: int | None
) -> list[GenerationRequest]:
    """Every prompt's n choices (choice index = prompt index x n + choice), checked: a 4xx APIError if not valid."""
    limit = coordinator.config.max_outstanding
    if len(prompts) > 1 and len(prompts) * body.n > limit:  # (one prompt: Coordinator.choices says so of n)
        raise APIError(400, f"{len(prompts)} prompts x n {body.n} = {len(prompts) * body.n} sequences; this server "
                       f"keeps at most {limit} requests in flight (each choice of each prompt is one)", param="prompt")
    return [s for ids in prompts for s in coordinator.choices(coordinator.prepare(ids, max_tokens, body), body.n)]


async def _generate(
    coordinator: Coordinator, request: Request, body: SamplingFields, prompts: list[list[int]],
    sequences: list[GenerationRequest], chat: bool, echoes: list[str] | None = None, score_only: bool = False,
) -> Response:
    """Generate the sequences (from _sequences), whole or streamed; `echoes`: each prompt's text to put before its
    answers; `score_only`: answer the prompts' scores only, no generated token."""
    # a 429 (full) or 503 (shutting down): turned away, which an operator should see
    with _counting_refusals(coordinator, "chat" if chat else "completions", "rejected"):
        admission = coordinator.admit(len(sequences))
    try:
        return await _respond(coordinator, request, body, prompts, sequences, admission, chat, echoes, score_only)
    finally:
        admission.close()  # what has not reached a replica by now (with a stream's first delta, all of it has)


async def _respond(
    coordinator: Coordinator, request: Request, body: SamplingFields, prompts: list[list[int]],
    sequences: list[GenerationRequest], admission: Admission, chat: bool, echoes: list[str] | None,
    score_only: bool = False,
) -> Response:
    """Generate the admitted sequences and answer, whole or streamed."""
    speller = coordinator.tokenizer if body.logprob_alternatives is not None else None
    echo = None if echoes is None else [text for text in echoes for _ in range(body.n)]
    shape = ResponseShape(chat, coordinator.config.model_name, sum(len(ids) for ids in prompts), speller, echo)
    endpoint = "chat" if chat else "completions"
    streams = [coordinator.stream_text(s, body.stop_strings, restartable=not body.stream, admission=admission,
                                       counts_prompt=i % body.n == 0,  # sequences: each prompt's n choices in turn
                                       score_only=score_only)
               for i, s in enumerate(sequences)]
    if score_only:
        streams = [_prompt_scores_only(stream) for stream in streams]
    if body.stream:
        deltas = merge_choices(streams)
        # errors before the first token are still plain HTTP errors
        answered, first = await _answered(coordinator, endpoint, request, anext(deltas))
        if not answered:
            return Response(status_code=499)
        return StreamingResponse(
            _sse_stream(coordinator, shape, first, deltas, body.include_usage, endpoint),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    answered, answers = await _answered(coordinator, endpoint, request, _collect_all(streams))
    if not answered:
        return Response(status_code=499)
    coordinator.metrics.requests.labels(endpoint, "ok").inc()
    return JSONResponse(shape.full([answer[:3] for answer in answers], sum(answer[3] for answer in answers)))


async def _prompt_scores_only(deltas: AsyncIterator[TextDelta]) -> AsyncIterator[TextDelta]:
    """A one-token sequence's deltas with that token left out: its prompt's scores, no text, no completion tokens,
    and finish reason "length" (the max_tokens of 0 asked for)."""
    async for delta in deltas:
        yield TextDelta("", delta.finish_reason and "length", 0, delta.restart, prompt_logprobs=delta.prompt_logprobs)


T = TypeVar("T")


async def _answered(coordinator: Coordinator, endpoint: str, request: Request,
                    awaitable: Awaitable[T]) -> tuple[bool, T | None]:
    """_unless_disconnected, counting in hexgen_requests_total a request that failed ("error") or whose client
    left ("cancelled")."""
    with _counting_refusals(coordinator, endpoint, "error"):
        answered, value = await _unless_disconnected(request, awaitable)
    if not answered:
        coordinator.metrics.requests.labels(endpoint, "cancelled").inc()
    return answered, value


async def _unless_disconnected(request: Request, awaitable: Awaitable[T]) -> tuple[bool, T | None]:
    """(True, its result), or (False, None) once the client has gone before it was done: it is then cancelled
    (closing a request's generators aborts its sequences on their replicas), as it is when this is cancelled (a
    server stopping cancels the handlers still running)."""
    task = asyncio.ensure_future(awaitable)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                return False, None
        return True, task.result()
    finally:
        task.cancel()  # nothing once it is done


# text, finish reason, log-probabilities (an echoed prompt's first), completion tokens
Answer = tuple[str, str, list[tuple[int, TokenLogprobs | None]], int]


async def _collect_all(streams: list[AsyncIterator[TextDelta]]) -> list[Answer]:
    """Every choice's whole answer, collected side by side; an error of one (or cancelling this) stops the rest,
    which aborts them on their replicas."""
    tasks = [asyncio.ensure_future(_collect(stream)) for stream in streams]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


async def _collect(deltas: AsyncIterator[TextDelta]) -> Answer:
    parts, finish, count, logprobs = [], "length", 0, []
    async for delta in deltas:
        if delta.restart:
            parts, logprobs = [], []
        parts.append(delta.text)
        logprobs += delta.prompt_logprobs + delta.logprobs
        finish, count = delta.finish_reason or finish, delta.completion_tokens
    return "".join(parts), finish, logprobs, count


async def _sse_stream(
    coordinator: Coordinator,
    shape: ResponseShape,
    first: tuple[int, TextDelta],
    rest: AsyncIterator[tuple[int, TextDelta]],
    include_usage: bool,
    endpoint: str,
) -> AsyncIterator[str]:
    status, counts = "cancelled", {}  # choice index -> its completion tokens so far

    def chunk(index: int, delta: TextDelta) -> str:
        event = sse(shape.chunk(delta.text, delta.finish_reason, first=index not in counts, index=index,
                                logprobs=delta.prompt_logprobs + delta.logprobs))
        counts[index] = delta.completion_tokens
        return event

    try:
        yield chunk(*first)
        async for index, delta in rest:
            yield chunk(index, delta)
        if include_usage:
            yield sse(shape.usage_chunk(sum(counts.values())))
        status = "ok"
    except APIError as err:  # e.g. the replica died mid-stream: say so in the stream
        status = "error"
        yield sse(err.body())
    finally:
        await rest.aclose()
        coordinator.metrics.requests.labels(endpoint, status).inc()
    yield sse("[DONE]")


def engine_totals(load: dict[str, Any]) -> dict[str, Any]:
    """The driver's step totals since it started (engine/engine.py:StepTotals), and the means they give."""
    steps, busy_s = load.get("engine_steps", 0), load.get("engine_busy_s", 0.0)
    step_tokens = load.get("engine_step_tokens", 0)
    return {
        "steps": steps, "step_tokens": step_tokens, "sampled_tokens": load.get("engine_sampled_tokens", 0),
        "busy_s": busy_s,  # the driver's wall time inside its steps
        "mean_step_ms": round(1000 * busy_s / steps, 3) if steps else None,
        "mean_tokens_per_step": round(step_tokens / steps, 3) if steps else None,
    }


def _replica_status(replica) -> dict[str, Any]:
    return {
        "index": replica.index,
        "status": replica.status,
        "down_reason": replica.down_reason,
        "outstanding_requests": replica.state.outstanding,
        "capacity_weight": replica.state.capacity_weight,
        "max_context": replica.state.max_context,  # tokens a sequence its KV pool holds (at most --max-context)
        "running": replica.load.get("running", 0),
        "waiting": replica.load.get("waiting", 0),
        "peak_running": replica.load.get("peak_running", 0),  # the largest batch the replica has run
        "kv_blocks_used": replica.load.get("kv_blocks_used", 0),  # paged KV cache, the same on every rank
        "kv_blocks_free": replica.load.get("kv_blocks_free", 0),  # cached prefix blocks included: reusable
        "kv_blocks_cached": replica.load.get("kv_blocks_cached", 0),  # free blocks still holding a cached prefix
        "prefix_hit_tokens": replica.load.get("prefix_hit_tokens", 0),  # tokens served from the prefix cache
        "preemptions": replica.load.get("preemptions", 0),  # sequences that gave their blocks back and recomputed
        "draft_tokens": replica.load.get("draft_tokens", 0),  # speculative decoding: drafts verified so far ...
        "accepted_draft_tokens": replica.load.get("accepted_draft_tokens", 0),  # ... and those the model agreed with
        "engine": engine_totals(replica.load),
        "ranks": replica.world_size,
        "stages": replica.stage_status(),
    }
