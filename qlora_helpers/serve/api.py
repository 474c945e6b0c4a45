"""The OpenAI-compatible API: request models, errors in OpenAI's shape, and the routes.

Every field of OpenAI's completions and chat-completions bodies is accepted (plus vLLM's `top_k`,
`min_tokens`, `repetition_penalty`, `ignore_eos`). What changes the output is honoured; what we
cannot do (`tools`, JSON schemas, `suffix`, audio...) is a 400 naming the field; what does not
change the output (`user`, `store`, `metadata`, `service_tier`...) is ignored with a logged
warning; unknown fields are 400s, as OpenAI answers them. Every error, ours or the framework's
(bad JSON, 404, 405, 413), comes back as `{"error": {"message", "type", "param", "code"}}`.
The routes turn requests into engine `Job`s; how batching works lives in `engine.py`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any, Literal, Optional, Union

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from ..config import ServeConfig
from ..prompts import encode_text, render_conversation, template_stops
from ..runs import Run
from . import responses as out
from .engine import BatchEngine, Job
from .middleware import APIError, BodyLimit, RequestLog, error_response, http_error, invalid_request, unexpected_error
from .relay import Events, collect, streamed, submit
from .run import context_length, model_name
from .sampling import SamplingParams

log = logging.getLogger("qlora_helpers.serve")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOPS = 16  # OpenAI allows 4; lm-eval sends its task's stops plus EOS, vLLM takes any number


# --- request bodies ---------------------------------------------------------------------------------


class Body(BaseModel):
    # strict, as OpenAI's API is: "5", 5.0 or true for max_tokens is a 400, not 5 or 1 token (an int is a float)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class StreamOptions(Body):
    include_usage: Optional[bool] = None
    continuous_usage_stats: Optional[bool] = None  # vLLM's; usage comes once, at the end


class ResponseFormat(Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[dict[str, Any]] = None


class Sampling(Body):
    """The fields both endpoints share. None means the default."""
    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    n: Optional[int] = Field(None, ge=1, le=16)
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=-2**63, lt=2**64)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # vLLM's extensions
    top_k: Optional[int] = Field(None, ge=-1)  # -1 or 0: off
    min_tokens: Optional[int] = Field(None, ge=0)
    repetition_penalty: Optional[float] = Field(None, gt=0.0, le=10.0)
    ignore_eos: Optional[bool] = None  # generate max_tokens whatever the model says


class CompletionRequest(Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: Optional[bool] = None
    logprobs: Optional[int] = Field(None, ge=0, le=20)
    best_of: Optional[int] = Field(None, ge=1, le=16)
    suffix: Optional[str] = None


class Message(Body):
    role: Literal["system", "user", "assistant", "developer", "tool", "function"]
    content: Union[str, list[dict[str, Any]], None] = None
    name: Optional[str] = None
    refusal: Optional[str] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[str] = None
    function_call: Optional[dict[str, Any]] = None
    audio: Optional[dict[str, Any]] = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list[dict[str, Any]]] = None
    function_call: Union[str, dict[str, Any], None] = None
    audio: Optional[dict[str, Any]] = None
    modalities: Optional[list[str]] = None
    prediction: Optional[dict[str, Any]] = None
    web_search_options: Optional[dict[str, Any]] = None
    reasoning_effort: Optional[str] = None
    verbosity: Optional[str] = None
    store: Optional[bool] = None
    metadata: Optional[dict[str, str]] = None
    service_tier: Optional[str] = None
    prompt_cache_key: Optional[str] = None
    safety_identifier: Optional[str] = None


# Fields that do not change what the model generates here: accepted, logged, ignored.
IGNORED = ("user", "store", "metadata", "service_tier", "prompt_cache_key", "safety_identifier",
           "prediction", "reasoning_effort", "verbosity", "parallel_tool_calls")


def refuse_unsupported(req: Sampling) -> None:
    """A 400 naming the first field set to something this server cannot do."""
    get = lambda name: getattr(req, name, None)  # noqa: E731 - completions lack the chat-only fields
    tool_choice = get("tool_choice")
    problems = [
        ("tools", bool(get("tools")), "tool calling"),
        ("functions", bool(get("functions")), "function calling"),
        ("tool_choice", tool_choice not in (None, "none", "auto"), "tool calling"),
        ("function_call", isinstance(get("function_call"), dict) or get("function_call") not in (None, "none", "auto"),
         "function calling"),
        ("response_format", get("response_format") is not None and get("response_format").type != "text",
         "JSON mode and JSON schemas (only {\"type\": \"text\"})"),
        ("suffix", bool(get("suffix")), "insertion (suffix)"),
        ("audio", get("audio") is not None, "audio output"),
        ("modalities", any(m != "text" for m in get("modalities") or []), "modalities other than text"),
        ("web_search_options", get("web_search_options") is not None, "web search"),
        ("best_of", get("best_of") not in (None, req.n or 1), "best_of other than n"),
        ("stream_options", req.stream_options is not None and not req.stream, "stream_options without stream: true"),
        ("top_logprobs", get("top_logprobs") is not None and not get("logprobs"),
         "top_logprobs without logprobs: true"),
    ]
    for field, bad, what in problems:
        if bad:
            raise APIError(400, f"'{field}': {what} is not supported by this server.", param=field,
                           code="unsupported_parameter")


def warn_ignored(request: Request, req: Sampling) -> None:
    names = [n for n in IGNORED if getattr(req, n, None) is not None]
    if names:
        log.warning("request %s: ignoring %s (they do not change the output here)",
                    request.state.request_id, ", ".join(names))


def sampling_params(state: Serving, req: Sampling, copy: int, logprobs: int | None,
                    prompt_logprobs: bool = False) -> SamplingParams:
    bias = []
    for key, value in (req.logit_bias or {}).items():
        # ASCII digits only: str.isdigit() also passes '²' and '٣', which int() refuses or misreads
        if not re.fullmatch(r"-?[0-9]+", key) or not 0 <= int(key) < state.vocab or not -100 <= value <= 100:
            raise APIError(400, f"logit_bias takes token ids (0-{state.vocab - 1}) to values in [-100, 100]; "
                           f"got {key[:20]!r}: {value}.", param="logit_bias")
        bias.append((int(key), value))
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature, top_p=req.top_p or 1.0,
        top_k=max(0, req.top_k or 0), seed=None if req.seed is None else (req.seed + copy) % 2**64,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0, min_tokens=req.min_tokens or 0,
        logit_bias=tuple(bias), logprobs=logprobs, prompt_logprobs=prompt_logprobs)


# --- what every route needs --------------------------------------------------------------------------


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
    vocab: int
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


def serving(request: Request) -> Serving:
    return request.app.state.serving


def check_key(request: Request) -> None:
    key = serving(request).api_key
    if key is None:
        return
    sent = request.headers.get("authorization", "")
    token = sent[7:] if sent.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode("utf-8", "replace"), key.encode()):
        raise APIError(401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>'.",
                       code="invalid_api_key")


def keyed(handler):
    """`handler` for a body the route could not read, after the key check: a client without the key learns
    it needs one (401), as OpenAI answers, whatever its body (FastAPI reads the body before dependencies)."""
    async def checked(request: Request, exc: Exception):
        try:
            check_key(request)
        except APIError as refused:
            return refused.response()
        return await handler(request, exc)

    return checked


def check_model(state: Serving, requested: str) -> None:
    if requested != state.name:
        raise APIError(404, f"The model '{requested[:100]}' does not exist here; this server serves "
                       f"'{state.name}'.", param="model", code="model_not_found")


def check_text(value: str, param: str) -> str:
    """Text a tokenizer can take: UTF-8 encodable (JSON can carry lone surrogates, which are not)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"'{param}' contains a lone surrogate (not valid Unicode text).", param=param) from None
    return value


