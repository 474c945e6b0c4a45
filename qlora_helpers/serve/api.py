"""The OpenAI-compatible API: request models, errors in OpenAI's shape, and the routes.

Every error, ours or the framework's (bad JSON, 404, 405), comes back as
`{"error": {"message", "type", "param", "code"}}`. The routes turn requests into engine `Job`s and
their events into responses; how batching works lives in `engine.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from typing import Any, Callable, Literal, Optional, Union

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import ServeConfig
from ..data import RowProblem, render
from ..runs import Run
from .engine import BatchEngine, Job, QueueFull
from .run import context_length, model_name
from .sampling import SamplingParams


# --- errors ---------------------------------------------------------------------------------------


class APIError(Exception):
    """An error for the client, in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.kind, exc.headers)


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return error_response(400, f"The request body is not valid JSON: {first.get('msg')} "
                              f"(at character {first.get('loc', ['', '?'])[-1]}).", code="invalid_json")
    where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "body"
    extra = " (not supported by this server)" if first.get("type") == "extra_forbidden" else ""
    return error_response(400, f"Invalid field '{where}': {first.get('msg')}{extra}.", param=where)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        return error_response(404, f"No route {request.method} {request.url.path}; see /v1/models, "
                              f"/v1/completions, /v1/chat/completions, /health.", code="not_found")
    if exc.status_code == 405:
        return error_response(405, f"{request.method} is not allowed on {request.url.path}.",
                              code="method_not_allowed", headers=exc.headers)
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


# --- request bodies -------------------------------------------------------------------------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class Sampling(Strict):
    model: str
    max_tokens: Optional[int] = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    user: Optional[str] = None
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the model says


class CompletionRequest(Sampling):
    prompt: Union[str, list[str]]


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None


# --- what every route needs -------------------------------------------------------------------------


@dataclasses.dataclass
class Serving:
    """The app's state: the engine, the tokenizer and the run's serving settings."""
    engine: BatchEngine
    tokenizer: Any
    cfg: ServeConfig
    name: str
    context: int
    template: str
    api_key: str | None
    form: str
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


def serving(request: Request) -> Serving:
    return request.app.state.serving


