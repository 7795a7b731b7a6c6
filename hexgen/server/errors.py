"""Every HTTP error as an OpenAI-style JSON body: request validation, body size, unknown routes, internal errors."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from hexgen.server.protocol import APIError

# A request body may hold up to this many bytes per token of every sequence the server keeps in flight (each at
# most the context long), and at least MIN_BODY_BYTES: far more than any valid request needs, short of what would
# exhaust the server's memory.
BODY_BYTES_PER_TOKEN = 64
MIN_BODY_BYTES = 1 << 20


class BodyLimit:
    """ASGI middleware: a request body past max_bytes gets a 413 in OpenAI's error shape: at once when its
    Content-Length says so, else once that many bytes have come (starlette's limit raises an HTTPException that
    the app's handler answers)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = RequestBodyLimitMiddleware(app, max_bytes)
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        length = Headers(scope=scope).get("content-length", "") if scope["type"] == "http" else ""
        if length.isdigit() and int(length) > self.max_bytes:
            error = body_too_large(self.max_bytes, f"is {int(length):,} bytes")
            await JSONResponse(error.body(), status_code=413)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def body_too_large(max_bytes: int, how_large: str) -> APIError:
    return APIError(413, f"the request body {how_large}; this server takes at most {max_bytes:,} bytes "
                    f"(--max-queue x --max-context x {BODY_BYTES_PER_TOKEN}, at least {MIN_BODY_BYTES:,})")


def install_error_handlers(
    app: FastAPI, max_body_bytes: int, on_invalid: Callable[[Request], None] = lambda _request: None
) -> None:
    """The handlers; `on_invalid` is called with each request whose fields were refused (the app counts them)."""
    @app.exception_handler(APIError)
    async def api_error(_request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
        on_invalid(request)
        error = validation_error(err.errors(), err.body, request.headers.get("content-type"))
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        error = APIError(err.status_code, str(err.detail))
        if err.status_code == 413:  # a body sent in chunks, past the limit (BodyLimit)
            error = body_too_large(max_body_bytes, "is too large")
        return JSONResponse(error.body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, err: Exception) -> JSONResponse:
        # a bug, not the client's mistake: still an answer clients can parse (the server logs the traceback)
        error = APIError(500, f"internal server error ({type(err).__name__}); the server's log has the details",
                         type_="server_error")
        return JSONResponse(error.body(), status_code=500)


def validation_error(errors: list[dict[str, Any]], body: Any, content_type: str | None) -> APIError:
    """A 400 for the most telling of pydantic's errors: among those of the first field that has any, the deepest
    (where a value fits none of a field's types, pydantic reports each type's error: the deepest got furthest)."""
    if not errors:
        return APIError(400, "invalid request")
    field = _fields(errors[0]["loc"])[:1]
    first = max((e for e in errors if _fields(e["loc"])[:1] == field), key=lambda e: len(e["loc"]))
    kind = first.get("type")
    where = _param(_fields(first["loc"]), body, keep_last=kind == "missing")
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    if kind == "json_invalid":
        return APIError(400, "the request body is not valid JSON")
    if kind == "extra_forbidden":
        return APIError(400, f"unsupported field {where!r}", param=where)
    if not first["loc"][1:] and kind == "missing":  # the body itself is missing
        message = "the request body is empty; send a JSON object with the request's fields"
    elif not first["loc"][1:] and kind in ("model_type", "model_attributes_type"):  # JSON, but no object
        message = "the request body must be a JSON object"
        message += "" if isinstance(body, bytes) else f", got {_a_json(body)}"
    if isinstance(body, bytes):  # not parsed: its Content-Type does not say JSON
        message += (f"; send a JSON object with 'Content-Type: application/json' (this request's Content-Type is "
                    f"{content_type or 'missing'})")
    return APIError(400, f"{where}: {message}" if where else message, param=where)


def _a_json(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words: an array, a string, null, ..."""
    if value is None:
        return "null"
    kinds = ((bool, "a boolean"), (int | float, "a number"), (str, "a string"), (list, "an array"))
    return next((kind for cls, kind in kinds if isinstance(value, cls)), "an object")


def _fields(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(loc[1:]) if loc[:1] == ("body",) else tuple(loc)


def _param(loc: tuple[Any, ...], body: Any, keep_last: bool) -> str | None:
    """The field an error is about as the client named it: its path in the body sent, without the names pydantic
    gives each type of a field that takes several (`messages.0.content.str`): those are not in the body. A
    missing field (keep_last) is not in the body either."""
    path, here = [], body
    for i, part in enumerate(loc):
        inside = isinstance(here, dict) and part in here
        inside = inside or (isinstance(here, list) and isinstance(part, int) and 0 <= part < len(here))
        if inside:
            here = here[part]
        if inside or (keep_last and i == len(loc) - 1):
            path.append(str(part))
    return ".".join(path) or None
