"""Errors in OpenAI's shape, the request body limit and the request log (plain ASGI middleware).

Error bodies are written with `ensure_ascii`, so text a client sent (a lone surrogate included)
can never make an error response itself fail. Each request gets one log line when it ends: its
id, method, path, status (499 when the client left first), tokens and time; never the key or text.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from starlette.requests import Request
from starlette.responses import Response

log = logging.getLogger("qlora_helpers.serve")


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str | None = None, headers: dict[str, str] | None = None) -> Response:
    kind = kind or ("server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return Response(json.dumps(body), status_code=status, headers=headers, media_type="application/json")


class APIError(Exception):
    """An error for the client, in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers

    def response(self) -> Response:
        return error_response(self.status, self.message, self.param, self.code, self.kind, self.headers)


async def http_error(request: Request, exc: HTTPException) -> Response:
    """The framework's own errors (no route, wrong method, unreadable body) in OpenAI's shape."""
    if exc.status_code == 404:
        return error_response(404, f"No route {request.method} {request.url.path}; see /v1/models, "
                              f"/v1/completions, /v1/chat/completions, /health.", code="not_found")
    if exc.status_code == 405:
        return error_response(405, f"{request.method} is not allowed on {request.url.path}.",
                              code="method_not_allowed", headers=exc.headers)
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("request %s failed", getattr(request.state, "request_id", "-"))
    return error_response(500, f"Internal error ({type(exc).__name__}); the server log has the details.",
                          code="internal_error")


def _too_large(length: str, limit: int) -> HTTPException:
    return HTTPException(413, f"The request body is {length} bytes; the limit is {limit} (serve.max_body_bytes).")


class BodyLimit:
    """413 for bodies over `limit` bytes: at once from Content-Length, else counted as chunks arrive
    (so chunked uploads are accepted, within the same limit)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            exc = _too_large(length.decode("latin-1")[:30], self.limit)
            return await error_response(413, exc.detail)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:  # raised inside the body read: FastAPI re-raises HTTPExceptions
                raise _too_large(f"over {self.limit}", self.limit)
            return message

        await self.app(scope, counted, send)


class RequestLog:
    """One line per HTTP request when it ends, whatever the outcome (401, 503, a client that left)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state["request_id"] = uuid.uuid4().hex[:24]
        start, status = time.perf_counter(), [0]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            jobs = state.get("jobs") or []
            prompts = jobs[::state.get("copies", 1)]  # n copies of a prompt: its tokens once, as usage counts
            left = state.get("outcome") == "disconnected"
            log.info("request %s %s %s %d prompt_tokens=%d completion_tokens=%d %.3fs%s", state["request_id"],
                     scope["method"], scope["path"], 499 if left else status[0] or 500,
                     sum(len(j.prompt_ids) for j in prompts), sum(j.generated for j in jobs),
                     time.perf_counter() - start, " (client disconnected)" if left else "")


async def invalid_request(request: Request, exc: RequestValidationError):
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return error_response(400, f"The request body is not valid JSON: {first.get('msg')} "
                              f"(at character {first.get('loc', ['', '?'])[-1]}).", code="invalid_json")
    where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "body"
    kind = request.headers.get("content-type", "")
    if where == "body" and not kind.lower().startswith("application/json"):
        return error_response(400, f"The request body must be JSON sent with 'Content-Type: application/json' "
                              f"(got {kind[:60]!r}).", code="invalid_content_type")
    extra = " (not an OpenAI field this server knows)" if first.get("type") == "extra_forbidden" else ""
    return error_response(400, f"Invalid field '{where}': {first.get('msg')}{extra}.", param=where)
