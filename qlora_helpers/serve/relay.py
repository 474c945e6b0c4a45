"""Between the engine's thread and the HTTP responses: each job's events land in its request's asyncio
queue; a non-streaming request waits for them (watching for the client leaving), a streaming one
turns them into server-sent events. A client that leaves cancels its rows within one step."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from . import responses as out
from .engine import Job, QueueFull
from .middleware import APIError

DISCONNECT_POLL_S = 0.05  # how often a waiting non-streaming request checks that its client is still there


class Events:
    """A job's `emit`: events from the generating thread into this request's asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def __call__(self, kind: str, payload: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))


def submit(engine, request: Request, jobs: list[Job], copies: int = 1) -> None:
    """Queue every job of the request (`copies` per prompt: n), or none (503 + Retry-After when the
    queue is full)."""
    if len(jobs) > engine.max_queue:  # the field at fault: n when the prompts alone would fit
        prompts = len(jobs) // copies
        raise APIError(400, f"At most {engine.max_queue} prompts x n per request (serve.max_queue), this one "
                       f"asks {prompts} x {copies}.", param="prompt" if prompts > engine.max_queue else "n")
    try:
        for job in jobs:
            engine.submit(job)
    except QueueFull as exc:
        for job in jobs:
            job.cancelled = True
        raise APIError(503, str(exc), kind="server_error", code="server_busy",
                       headers={"Retry-After": str(exc.retry_after)}) from None
    request.state.jobs, request.state.copies = jobs, copies  # the log line counts them: only jobs that ran


async def collect(request: Request, jobs: list[Job]) -> bool:
    """Wait until every job is done; False (and the jobs cancelled) if the client leaves first.
    The client is checked every DISCONNECT_POLL_S, however busy the queue (text comes every step)."""
    checked = time.monotonic()
    for job in jobs:
        kind = None
        while kind != "done":
            try:
                kind, payload = await asyncio.wait_for(job.emit.queue.get(), timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                kind = None
            if kind == "error":  # the request ends here: the other choices' rows need not generate on
                for j in jobs:
                    j.cancelled = True
                raise APIError(500, payload, kind="server_error", code="generation_failed")
            if time.monotonic() - checked >= DISCONNECT_POLL_S:
                checked = time.monotonic()
                if await request.is_disconnected():
                    for j in jobs:
                        j.cancelled = True
                    request.state.outcome = "disconnected"
                    return False
    return True


def _chunk(index: int, job: Job, kind: str, payload: Any, held: list[dict], piece) -> tuple[str | None, list[dict]]:
    """The SSE line for one of a job's events (None: nothing to send yet) and the logprob entries still held:
    those that came without text (the end token's) go with what follows."""
    if kind == "text" and not payload[0]:
        return None, held + payload[1]
    if kind == "text":
        return out.sse(piece(index, job, payload[0], held + payload[1], None)), []
    if kind == "done":
        return out.sse(piece(index, job, "", held, payload)), []
    return out.sse({"error": {"message": payload, "type": "server_error", "code": "generation_failed"}}), []


def streamed(request: Request, jobs: list[Job], head, piece, tail: dict | None, copies: int = 1) -> StreamingResponse:
    """SSE: per job `head(index, job)` (or None) once it is prefilled, then `piece(index, job, text,
    entries, finish)` per event, the jobs' chunks interleaved as they come, as OpenAI streams n choices
    (sent job after job, choice 1 waited for the whole of choice 0); then `tail` (the usage chunk, each
    prompt of `copies` jobs counted once) when asked, and [DONE]."""
    async def events():
        finished = False
        waits: dict[asyncio.Future, int] = {}  # each unfinished job's next event
        try:
            held: list[list[dict]] = [[] for _ in jobs]
            started = [False] * len(jobs)
            waits = {asyncio.ensure_future(job.emit.queue.get()): i for i, job in enumerate(jobs)}
            while waits:
                ready, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for wait in sorted(ready, key=waits.get):
                    index = waits.pop(wait)
                    job, (kind, payload) = jobs[index], wait.result()
                    if not started[index]:
                        started[index] = True
                        first = head(index, job)
                        if first:
                            yield out.sse(first)
                    line, held[index] = _chunk(index, job, kind, payload, held[index], piece)
                    if line is not None:
                        yield line
                    if kind == "error":
                        finished = True
                        return
                    if kind != "done":
                        waits[asyncio.ensure_future(job.emit.queue.get())] = index
            if tail is not None:
                yield out.sse(tail | {"usage": out.usage(jobs, copies)})
            yield out.sse("[DONE]")
            finished = True
        finally:  # the client left (or we finished): free the rows still generating
            for wait in waits:
                wait.cancel()
            for job in jobs:
                job.cancelled = True
            if not finished:
                request.state.outcome = "disconnected"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
