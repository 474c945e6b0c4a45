"""The engine: scheduling and generation, no HTTP.

`BatchEngine` runs every generation on one worker thread behind a bounded queue (full: `QueueFull`,
which the API answers with 503). A `Job` is one prompt's generation; its `emit(kind, payload)`
receives ('text', str) pieces as they come, then ('done', finish_reason) or ('error', message).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any, Callable

from ..errors import QLoraError

@dataclasses.dataclass
class Job:
    """One request's generation. `emit(kind, payload)` receives ('text', str) pieces as they come,
    then ('done', finish_reason) or ('error', message); it is called from the generating thread."""
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[str, Any], None]
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    sent: int = 0
    finish_reason: str | None = None
    cancelled: bool = False
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    done_at: float | None = None

    @property
    def sampling_key(self) -> tuple:
        return (0.0, 1.0) if self.temperature == 0 else (self.temperature, self.top_p)


def _stop_holdback(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that could still become a stop string (not sent yet)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


class _RowTracker:
    """A stopping criterion that follows every row: appends its new token, decodes the text so far,
    sends the new piece, and ends the row at EOS, a stop string, its max_tokens or a cancel.

    transformers' streamers handle one row; this does the same bookkeeping for a batch, per row."""

    def __init__(self, jobs: list[Job], tokenizer):
        self.jobs, self.tokenizer = jobs, tokenizer
        self.eos = tokenizer.eos_token_id

    def _finish(self, job: Job, reason: str) -> None:
        job.finish_reason, job.done_at = reason, time.perf_counter()
        if not job.cancelled:
            if job.sent < len(job.text):
                job.emit("text", job.text[job.sent:])
                job.sent = len(job.text)
            job.emit("done", reason)

    def __call__(self, input_ids, scores=None, **kwargs):
        import torch

        now = time.perf_counter()
        last = input_ids[:, -1].tolist()
        done = []
        for job, token in zip(self.jobs, last):
            if job.finish_reason is None:
                self._step(job, token, now)
            done.append(job.finish_reason is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _step(self, job: Job, token: int, now: float) -> None:
        if job.first_token_at is None:
            job.first_token_at = now
        if job.cancelled:
            return self._finish(job, "cancelled")
        if token == self.eos and not job.ignore_eos:
            return self._finish(job, "stop")
        job.tokens.append(token)
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") and len(job.tokens) < job.max_tokens:
            return  # half of a multi-byte character: wait for the rest
        job.text = text
        for stop in job.stop:
            at = text.find(stop, max(0, job.sent - len(stop)))
            if at >= 0:
                job.text = text[:at]
                return self._finish(job, "stop")
        if len(job.tokens) >= job.max_tokens:
            return self._finish(job, "length")
        upto = len(text) - _stop_holdback(text, job.stop)
        if upto > job.sent:
            job.emit("text", text[job.sent:upto])
            job.sent = upto


def generate_jobs(model, tokenizer, jobs: list[Job]) -> None:
    """Run `jobs` (same sampling settings) as one left-padded batch; every job ends with 'done' or 'error'."""
    import torch
    from transformers import GenerationConfig, StoppingCriteriaList

    device = next(model.parameters()).device
    width = max(len(j.prompt_ids) for j in jobs)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(j.prompt_ids)) + j.prompt_ids for j in jobs], device=device)
    mask = torch.tensor([[0] * (width - len(j.prompt_ids)) + [1] * len(j.prompt_ids) for j in jobs],
                        device=device)
    temperature, top_p = jobs[0].sampling_key
    # EOS is handled per row by the tracker (some rows may ignore it), so generate's own is off.
    config = GenerationConfig(max_new_tokens=max(j.max_tokens for j in jobs) + 1, eos_token_id=None,
                              pad_token_id=pad, bos_token_id=tokenizer.bos_token_id,
                              do_sample=temperature > 0, temperature=temperature or None,
                              top_p=top_p if temperature > 0 else None, top_k=None)
    tracker = _RowTracker(jobs, tokenizer)
    try:
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                           stopping_criteria=StoppingCriteriaList([tracker]))
    except Exception as exc:  # noqa: BLE001 - every waiting client must hear about it
        for job in jobs:
            if job.finish_reason is None:
                job.finish_reason = "error"
                job.emit("error", f"generation failed: {type(exc).__name__}: {exc}")
        return
    for job in jobs:  # a row cannot outlive max_new_tokens, but never leave a client waiting
        if job.finish_reason is None:
            tracker._finish(job, "length")


# --- the engine: a bounded queue in front of one batching worker -------------------------------------


class QueueFull(QLoraError):
    """Too many requests are waiting; the client should retry after `retry_after` seconds."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"The server is busy ({waiting} requests waiting); retry in {retry_after} s.")
        self.retry_after = retry_after


class BatchEngine:
    """Runs generations on one worker thread, up to `max_batch` requests at once as one batch.

    Requests with the same sampling settings that wait together form a batch (oldest first); those
    arriving while a batch runs wait for it. At most `max_queue` wait; more raise `QueueFull`. So
    memory stays bounded by max_batch x context, whatever the load."""

    def __init__(self, model, tokenizer, max_batch: int, max_queue: int, batch_wait_ms: int = 10):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.batch_wait = max_batch, max_queue, batch_wait_ms / 1000
        self.waiting: collections.deque[Job] = collections.deque()
        self.running = 0
        self.completed = 0
        self._batch_seconds = 1.0
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> "BatchEngine":
        self._thread = threading.Thread(target=self._work, name="qlora-generate", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _drop_cancelled(self) -> None:
        """Requests whose clients left give up their place in the queue at once (call under the lock)."""
        if any(j.cancelled for j in self.waiting):
            self.waiting = collections.deque(j for j in self.waiting if not j.cancelled)

    def submit(self, job: Job) -> None:
        with self._cond:
            self._drop_cancelled()
            if len(self.waiting) >= self.max_queue:
                batches_ahead = 1 + len(self.waiting) // self.max_batch
                raise QueueFull(len(self.waiting), max(1, round(batches_ahead * self._batch_seconds)))
            self.waiting.append(job)
            self._cond.notify_all()

    def stats(self) -> dict[str, int]:
        with self._cond:
            self._drop_cancelled()
            return {"running": self.running, "waiting": len(self.waiting), "completed": self.completed,
                    "max_batch": self.max_batch, "max_queue": self.max_queue}

    def _take_batch(self) -> list[Job]:
        self._drop_cancelled()
        if not self.waiting:
            return []
        key = self.waiting[0].sampling_key
        batch = [j for j in self.waiting if j.sampling_key == key][:self.max_batch]
        for job in batch:
            self.waiting.remove(job)
        return batch

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self.waiting and not self._stop:
                    self._cond.wait()
                if self._stop:
                    for job in self.waiting:
                        job.emit("error", "the server is shutting down")
                    self.waiting.clear()
                    return
                deadline = self.waiting[0].submitted + self.batch_wait
                while len(self.waiting) < self.max_batch and time.perf_counter() < deadline and not self._stop:
                    self._cond.wait(timeout=max(0.0, deadline - time.perf_counter()))
                batch = self._take_batch()
                self.running = len(batch)
            if batch:
                start = time.perf_counter()
                generate_jobs(self.model, self.tokenizer, batch)
                self._batch_seconds = 0.7 * self._batch_seconds + 0.3 * (time.perf_counter() - start)
            with self._cond:
                self.running = 0
                self.completed += len(batch)


