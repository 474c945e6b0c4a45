"""The engine: scheduling and generation, no HTTP.

Iteration-level scheduling (Orca's idea, what vLLM and TGI do): one worker thread runs decode
steps over the rows generating now. Between two steps, finished and cancelled rows leave and
waiting requests join (each prefilled alone, then merged into the batch's KV cache), so a short
request never waits for a long one to finish. Every row has its own sampling settings
(`sampling.py`), so requests with different settings share a step.

The batch's KV cache is transformers' `DynamicCache`, left-padded to a common length; each row's
attention mask hides its padding and its positions count its own tokens only, so a row computes
what it would compute alone. `decode_step` is the one forward call per step of this dynamic path.
On CUDA the server replaces the whole batch with `static.StaticBatch` (fixed slots of a static KV
cache, a compiled decode step per batch bucket; `serve.compile`), which keeps this scheduler, its
rows and its per-row choices; the dynamic path stays the fallback (CPU, `serve.compile: false`).

A `Job` is one prompt's generation (`batch.py`, with the step skeleton every backend's batch shares).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

import torch
from transformers import DynamicCache

from ..errors import QLoraError
from .batch import Job, Rows, with_cache
from .static import StaticBatch

log = logging.getLogger("qlora_helpers.serve")


def decode_step(model, cache: DynamicCache, tokens: torch.Tensor, mask: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
    """One forward step: each row's pending token [rows, 1] at its own position -> logits [rows, vocab]."""
    out = model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                **with_cache(model, cache))
    return out.logits[:, -1].float()


def _pad_cache(cache: DynamicCache, width: int) -> None:
    """Left-pad every layer's keys and values with `width` zero positions (masked out)."""
    for layer in cache.layers:
        layer.keys = torch.nn.functional.pad(layer.keys, (0, 0, width, 0))
        layer.values = torch.nn.functional.pad(layer.values, (0, 0, width, 0))


class Batch(Rows):
    """The rows generating now: a left-padded KV cache that holds every row's tokens but its pending
    (last chosen, not yet fed) one, the matching attention mask, and the pending tokens."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        self.jobs: list[Job] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, cached positions], 1 = a real token
        self.pending: list[int] = []

    @torch.no_grad()
    def add(self, job: Job) -> None:
        """Prefill `job` alone, choose its first token, and merge it into the batch (unless it is done)."""
        job.generator = job.sampling.generator(self.device)
        ids = torch.tensor([job.prompt_ids], device=self.device)
        cache = DynamicCache(config=self.model.config)
        keep = 0 if job.sampling.prompt_logprobs else 1  # 0: logits at every position
        logits = self.model(input_ids=ids, use_cache=True, logits_to_keep=keep,
                            **with_cache(self.model, cache)).logits[0].float()
        if job.sampling.prompt_logprobs:
            self._record_prompt_logprobs(job, logits)
        token = self._choose(job, logits[-1])
        if job.finish_reason is not None:
            return
        mask = torch.ones(1, ids.shape[1], dtype=torch.long, device=self.device)
        if self.cache is None:
            self.cache, self.mask = cache, mask
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            for c, m in ((self.cache, self.mask), (cache, mask)):
                _pad_cache(c, width - m.shape[1])
            pad = torch.nn.functional.pad
            self.mask = torch.cat([pad(self.mask, (width - self.mask.shape[1], 0)),
                                   pad(mask, (width - mask.shape[1], 0))])
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys = torch.cat([mine.keys, theirs.keys])
                mine.values = torch.cat([mine.values, theirs.values])
        self.jobs.append(job)
        self.pending.append(token)

    def _next_tokens(self) -> list[int]:
        positions = self.mask.sum(dim=1, keepdim=True)  # each row's own count of real tokens
        self.mask = torch.nn.functional.pad(self.mask, (0, 1), value=1)
        tokens = torch.tensor([[t] for t in self.pending], device=self.device)
        logits = decode_step(self.model, self.cache, tokens, self.mask, positions)
        return [self._choose(job, row) for job, row in zip(self.jobs, logits)]

    def _drop(self, keep: list[bool]) -> None:
        """Keep the rows marked True, then drop the padding columns no row needs."""
        index = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long, device=self.device)
        self.jobs = [j for j, k in zip(self.jobs, keep) if k]
        self.pending = [t for t, k in zip(self.pending, keep) if k]
        if not self.jobs:
            self.cache = self.mask = None
            return
        self.mask = self.mask[index]
        unused = int((self.mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # leading all-padding columns
        self.mask = self.mask[:, unused:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, unused:]
            layer.values = layer.values[index, :, unused:]


def new_batch(model, tokenizer, decoder=None) -> Rows:
    """The rows generating now, for `model`: the static-slot batch over `decoder` (a compiled
    `static.StaticDecoder`, CUDA); a backend with its own forward pass (llama.cpp, serve/llamacpp.py)
    brings its own Batch through the model's `new_batch`; else the dynamic `Batch`."""
    if decoder is not None:
        return StaticBatch(model, tokenizer, decoder)
    own = getattr(model, "new_batch", None)
    return own(tokenizer) if own is not None else Batch(model, tokenizer)


def generate_jobs(model, tokenizer, jobs: list[Job], decoder=None) -> None:
    """Run `jobs` to the end as one batch (no queue, no thread): what the latency measurement uses."""
    batch = new_batch(model, tokenizer, decoder)
    for job in jobs:
        batch.add(job)
    batch.step()  # the static batch prefills the rows that joined here
    while batch.jobs:
        batch.step()