def plan_tokens(state: Serving, prompt_ids: list[int], asked: int | None, default: int | None,
                param: str = "prompt") -> int:
    """max_tokens for one prompt: what was asked (within serve.max_tokens and the context), else
    `default` (None: the rest of the context, up to serve.max_tokens). A prompt too long for the
    context is a 400 naming `param`, the field that holds it ("prompt" or "messages")."""
    cap, ctx = state.cfg.max_tokens, state.context
    if asked is not None and not 1 <= asked <= cap:
        raise APIError(400, f"max_tokens must be between 1 and {cap} (serve.max_tokens); got {asked}.",
                       param="max_tokens", code="invalid_max_tokens")
    room = ctx - len(prompt_ids)
    if room < 1 or (asked is not None and asked > room):
        raise APIError(400, f"This model's context is {ctx} tokens; the prompt has {len(prompt_ids)} and "
                       f"max_tokens asks for {asked if asked is not None else 'at least 1'}. Shorten "
                       f"the prompt or lower max_tokens.", param=param, code="context_length_exceeded")
    return asked if asked is not None else min(default or cap, cap, room)


def stop_strings(req: Sampling) -> tuple[str, ...]:
    values = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(values) > MAX_STOPS or any(not s for s in values):
        raise APIError(400, f"stop takes up to {MAX_STOPS} non-empty strings.", param="stop")
    return tuple(check_text(s, "stop") for s in values)


