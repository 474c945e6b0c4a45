"""The rows generating now, whatever runs their forward pass: a job's state and the step skeleton.

A `Job` is one prompt's generation. Its `emit(kind, payload)` is called from the worker thread with
('text', (piece, logprob entries)) as text comes, then ('done', finish_reason) or ('error', message).
`advance` takes one new token for a row (decode, stop strings, max_tokens, the text sent so far).

`Rows` is the skeleton every backend's batch shares: one `step` drops the cancelled rows, lets the
waiting rows in, asks the backend for each row's next token, and drops the rows that ended. A
backend supplies only what differs: how rows join (`add`, and `_join` for those prefilled at the
step), the forward pass that yields the next tokens (`_next_tokens`), and what a leaving row frees
(`_drop`). The backends: `engine.Batch` (transformers, a dynamic KV cache), `static.StaticBatch`
(static slots, a compiled step on CUDA) and `llamacpp.LlamaCppBatch` (a GGUF file's forward pass).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch

from .sampling import SamplingParams, choose_token, logprob_entry


@dataclasses.dataclass(eq=False)
class Job:
    """One prompt's generation: its settings, then its state as the worker fills it in."""
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[str, Any], None]
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    tokens: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    sent: int = 0
    logprobs: list[dict] = dataclasses.field(default_factory=list)  # one entry per generated token
    logprobs_sent: int = 0
    prompt_logprobs: list[dict | None] = dataclasses.field(default_factory=list)  # when sampling.prompt_logprobs
    finish_reason: str | None = None
    ended_on_eos: bool = False  # the end token was generated (it counts in usage, as vLLM counts it)
    context_text: str | None = None  # the prompt's last tokens decoded, for tokenizers that strip (`decode_new`)
    cancelled: bool = False
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    done_at: float | None = None
    generator: torch.Generator | None = None

    @property
    def generated(self) -> int:
        """Tokens the model generated for this row: the text's, and the end token if it ended on one
        (the logprobs have an entry for each, so usage and logprobs agree)."""
        return len(self.tokens) + self.ended_on_eos


_DECODERS: weakref.WeakKeyDictionary[Any, frozenset[str]] = weakref.WeakKeyDictionary()


def decoder_types(tokenizer) -> frozenset[str]:
    """The `type`s in a fast tokenizer's decoder, a Sequence's parts included (empty for others)."""
    if tokenizer not in _DECODERS:
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        spec = decoder.__getstate__().decode("utf-8", "replace") if decoder is not None else ""
        _DECODERS[tokenizer] = frozenset(re.findall(r'"type"\s*:\s*"(\w+)"', spec))
    return _DECODERS[tokenizer]


CONTEXT_TOKENS = 4  # prompt tokens decoded before a row's own (vLLM's incremental detokenizer keeps 5)


def decode_new(job: Job, tokenizer) -> str:
    """The row's text so far. SentencePiece decoders (LLaMA 2, Mistral: a `Strip` or `Metaspace` step)
    drop the space that starts a text, so " Paris" after "The capital of France is" would read "Paris":
    the tokens are decoded after the prompt's last few and that context is cut off again."""
    if not decoder_types(tokenizer) & {"Strip", "Metaspace"}:
        return tokenizer.decode(job.tokens, skip_special_tokens=True)
    context = job.prompt_ids[-CONTEXT_TOKENS:]
    if job.context_text is None:
        job.context_text = tokenizer.decode(context, skip_special_tokens=True)
    whole = tokenizer.decode(context + job.tokens, skip_special_tokens=True)
    if whole.startswith(job.context_text):
        return whole[len(job.context_text):]
    return tokenizer.decode(job.tokens, skip_special_tokens=True)