# --- the engine: a bounded queue in front of the worker --------------------------------------------


DRAIN_WINDOW_S = 120.0  # completions this recent measure how fast the queue drains


def drain_seconds(finished_at, waiting: int, now: float, fallback: float, busy_since: float | None = None) -> int:
    """Retry-After for a full queue: the seconds its `waiting` jobs take to finish at the rate jobs
    finished over the last DRAIN_WINDOW_S (`finished_at`: their perf_counter times, oldest first),
    counted from `busy_since` (when the engine last went from idle to busy) where that is later: time
    the engine sat idle is no time it spent draining (after 90 s idle, a queue that drained in 2 s
    answered Retry-After: 26). `fallback` until a second of completions has been seen."""
    start = now - DRAIN_WINDOW_S if busy_since is None else max(now - DRAIN_WINDOW_S, busy_since)
    recent = [t for t in finished_at if t >= start]
    if busy_since is None and recent:
        start = recent[0]
    if not recent or now - start < 1.0:
        return max(1, round(fallback))
    return max(1, round(waiting * (now - start) / len(recent)))


class QueueFull(QLoraError):
    """Too many requests are waiting; the client should retry after `retry_after` seconds."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"The server is busy ({waiting} generations queued, n per prompt); "
                         f"retry in {retry_after} s.")
        self.retry_after = retry_after


class BatchEngine:
    """Runs generations on one worker thread, at most `max_batch` rows at once; waiting requests
    join at the next step. At most `max_queue` wait; more raise `QueueFull`. So memory stays bounded
    by max_batch x context, whatever the load. With a `decoder` (`static.StaticDecoder`, warmed up),
    rows decode in its static slots with the compiled step."""

    def __init__(self, model, tokenizer, max_batch: int, max_queue: int, batch_wait_ms: int = 10,
                 decoder=None):
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_queue, self.batch_wait = max_batch, max_queue, batch_wait_ms / 1000
        self.waiting: collections.deque[Job] = collections.deque()
        self.decoder = decoder
        self.batch = new_batch(model, tokenizer, decoder)
        self.running = 0
        self.completed = 0
        self._job_seconds = 1.0
        self.finished_at: collections.deque[float] = collections.deque(maxlen=512)  # for Retry-After
        self.busy_since = time.perf_counter()  # when the engine last went from idle to busy (Retry-After)
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> BatchEngine:
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
                rounds = 1 + len(self.waiting) // self.max_batch
                raise QueueFull(len(self.waiting), drain_seconds(self.finished_at, len(self.waiting),
                                                                 time.perf_counter(), rounds * self._job_seconds,
                                                                 self.busy_since))
            if not self.waiting and not self.running:  # idle until now
                self.busy_since = time.perf_counter()
            self.waiting.append(job)
            self._cond.notify_all()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            self._drop_cancelled()
            decode = {"decode": "dynamic"} if self.decoder is None else self.decoder.describe()
            return {"running": self.running, "waiting": len(self.waiting), "completed": self.completed,
                    "max_batch": self.max_batch, "max_queue": self.max_queue, **decode}

    def _admit(self) -> list[Job] | None:
        """Wait for work; the jobs that join at this step (None: stop). Idle, it waits batch_wait for
        more arrivals, so a burst is prefilled together."""
        with self._cond:
            while not self.waiting and not self.batch.jobs and not self._stop:
                self._cond.wait()
            if self._stop:
                return None
            if not self.batch.jobs and self.waiting:
                deadline = self.waiting[0].submitted + self.batch_wait
                while len(self.waiting) < self.max_batch and time.perf_counter() < deadline and not self._stop:
                    self._cond.wait(timeout=max(0.0, deadline - time.perf_counter()))
            self._drop_cancelled()
            joining = []
            while self.waiting and len(self.batch.jobs) + len(joining) < self.max_batch:
                joining.append(self.waiting.popleft())
            self.running = len(self.batch.jobs) + len(joining)
            return joining

    def _join(self, joining: list[Job]) -> list[Job]:
        """Prefill each joining job; one whose prefill fails ends with an error alone. The jobs
        that ended at once (EOS or max_tokens on the first token, or the error) are returned."""
        done = []
        for job in joining:
            try:
                self.batch.add(job)
            except Exception as exc:  # noqa: BLE001 - its client must hear about it
                log.exception("a prefill failed; its request ends with an error")  # the 500 alone says not why
                job.finish_reason = "error"
                job.emit("error", f"generation failed: {type(exc).__name__}: {exc}")
            if job.finish_reason is not None:
                done.append(job)
        return done

    def _work(self) -> None:
        while (joining := self._admit()) is not None:
            done = self._join(joining)
            try:
                done += self.batch.step()
            except Exception as exc:  # noqa: BLE001 - every client in the batch must hear about it
                log.exception("a decode step failed; its %d rows end with an error", len(self.batch.jobs))
                done += self.batch.jobs
                self.batch.fail(f"generation failed: {type(exc).__name__}: {exc}")
            with self._cond:
                self.running = len(self.batch.jobs)
                self.completed += len(done)
                self.finished_at.extend(job.done_at or time.perf_counter() for job in done)
                for job in done:  # a job's own run time: the fallback's rounds count the turns it waited
                    ran = (job.done_at or time.perf_counter()) - (job.first_token_at or job.submitted)
                    self._job_seconds = 0.7 * self._job_seconds + 0.3 * ran
        with self._cond:
            for job in list(self.waiting) + self.batch.jobs:
                job.emit("error", "the server is shutting down")
            self.waiting.clear()