def new_jobs(state: Serving, req: Sampling, prompts: list[list[int]], asked: int | None, default: int | None,
             param: str, params) -> list[Job]:
    """n jobs per prompt (prompt-major), `params(copy)` their sampling; the template's section markers
    stop them too unless ignore_eos asks for max_tokens whatever the model writes."""
    stops = stop_strings(req)
    if not req.ignore_eos:
        stops += tuple(s for s in template_stops(state.template, state.tokenizer) if s not in stops)
    loop = asyncio.get_running_loop()
    return [Job(ids, plan_tokens(state, ids, asked, default, param), Events(loop), params(copy), stops,
                bool(req.ignore_eos)) for ids in prompts for copy in range(req.n or 1)]


def admit(state: Serving, request: Request, req: Sampling) -> None:
    """What every generation route checks first: the model, what cannot be done, what is ignored."""
    check_model(state, req.model)
    refuse_unsupported(req)
    warn_ignored(request, req)


@dataclasses.dataclass
class Shape:
    """What differs between the two generation routes' answers; `respond` does the rest.
    `choice(index, job)`: a finished choice; `head(index, job)`: a stream's first chunk choice for a
    job once it is prefilled (or None); `piece(index, job, text, logprob entries, finish)`: a chunk's."""
    rid: str
    kind: str
    chunk_kind: str
    choice: Callable[[int, Job], dict]
    head: Callable[[int, Job], Optional[dict]]
    piece: Callable[[int, Job, str, list, Optional[str]], dict]


async def respond(state: Serving, request: Request, req: Sampling, jobs: list[Job], shape: Shape):
    """Queue the jobs, then stream their chunks or wait and answer whole; usage counts each prompt once
    whatever n (as OpenAI does)."""
    copies = req.n or 1
    submit(state.engine, request, jobs, copies)
    if req.stream:
        # as OpenAI's chunks: one `created` for them all and, with include_usage, `usage: null` in each but the last
        usage = req.stream_options is not None and req.stream_options.include_usage
        extra = {"created": int(time.time()), **({"usage": None} if usage else {})}

        def wrap(choice: Optional[dict]) -> Optional[dict]:
            return None if choice is None else out.envelope(shape.rid, shape.chunk_kind, state.name, [choice], **extra)

        tail = out.envelope(shape.rid, shape.chunk_kind, state.name, [], **extra) if usage else None
        return streamed(request, jobs, lambda i, job: wrap(shape.head(i, job)),
                        lambda *piece: wrap(shape.piece(*piece)), tail, copies)
    if not await collect(request, jobs):
        return error_response(499, "The client closed the request.", code="client_closed_request")
    return out.envelope(shape.rid, shape.kind, state.name, [shape.choice(i, job) for i, job in enumerate(jobs)],
                        usage=out.usage(jobs, copies))


# --- routes ----------------------------------------------------------------------------------------------

router = APIRouter()


@router.get("/health")
async def health(state: Serving = Depends(serving)):
    # pid: which process answers, so a launcher can tell its own server from another one that took
    # the same port first (two runs started at once both saw 8000 free)
    return {"status": "ok", "model": state.name, "form": state.form, "pid": os.getpid(), **state.engine.stats()}


def model_card(state: Serving) -> dict[str, Any]:
    return {"id": state.name, "object": "model", "created": state.created, "owned_by": "qlora-notebooks",
            "max_model_len": state.context}


@router.get("/v1/models", dependencies=[Depends(check_key)])
async def models(state: Serving = Depends(serving)):
    return {"object": "list", "data": [model_card(state)]}


@router.get("/v1/models/{model_id:path}", dependencies=[Depends(check_key)])
async def one_model(model_id: str, state: Serving = Depends(serving)):
    check_model(state, model_id)
    return model_card(state)