def _stop_holdback(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` that could still become a stop string (not sent yet)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return hold


def _send(job: Job, upto: int) -> None:
    """Emit the text up to `upto` not sent yet, with the logprob entries that came since the last piece."""
    entries = job.logprobs[job.logprobs_sent:]
    if upto > job.sent or entries:
        job.emit("text", (job.text[job.sent:upto], entries))
        job.sent, job.logprobs_sent = max(job.sent, upto), len(job.logprobs)


def finish(job: Job, reason: str) -> None:
    """End the row: the rest of its text (unless nobody listens any more), then 'done'."""
    job.finish_reason, job.done_at = reason, time.perf_counter()
    if not job.cancelled:
        _send(job, len(job.text))
    job.emit("done", reason)


def advance(job: Job, token: int, tokenizer, entry: dict | None) -> None:
    """One new token for `job`: append it, decode, send the new text, or end the row (EOS, a stop
    string, max_tokens). transformers' streamers do this for one row; the engine needs it per row."""
    if job.first_token_at is None:
        job.first_token_at = time.perf_counter()
    if entry is not None:
        # the EOS that ends a row too: lm-eval's loglikelihood reads the generated token's entry whatever it
        # is, and vLLM reports it (and counts it in usage: Job.generated)
        job.logprobs.append(entry)
    if token == tokenizer.eos_token_id and not job.ignore_eos:
        job.ended_on_eos = True
        return finish(job, "stop")
    job.tokens.append(token)
    text = decode_new(job, tokenizer)
    if text.endswith("\ufffd") and len(job.tokens) < job.max_tokens:
        return  # half of a multi-byte character: wait for the rest
    job.text = text
    for stop in job.stop:
        at = text.find(stop, max(0, job.sent - len(stop)))
        if at >= 0:
            job.text = text[:at]
            return finish(job, "stop")
    if len(job.tokens) >= job.max_tokens:
        job.text = job.text.rstrip("\ufffd")  # a character cut in half by max_tokens is never sent
        return finish(job, "length")
    _send(job, len(text) - _stop_holdback(text, job.stop))


@functools.cache
def _cache_argument(forward_class: type) -> str:
    """The name of the KV-cache argument: `cache` in transformers 5.2x (where `past_key_values` is a
    deprecated alias), `past_key_values` in earlier 5.x releases, which ignore `cache` silently."""
    return "cache" if "cache" in inspect.signature(forward_class.forward).parameters else "past_key_values"


def with_cache(model, cache) -> dict[str, Any]:
    """{argument name: cache} for `model` (a peft wrapper is asked about the model it wraps)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {_cache_argument(type(base)): cache}


class Rows:
    """The rows generating now (`jobs`) and each one's pending token (chosen, not yet fed), in the
    same order. Subclasses set `model`, `tokenizer`, `device`, `jobs` and `pending`, and supply `add`,
    `_next_tokens` and `_drop` (and `_join` when rows join at the step rather than in `add`)."""

    model: Any
    tokenizer: Any
    device: torch.device
    jobs: list[Job]
    pending: list[int]

    def add(self, job: Job) -> None:
        """Take `job` in (prefilled now, or at the next step); a job done at once stays out."""
        raise NotImplementedError

    def _join(self) -> list[Job]:
        """Rows that join at this step (after the cancelled ones left); returns those that ended at once."""
        return []

    def _next_tokens(self) -> list[int]:
        """One forward step for every row (their pending tokens in) -> each row's next token, chosen
        and advanced (`_choose`)."""
        raise NotImplementedError

    def _drop(self, keep: list[bool]) -> None:
        """Keep only the rows marked True in `jobs` and `pending` and free the others' state (every
        row that leaves is finished already)."""
        raise NotImplementedError

    def _choose(self, job: Job, logits: torch.Tensor) -> int:
        """The row's next token from its logits [vocab]; records its logprob entry when asked."""
        params = job.sampling
        token = choose_token(logits, params, job.prompt_ids, job.tokens, self.tokenizer.eos_token_id,
                             job.generator)
        entry = None
        if params.logprobs is not None:
            entry = logprob_entry(torch.log_softmax(logits, dim=-1), token, params.logprobs)
        advance(job, token, self.tokenizer, entry)
        return token

    def _record_prompt_logprobs(self, job: Job, logits: torch.Tensor) -> None:
        """Completions' echo: each prompt token's logprob given the tokens before it (none for the first)."""
        logprobs = torch.log_softmax(logits, dim=-1)
        top = job.sampling.logprobs or 0
        job.prompt_logprobs = [None] + [logprob_entry(logprobs[i], t, top)
                                        for i, t in enumerate(job.prompt_ids[1:])]

    @torch.no_grad()
    def step(self) -> list[Job]:
        """One decode step for every row; returns the jobs that ended (they have left the batch)."""
        cancelled = [j for j in self.jobs if j.cancelled]
        self._keep([not j.cancelled for j in self.jobs])
        done = self._join()
        if not self.jobs:
            return cancelled + done
        self.pending = self._next_tokens()
        done += [j for j in self.jobs if j.finish_reason is not None]
        self._keep([j.finish_reason is None for j in self.jobs])
        return cancelled + done

    def _keep(self, keep: list[bool]) -> None:
        """Keep only the rows marked True; the others (cancelled unless they ended) leave."""
        if all(keep):
            return
        for job, k in zip(self.jobs, keep):
            if not k and job.finish_reason is None:
                finish(job, "cancelled")
        self._drop(keep)

    def fail(self, message: str) -> None:
        """Every row ends with an error (the step raised); the batch starts empty."""
        for job in self.jobs:
            if job.finish_reason is None:
                job.finish_reason = "error"
                job.emit("error", message)
        self._drop([False] * len(self.jobs))