def check_key(request: Request) -> None:
    key = serving(request).api_key
    if key is None:
        return
    sent = request.headers.get("authorization", "")
    token = sent[7:] if sent.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise APIError(401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")


def check_model(state: Serving, requested: str) -> None:
    if requested != state.name:
        raise APIError(404, f"The model '{requested}' does not exist here; this server serves '{state.name}'.",
                       param="model", code="model_not_found")


def plan_tokens(state: Serving, prompt_ids: list[int], asked: int | None) -> int:
    """max_tokens for one prompt: what was asked (checked against serve.max_tokens and the context)."""
    cap, ctx = state.cfg.max_tokens, state.context
    if asked is not None and not 1 <= asked <= cap:
        raise APIError(400, f"max_tokens must be between 1 and {cap} (serve.max_tokens); got {asked}.",
                       param="max_tokens", code="invalid_max_tokens")
    room = ctx - len(prompt_ids)
    if room < 1 or (asked is not None and asked > room):
        raise APIError(400, f"This model's context is {ctx} tokens; the prompt has {len(prompt_ids)} and "
                       f"max_tokens asks for {asked if asked is not None else 'at least 1'}. Shorten "
                       f"the prompt or lower max_tokens.", param="messages", code="context_length_exceeded")
    return asked if asked is not None else min(state.cfg.default_max_tokens, room)


def stop_strings(req: Sampling) -> tuple[str, ...]:
    values = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(values) > 4 or any(not s for s in values):
        raise APIError(400, "stop takes up to 4 non-empty strings.", param="stop")
    return tuple(values)


def render_chat(messages: list[dict[str, str]], template: str, tokenizer) -> str:
    """The prompt for a conversation, in the run's template (the one the adapter was trained on)."""
    record = {"kind": "chat", "messages": list(messages) + [{"role": "assistant", "content": ""}]}
    try:
        return render(record, template, tokenizer)[0]
    except RowProblem as exc:
        raise ValueError(f"{exc.detail} (this run was trained with data.template={template!r})") from None


class Events:
    """Events from the generating thread into this request's asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def emit(self, kind: str, payload: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))


async def start_jobs(state: Serving, prompts: list[str], req: Sampling,
                     max_tokens: int | None) -> list[tuple[Job, Events]]:
    encoded = await run_in_threadpool(lambda: [state.tokenizer(p)["input_ids"] for p in prompts])
    loop = asyncio.get_running_loop()
    jobs = []
    for ids in encoded:
        events = Events(loop)
        params = SamplingParams(temperature=req.temperature, top_p=req.top_p)
        job = Job(ids, plan_tokens(state, ids, max_tokens), events.emit, params, stop_strings(req), req.ignore_eos)
        jobs.append((job, events))
    if len(jobs) > state.engine.max_queue:
        raise APIError(400, f"At most {state.engine.max_queue} prompts per request.", param="prompt")
    try:
        for job, _ in jobs:
            state.engine.submit(job)
    except QueueFull as exc:
        for job, _ in jobs:
            job.cancelled = True
        raise APIError(503, str(exc), kind="server_error", code="server_busy",
                       headers={"Retry-After": str(exc.retry_after)}) from None
    return jobs


async def collect(job: Job, events: Events) -> str:
    while True:
        kind, payload = await events.queue.get()
        if kind == "error":
            raise APIError(500, payload, kind="server_error", code="generation_failed")
        if kind == "done":
            return job.text


def usage(jobs: list[Job]) -> dict[str, int]:
    prompt = sum(len(j.prompt_ids) for j in jobs)
    completion = sum(len(j.tokens) for j in jobs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def streamed(state: Serving, jobs: list[tuple[Job, Events]], chunk: Callable[[int, str | None, str | None], dict],
             req: Sampling, object_name: str, rid: str) -> StreamingResponse:
    async def events():
        try:
            for index, (job, queue) in enumerate(jobs):
                first = chunk(index, None, None)
                if first:
                    yield sse(first)
                while True:
                    kind, payload = await queue.queue.get()
                    if kind == "text":
                        yield sse(chunk(index, payload[0], None))
                    elif kind == "done":
                        yield sse(chunk(index, None, payload))
                        break
                    else:
                        yield sse({"error": {"message": payload, "type": "server_error",
                                             "code": "generation_failed"}})
                        return
            if req.stream_options and req.stream_options.include_usage:
                yield sse({"id": rid, "object": object_name, "created": int(time.time()), "model": state.name,
                           "choices": [], "usage": usage([j for j, _ in jobs])})
            yield sse("[DONE]")
        finally:  # the client left (or we finished): free the rows still generating
            for job, _ in jobs:
                job.cancelled = True

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --- routes ------------------------------------------------------------------------------------------

router = APIRouter()


@router.get("/health")
async def health(state: Serving = Depends(serving)):
    return {"status": "ok", "model": state.name, "form": state.form, **state.engine.stats()}


@router.get("/v1/models", dependencies=[Depends(check_key)])
async def models(state: Serving = Depends(serving)):
    return {"object": "list", "data": [{"id": state.name, "object": "model", "created": state.created,
                                        "owned_by": "qlora-notebooks", "max_model_len": state.context}]}


@router.post("/v1/completions", dependencies=[Depends(check_key)])
async def completions(req: CompletionRequest, state: Serving = Depends(serving)):
    check_model(state, req.model)
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if not prompts:
        raise APIError(400, "prompt is an empty list.", param="prompt")
    jobs = await start_jobs(state, prompts, req, req.max_tokens)
    rid = f"cmpl-{uuid.uuid4().hex}"
    if req.stream:
        def chunk(index, text, finish):
            if text is None and finish is None:
                return None
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": state.name,
                    "choices": [{"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}]}
        return streamed(state, jobs, chunk, req, "text_completion", rid)
    texts = [await collect(job, events) for job, events in jobs]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": state.name,
            "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": j.finish_reason}
                        for i, (t, (j, _)) in enumerate(zip(texts, jobs))],
            "usage": usage([j for j, _ in jobs])}


@router.post("/v1/chat/completions", dependencies=[Depends(check_key)])
async def chat(req: ChatRequest, state: Serving = Depends(serving)):
    check_model(state, req.model)
    messages = [{"role": "system" if m.role == "developer" else m.role,
                 "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                for m in req.messages]
    try:
        prompt = render_chat(messages, state.template, state.tokenizer)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    jobs = await start_jobs(state, [prompt], req, asked)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    if req.stream:
        def chunk(index, text, finish):
            delta = {"role": "assistant", "content": ""} if text is None and finish is None else (
                {"content": text} if text is not None else {})
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": state.name, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                                      "finish_reason": finish}]}
        return streamed(state, jobs, chunk, req, "chat.completion.chunk", rid)
    job, events = jobs[0]
    text = await collect(job, events)
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": state.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": job.finish_reason}],
            "usage": usage([job])}


# --- the app -------------------------------------------------------------------------------------------


def create_app(engine: BatchEngine, tokenizer, run: Run, api_key: str | None, form: str) -> FastAPI:
    """The FastAPI app serving `run` through `engine`."""
    cfg = run.cfg.serve
    app = FastAPI(title=f"qlora-notebooks: {model_name(run)}", version="1")
    app.state.serving = Serving(engine, tokenizer, cfg, model_name(run), context_length(run, engine.model),
                                run.cfg.data.template, api_key, form)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(StarletteHTTPException, _http_error)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None:
                return error_response(411, "Send a Content-Length header (chunked bodies are not accepted).")
            if not length.isdigit() or int(length) > cfg.max_body_bytes:
                return error_response(413, f"The request body is {length} bytes; the limit is "
                                      f"{cfg.max_body_bytes} (serve.max_body_bytes).")
        return await call_next(request)

    app.include_router(router)
    return app