async def prompt_ids(state: Serving, prompt) -> list[tuple[list[int], str | None]]:
    """(token ids, text or None) per prompt: strings are tokenized, token lists checked."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is an empty list.", param="prompt")
    texts = [check_text(p, "prompt") for p in prompt if isinstance(p, str)]
    encoded = iter(await run_in_threadpool(lambda: [encode_text(state.template, state.tokenizer, t) for t in texts]))
    prompts = []
    for p in prompt:
        ids, text = (next(encoded), p) if isinstance(p, str) else (p, None)
        if not ids:
            raise APIError(400, "The prompt is empty (no tokens); send at least one token.", param="prompt")
        if any(not 0 <= t < state.vocab for t in ids):
            raise APIError(400, f"prompt token ids must be in [0, {state.vocab}).", param="prompt")
        prompts.append((ids, text))
    return prompts


@router.post("/v1/completions", dependencies=[Depends(check_key)])
async def completions(req: CompletionRequest, request: Request, state: Serving = Depends(serving)):
    admit(state, request, req)
    prompts = await prompt_ids(state, req.prompt)
    n, echo = req.n or 1, bool(req.echo)
    jobs = new_jobs(state, req, [ids for ids, _ in prompts], req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS,
                    "prompt", lambda copy: sampling_params(state, req, copy, req.logprobs,
                                                           echo and req.logprobs is not None))
    texts = [text if text is not None else state.tokenizer.decode(ids) for ids, text in prompts for _ in range(n)]
    offsets = [len(texts[i]) if echo else 0 for i in range(len(jobs))]  # text_offset of a stream's next piece

    def head(index, job):
        if not echo:
            return None
        return out.completion_choice(state.tokenizer, index, dataclasses.replace(job, tokens=[], logprobs=[]),
                                     True, texts[index], "", None)

    def piece(index, job, text, entries, finish):
        choice = out.completion_chunk(state.tokenizer, index, job, text, entries, offsets[index], finish)
        offsets[index] += len(text)
        return choice

    def choice(index, job):
        return out.completion_choice(state.tokenizer, index, job, echo, texts[index], job.text, job.finish_reason)

    shape = Shape(f"cmpl-{request.state.request_id}", "text_completion", "text_completion", choice, head, piece)
    return await respond(state, request, req, jobs, shape)


def chat_messages(req: ChatRequest) -> list[dict[str, str]]:
    """The conversation as {role, content} text messages (developer = system), or a 400."""
    messages = []
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        if m.role in ("tool", "function") or m.tool_calls or m.function_call:
            raise APIError(400, f"'{where}': tool and function messages are not supported by this server.",
                           param=where, code="unsupported_parameter")
        if m.content is None and m.role != "assistant":
            raise APIError(400, f"'{where}.content' is required for role '{m.role}'.", param=f"{where}.content")
        if isinstance(m.content, list) and not m.content:
            raise APIError(400, f"'{where}.content' is an empty list of parts; send text or at least one text part.",
                           param=f"{where}.content")
        parts = [{"type": "text", "text": m.content or ""}] if not isinstance(m.content, list) else m.content
        for j, part in enumerate(parts):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"'{where}.content[{j}]': only text parts are supported.",
                               param=f"{where}.content", code="unsupported_parameter")
        text = "".join(check_text(p["text"], f"{where}.content") for p in parts)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    return messages


@router.post("/v1/chat/completions", dependencies=[Depends(check_key)])
async def chat(req: ChatRequest, request: Request, state: Serving = Depends(serving)):
    admit(state, request, req)
    try:
        prompt = render_conversation(chat_messages(req), state.template, state.tokenizer)
    except ValueError as exc:
        raise APIError(400, str(exc), param="messages") from None
    ids = (await prompt_ids(state, prompt))[0][0]
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    jobs = new_jobs(state, req, [ids], asked, None, "messages",
                    lambda copy: sampling_params(state, req, copy, logprobs))

    def piece(index, job, text, entries, finish):
        return out.chat_chunk(state.tokenizer, index, job, text, entries, finish)

    shape = Shape(f"chatcmpl-{request.state.request_id}", "chat.completion", "chat.completion.chunk",
                  lambda index, job: out.chat_choice(state.tokenizer, index, job, job.text),
                  lambda index, job: piece(index, job, None, [], None), piece)
    return await respond(state, request, req, jobs, shape)


# --- the app -------------------------------------------------------------------------------------------------


def create_app(engine: BatchEngine, tokenizer, run: Run, api_key: str | None, form: str) -> FastAPI:
    """The FastAPI app serving `run` through `engine`: routes, OpenAI-shaped errors, the body limit
    (chunked bodies counted as they arrive), a log line per request, and CORS when configured."""
    cfg = run.cfg.serve
    app = FastAPI(title=f"qlora-notebooks: {model_name(run)}", version="1")
    model = engine.model  # a transformers model, or llama.cpp's (serve/llamacpp.py), which has n_vocab
    vocab = getattr(model, "n_vocab", None) or model.get_output_embeddings().weight.shape[0]
    app.state.serving = Serving(engine, tokenizer, cfg, model_name(run), context_length(run, engine.model),
                                run.cfg.data.template, api_key, form, vocab)
    app.add_exception_handler(APIError, lambda request, exc: exc.response())
    app.add_exception_handler(RequestValidationError, keyed(invalid_request))
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
    app.include_router(router)
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes)
    if cfg.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(RequestLog)
    return app
