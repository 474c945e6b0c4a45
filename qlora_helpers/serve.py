"""Stage 06: serve the tuned model. Merge and export it, generate in batches, and answer the OpenAI API.

- `merge_and_export`: de-quantize the 4-bit base to the compute dtype, merge the adapter, check the
  merged logits against base + adapter, save 16-bit safetensors (what vLLM and TGI load).
- `BatchEngine`: one worker thread that gathers waiting requests for a few ms and runs them as one
  left-padded `generate` (streaming and not alike), each row stopping at its own EOS, stop string or
  max_tokens; a bounded queue in front of it (full: `QueueFull`, which the API answers with 503).
- `create_app`: the FastAPI app (`/v1/models`, `/v1/completions`, `/v1/chat/completions`, `/health`),
  `serve_run` runs it under uvicorn, `ServerProcess` starts and stops `python -m qlora_helpers serve`.
- `measure_generation`, `compare_forms`, `load_test`: time to first token and tokens/s, in process and
  through the real server with the official `openai` client.

FastAPI, uvicorn and openai are imported inside the functions that need them, so the latency
benchmark (`benchmarks/inference_latency.py`) runs with torch, transformers, peft and bitsandbytes alone.
"""

import atexit
import collections
import dataclasses
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import config_from_dict
from .errors import QLoraError
from .paths import atomic_dir, read_json, write_json_atomic, write_text_atomic
from .runs import Run

PROBE_TEXTS = ["Below is an instruction that describes a task. Write a short poem about the sea.",
               "The capital of France is", "def add(a, b):\n    return"]


# --- the run ------------------------------------------------------------------------------------


def open_run_folder(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Run:
    """A run from its folder (`outputs/<run>`), as 01 set it up; overrides may change `serve.*` only."""
    from .config import apply_overrides

    path = Path(path).expanduser().resolve()
    data = read_json(path / "config.json")
    bad = [o for o in overrides if not o.strip().startswith("serve.")]
    if bad:
        raise QLoraError(f"Only serve.* settings can change when serving a finished run; got {bad[0]!r}. "
                         f"Other settings belong to the run (set them in 01 and retrain).")
    cfg = config_from_dict(apply_overrides(data, overrides))
    return Run(path.name, path, cfg, read_json(path / "env.json"))


def model_name(run: Run) -> str:
    return run.cfg.serve.model_name or run.name


def context_length(run: Run, model=None) -> int:
    """Prompt + answer tokens a request may use: serve.context_length or model.max_seq_length."""
    n = run.cfg.serve.context_length or run.cfg.model.max_seq_length
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and n > limit:
        raise QLoraError(f"serve.context_length={n} exceeds the model's max_position_embeddings={limit}; "
                         f"lower it.")
    return n


def _adapter_dir(run: Run) -> Path:
    adapter = run.path / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise QLoraError(f"No adapter in {adapter}. Run notebooks/04_train.ipynb for run {run.name!r} first.")
    return adapter


# --- merge and export ---------------------------------------------------------------------------


def merge_adapter(run: Run):
    """(merged model in the compute dtype, tokenizer): the 4-bit base de-quantized, the adapter merged.

    peft's own `merge_and_unload` on a 4-bit model re-quantizes the merged weights (lossy); merging
    into the de-quantized weights keeps exactly what base + adapter computes.
    """
    from peft import PeftModel

    from .models import load_model, load_tokenizer

    adapter = _adapter_dir(run)
    tokenizer = load_tokenizer(run.cfg.model)
    base = load_model(run.cfg.model, run.cfg.quant, run.compute_dtype, run.device)
    if run.cfg.quant.load_in_4bit:
        base = base.dequantize(dtype=run.compute_dtype)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.eval()
    return merged, tokenizer


def probe_logits(model, tokenizer, texts: list[str] = PROBE_TEXTS):
    """Logits of a few texts (one by one, no padding), stacked into one float32 CPU tensor."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").to(device)
            out.append(model(**ids).logits[0].float().cpu())
    return torch.cat(out)


def _logit_gap(a, b) -> dict[str, float]:
    diff = (a - b).abs()
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
            "logit_scale": float(a.abs().max()),
            "same_argmax": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def merge_and_export(run: Run) -> dict[str, Any]:
    """Merge, check the merged logits against base + adapter, save 16-bit safetensors to
    `outputs/<run>/merged/`, reload it and check again; write `merge.json` and `serve_commands.md`."""
    import gc

    import torch

    from .evaluate import load_tuned_model

    start = time.perf_counter()
    tuned, tokenizer = load_tuned_model(run)
    reference = probe_logits(tuned, tokenizer)
    del tuned
    merged, _ = merge_adapter(run)
    in_memory = _logit_gap(probe_logits(merged, tokenizer), reference)
    folder = run.path / "merged"
    export_dtype = getattr(torch, run.cfg.serve.export_dtype)
    merged.to(export_dtype)
    with atomic_dir(folder) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    del merged
    gc.collect()
    reloaded = load_merged(run)
    exported = _logit_gap(probe_logits(reloaded, tokenizer), reference)
    del reloaded
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    report = {"merged_dir": str(folder), "adapter_dir": str(_adapter_dir(run)),
              "export_dtype": run.cfg.serve.export_dtype, "compute_dtype": str(run.compute_dtype),
              "probe_tokens": int(reference.shape[0]),
              "merged_vs_adapter_logits": in_memory, "exported_vs_adapter_logits": exported,
              "files": files, "merged_mib": round(sum(files.values()) / 2**20, 1),
              "seconds": round(time.perf_counter() - start, 1)}
    write_json_atomic(run.path / "merge.json", report)
    write_text_atomic(run.path / "serve_commands.md", export_commands(run))
    return report


def load_merged(run: Run):
    """The exported 16-bit model, loaded in the compute dtype on the run's device."""
    from transformers import AutoModelForCausalLM

    folder = run.path / "merged"
    if not (folder / "config.json").is_file():
        raise QLoraError(f"No merged model in {folder}: run merge_and_export (06_serve) first.")
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=run.compute_dtype, device_map={"": run.device},
        attn_implementation=run.cfg.model.attn_implementation)
    model.eval()
    return model


def base_location(run: Run) -> str:
    """The full-precision base a LoRA-serving engine needs next to the adapter (folder or hub id)."""
    from .models import resolve_model

    return resolve_model(run.cfg.model).location


def export_commands(run: Run) -> str:
    """Markdown with the exact vLLM and TGI commands for the merged folder and the adapter folder."""
    name, ctx = model_name(run), context_length(run)
    merged, adapter = run.path / "merged", run.path / "adapter"
    rank = max(8, run.cfg.lora.r)
    return f"""# Serving run {run.name} at scale

Merged 16-bit model (`{merged}`): an ordinary transformers folder (config.json, model.safetensors,
tokenizer). Adapter (`{adapter}`): peft's layout (adapter_config.json, adapter_model.safetensors).

## vLLM (OpenAI-compatible server on port 8000)

```bash
# merged weights
vllm serve {merged} --served-model-name {name} --max-model-len {ctx} --dtype {run.cfg.serve.export_dtype}
# full-precision base + the LoRA adapter (switchable per request with "model": "{name}")
vllm serve {base_location(run)} --enable-lora --lora-modules {name}={adapter} \\
    --max-lora-rank {rank} --max-model-len {ctx}
```

## Text Generation Inference (Docker, port 8080)

```bash
docker run --gpus all --shm-size 1g -p 8080:80 -v {run.path}:/data \\
    ghcr.io/huggingface/text-generation-inference:latest --model-id /data/merged
```

The adapter was trained against the 4-bit base; served on the 16-bit base its outputs differ
slightly from `python -m qlora_helpers serve` with serve.form=adapter (the QLoRA paper's caveat).
"""


# --- in the notebook: pipeline prompts, streaming, a chat box ---------------------------------------------


def prompt_for(run: Run, tokenizer, instruction: str) -> str:
    """An instruction in the run's template (what the adapter was trained on)."""
    from .generation import render_prompt

    return render_prompt(tokenizer, instruction, "chat" if run.cfg.data.template == "chat" else "alpaca")


def stream_text(model, tokenizer, prompt: str, max_new_tokens: int) -> Iterator[str]:
    """Greedy generation, yielding text pieces as they come (transformers' TextIteratorStreamer,
    generate running in a thread)."""
    from transformers import TextIteratorStreamer

    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
    worker = threading.Thread(target=model.generate, daemon=True, kwargs=dict(
        **enc, streamer=streamer, max_new_tokens=max_new_tokens, do_sample=False,
        pad_token_id=tokenizer.pad_token_id))
    worker.start()
    yield from streamer
    worker.join()


def chat_box(run: Run, model, tokenizer, max_new_tokens: int = 128):
    """An ipywidgets chat: type, press Enter or Send, watch the answer stream in."""
    import html

    import ipywidgets as widgets

    log = widgets.HTML(value="<i>Ask something.</i>")
    # continuous_update=False: the box sends its whole text on Enter (or when it loses focus) as one
    # value change. Text.on_submit raced the per-keystroke updates: in JupyterLab a message typed
    # and sent at once arrived as its first letter (found by tests/test_browser.py).
    entry = widgets.Text(placeholder="Your message", continuous_update=False, layout=widgets.Layout(width="70%"))
    send = widgets.Button(description="Send", button_style="primary")
    turns: list[str] = []

    def on_send(_=None):
        question, entry.value = entry.value.strip(), ""
        if not question:
            return
        turns.append(f"<b>you</b>: {html.escape(question)}")
        answer = ""
        for piece in stream_text(model, tokenizer, prompt_for(run, tokenizer, question), max_new_tokens):
            answer += piece
            log.value = "<br>".join(turns + [f"<b>model</b>: {html.escape(answer)}"])
        turns.append(f"<b>model</b>: {html.escape(answer)}")

    send.on_click(on_send)  # a click first blurs the box, whose text then arrives as a value change
    entry.observe(lambda change: on_send() if change["new"].strip() else None, names="value")
    return widgets.VBox([log, widgets.HBox([entry, send])])


# --- choosing and loading what to serve -----------------------------------------------------------


def estimate_merged_bytes(run: Run) -> int:
    """Bytes the merged model needs in the compute dtype (counted on empty weights, nothing loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import resolve_model

    config = AutoConfig.from_pretrained(resolve_model(run.cfg.model).location)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in empty.parameters())
    return n * run.compute_dtype.itemsize


def free_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def choose_form(run: Run) -> dict[str, Any]:
    """serve.form, or for `auto` the merged model when it fits in 80% of free memory (it generates
    faster on CPU and GPU, benchmarks/BENCHMARKS.md), else the 4-bit base + adapter."""
    form = run.cfg.serve.form
    if form != "auto":
        return {"form": form, "reason": f"serve.form={form}"}
    need, free = estimate_merged_bytes(run), free_memory_bytes(run.device)
    fits = need < 0.8 * free
    return {"form": "merged" if fits else "adapter",
            "reason": f"auto: merged needs {need / 2**30:.2f} GiB, {free / 2**30:.1f} GiB free on {run.device}"
                      + ("" if fits else " (too little: serving the 4-bit base + adapter)")}


def load_serving_model(run: Run, form: str):
    """(model, tokenizer) for serving: 'merged' (exported first if missing) or 'adapter' (4-bit + peft)."""
    from .evaluate import load_tuned_model
    from .models import load_tokenizer

    if form == "adapter":
        return load_tuned_model(run)
    if not (run.path / "merged" / "config.json").is_file():
        merge_and_export(run)
    return load_merged(run), load_tokenizer(run.cfg.model)


# --- generation: one batch, each row with its own limits --------------------------------------------


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


# --- the OpenAI-compatible API ---------------------------------------------------------------------


def render_chat(messages: list[dict[str, str]], template: str, tokenizer) -> str:
    """The prompt for a conversation, in the run's template (the one the adapter was trained on)."""
    from .data import RowProblem, render

    record = {"kind": "chat", "messages": list(messages) + [{"role": "assistant", "content": ""}]}
    try:
        return render(record, template, tokenizer)[0]
    except RowProblem as exc:
        raise ValueError(f"{exc.detail} (this run was trained with data.template={template!r})") from None


def create_app(engine: BatchEngine, tokenizer, run: Run, api_key: str | None, form: str):
    """The FastAPI app. Errors come back in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    import asyncio
    from typing import Literal, Optional, Union

    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.concurrency import run_in_threadpool

    serve_cfg, name = run.cfg.serve, model_name(run)
    ctx = context_length(run, engine.model)
    template = run.cfg.data.template
    created = int(time.time())

    class APIError(Exception):
        def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                     kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
            self.status, self.message, self.param, self.code = status, message, param, code
            self.kind, self.headers = kind, headers

    def error_response(status, message, param=None, code=None, kind="invalid_request_error", headers=None):
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        return JSONResponse(body, status_code=status, headers=headers)

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

    app = FastAPI(title=f"qlora-notebooks: {name}", version="1")

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.kind, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return error_response(400, f"The request body is not valid JSON: {first.get('msg')} "
                                  f"(at character {first.get('loc', ['', '?'])[-1]}).", code="invalid_json")
        where = ".".join(str(x) for x in first.get("loc", ())[1:]) or "body"
        extra = " (not supported by this server)" if first.get("type") == "extra_forbidden" else ""
        return error_response(400, f"Invalid field '{where}': {first.get('msg')}{extra}.", param=where)

    @app.exception_handler(404)
    async def _not_found(request, exc):
        return error_response(404, f"No route {request.method} {request.url.path}; see /v1/models, "
                              f"/v1/completions, /v1/chat/completions, /health.", code="not_found")

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None:
                return error_response(411, "Send a Content-Length header (chunked bodies are not accepted).")
            if not length.isdigit() or int(length) > serve_cfg.max_body_bytes:
                return error_response(413, f"The request body is {length} bytes; the limit is "
                                      f"{serve_cfg.max_body_bytes} (serve.max_body_bytes).")
        return await call_next(request)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        import hmac

        sent = request.headers.get("authorization", "")
        token = sent[7:] if sent.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise APIError(401, "Missing or wrong API key: send the header 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")

    def check_model(requested: str) -> None:
        if requested != name:
            raise APIError(404, f"The model '{requested}' does not exist here; this server serves '{name}'.",
                           param="model", code="model_not_found")

    def plan_tokens(prompt_ids: list[int], asked: int | None) -> int:
        cap = serve_cfg.max_tokens
        if asked is not None and not 1 <= asked <= cap:
            raise APIError(400, f"max_tokens must be between 1 and {cap} (serve.max_tokens); got {asked}.",
                           param="max_tokens", code="invalid_max_tokens")
        room = ctx - len(prompt_ids)
        if room < 1 or (asked is not None and asked > room):
            raise APIError(400, f"This model's context is {ctx} tokens; the prompt has {len(prompt_ids)} and "
                           f"max_tokens asks for {asked if asked is not None else 'at least 1'}. Shorten "
                           f"the prompt or lower max_tokens.", param="messages", code="context_length_exceeded")
        return asked if asked is not None else min(serve_cfg.default_max_tokens, room)

    def stops(req: Sampling) -> tuple[str, ...]:
        values = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(values) > 4 or any(not s for s in values):
            raise APIError(400, "stop takes up to 4 non-empty strings.", param="stop")
        return tuple(values)

    class Stream:
        """Events from the generating thread into this request's asyncio queue."""

        def __init__(self, loop):
            self.loop, self.queue = loop, asyncio.Queue()

        def emit(self, kind, payload):
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, payload))

    async def start_jobs(prompts: list[str], req: Sampling, max_tokens: int | None) -> list[tuple[Job, Stream]]:
        encoded = await run_in_threadpool(lambda: [tokenizer(p)["input_ids"] for p in prompts])
        loop = asyncio.get_running_loop()
        jobs = []
        for ids in encoded:
            stream = Stream(loop)
            job = Job(ids, plan_tokens(ids, max_tokens), stream.emit, req.temperature, req.top_p,
                      stops(req), req.ignore_eos)
            jobs.append((job, stream))
        if len(jobs) > engine.max_queue:
            raise APIError(400, f"At most {engine.max_queue} prompts per request.", param="prompt")
        try:
            for job, _ in jobs:
                engine.submit(job)
        except QueueFull as exc:
            for job, _ in jobs:
                job.cancelled = True
            raise APIError(503, str(exc), kind="server_error", code="server_busy",
                           headers={"Retry-After": str(exc.retry_after)}) from None
        return jobs

    async def collect(job: Job, stream: Stream) -> str:
        while True:
            kind, payload = await stream.queue.get()
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

    def streamed(jobs: list[tuple[Job, Stream]], chunk: Callable[[int, str | None, str | None], dict],
                 req: Sampling, object_name: str, rid: str):
        async def events():
            try:
                for index, (job, stream) in enumerate(jobs):
                    first = chunk(index, None, None)
                    if first:
                        yield sse(first)
                    while True:
                        kind, payload = await stream.queue.get()
                        if kind == "text":
                            yield sse(chunk(index, payload, None))
                        elif kind == "done":
                            yield sse(chunk(index, None, payload))
                            break
                        else:
                            yield sse({"error": {"message": payload, "type": "server_error",
                                                 "code": "generation_failed"}})
                            return
                if req.stream_options and req.stream_options.include_usage:
                    yield sse({"id": rid, "object": object_name, "created": int(time.time()), "model": name,
                               "choices": [], "usage": usage([j for j, _ in jobs])})
                yield sse("[DONE]")
            finally:  # the client left (or we finished): free the rows still generating
                for job, _ in jobs:
                    job.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "form": form, **engine.stats()}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "qlora-notebooks", "max_model_len": ctx}]}

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(req: CompletionRequest):
        check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not prompts:
            raise APIError(400, "prompt is an empty list.", param="prompt")
        jobs = await start_jobs(prompts, req, req.max_tokens)
        rid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            def chunk(index, text, finish):
                if text is None and finish is None:
                    return None
                return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": name,
                        "choices": [{"index": index, "text": text or "", "logprobs": None,
                                     "finish_reason": finish}]}
            return streamed(jobs, chunk, req, "text_completion", rid)
        texts = [await collect(job, stream) for job, stream in jobs]
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": name,
                "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": j.finish_reason}
                            for i, (t, (j, _)) in enumerate(zip(texts, jobs))],
                "usage": usage([j for j, _ in jobs])}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(req: ChatRequest):
        check_model(req.model)
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in req.messages]
        try:
            prompt = render_chat(messages, template, tokenizer)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        jobs = await start_jobs([prompt], req, asked)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            def chunk(index, text, finish):
                delta = {"role": "assistant", "content": ""} if text is None and finish is None else (
                    {"content": text} if text is not None else {})
                return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                        "model": name, "choices": [{"index": index, "delta": delta, "logprobs": None,
                                                    "finish_reason": finish}]}
            return streamed(jobs, chunk, req, "chat.completion.chunk", rid)
        job, stream = jobs[0]
        text = await collect(job, stream)
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": job.finish_reason}],
                "usage": usage([job])}

    return app


def api_key_from_env(run: Run) -> str | None:
    """The API key from the environment variable serve.api_key_env names (None when no key is asked)."""
    env = run.cfg.serve.api_key_env
    if env is None:
        return None
    key = os.environ.get(env)
    if not key:
        raise QLoraError(f"serve.api_key_env names ${env}, which is not set (or empty). Export the key "
                         f"in that variable before starting the server, or set serve.api_key_env=null.")
    return key


def serve_run(run: Run) -> None:
    """Load the model (serve.form), then serve the API with uvicorn until Ctrl-C or SIGTERM."""
    import uvicorn

    api_key = api_key_from_env(run)
    choice = choose_form(run)
    print(f"loading {choice['form']} ({choice['reason']})", flush=True)
    model, tokenizer = load_serving_model(run, choice["form"])
    engine = BatchEngine(model, tokenizer, run.cfg.serve.max_concurrent, run.cfg.serve.max_queue,
                         run.cfg.serve.batch_wait_ms).start()
    app = create_app(engine, tokenizer, run, api_key, choice["form"])
    host, port = run.cfg.serve.host, run.cfg.serve.port
    print(f"serving '{model_name(run)}' on http://{host}:{port}/v1 (auth: "
          f"{'Bearer key from $' + run.cfg.serve.api_key_env if api_key else 'none'})", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, timeout_graceful_shutdown=10)
    finally:
        engine.stop()


# --- starting and stopping the server from Python ---------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


class ServerProcess:
    """`python -m qlora_helpers serve --run <folder>` in a child process; `start()` waits for /health.

    The API key reaches the child through its environment only (serve.api_key_env), never argv or logs."""

    def __init__(self, run: Run, overrides: list[str] | tuple[str, ...] = (), port: int | None = None,
                 api_key: str | None = None):
        saved = read_json(run.path / "config.json").get("serve", {})
        changed = [f"serve.{k}={json.dumps(v)}" for k, v in dataclasses.asdict(run.cfg.serve).items()
                   if saved.get(k) != v and k != "port"]  # what open_run_folder changed travels along
        self.run, self.overrides = run, changed + list(overrides)
        host = run.cfg.serve.host
        self.port = port or (run.cfg.serve.port if port_is_free(host, run.cfg.serve.port) else free_port(host))
        self.url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{self.port}"
        self.api_key = api_key or (api_key_from_env(run) if run.cfg.serve.api_key_env else None)
        self.log_path = run.path / "serve" / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def start(self, timeout: float = 300) -> "ServerProcess":
        if self.proc is not None and self.proc.poll() is None:
            raise QLoraError(f"This server is already running (pid {self.proc.pid}, {self.url}).")
        if not port_is_free(self.run.cfg.serve.host, self.port):
            raise QLoraError(f"Port {self.port} is taken; pick another (serve.port) or stop what uses it.")
        env = dict(os.environ)
        key_env = self.run.cfg.serve.api_key_env
        if key_env and self.api_key:
            env[key_env] = self.api_key
        cmd = [sys.executable, "-m", "qlora_helpers", "serve", "--run", str(self.run.path),
               "--port", str(self.port)] + [x for o in self.overrides for x in ("--set", o)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        atexit.register(self.stop)  # never leave a server behind when Python exits
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise QLoraError(f"The server exited with code {self.proc.returncode} before it was ready:\n"
                                 f"{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.3)
        self.stop()
        raise QLoraError(f"The server was not ready after {timeout:.0f} s; its log:\n{self.log_tail()}")

    def healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def health(self) -> dict[str, Any]:
        import httpx

        return httpx.get(f"{self.url}/health", timeout=5).json()

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.is_file():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30) -> bool:
        """SIGTERM (uvicorn finishes the requests in flight, then re-raises the signal), SIGKILL after
        `timeout`. True when the server shut down cleanly."""
        if self.proc is None:
            return False
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return self.proc.returncode in (0, -15) and "Finished server process" in self.log_tail(10)

    def __enter__(self) -> "ServerProcess":
        return self if self.proc is not None and self.proc.poll() is None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def start_server(run: Run, api_key: str | None = None, **kw) -> ServerProcess:
    """Start the server for `run` (a free port if serve.port is taken); `.stop()` it when done."""
    return ServerProcess(run, api_key=api_key, **kw).start()


# --- latency: in process --------------------------------------------------------------------------------


def measure_generation(model, tokenizer, prompts: list[str], new_tokens: int, batch_size: int,
                       repeats: int = 2) -> dict[str, Any]:
    """Time to first token and tokens/s for `batch_size` prompts generated as one batch, exactly
    `new_tokens` each (EOS ignored, so random weights cannot stop early); median of `repeats` runs
    after one warm-up."""
    import torch

    rows = [tokenizer(p)["input_ids"] for p in (prompts * batch_size)[:batch_size]]

    def once(tokens: int) -> tuple[float, float]:
        jobs = [Job(ids, tokens, lambda *_: None, ignore_eos=True) for ids in rows]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate_jobs(model, tokenizer, jobs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        end = time.perf_counter()
        assert all(len(j.tokens) == tokens for j in jobs), "a row stopped early"
        return jobs[0].first_token_at - start, end - start

    once(2)
    runs = [once(new_tokens) for _ in range(repeats)]
    ttft = statistics.median(r[0] for r in runs)
    total = statistics.median(r[1] for r in runs)
    decode = (total - ttft) / max(1, new_tokens - 1)
    return {"batch": batch_size, "new_tokens": new_tokens, "prompt_tokens": max(len(r) for r in rows),
            "ttft_s": round(ttft, 4), "total_s": round(total, 3),
            "tokens_per_s": round(batch_size * new_tokens / total, 1),
            "decode_tokens_per_s_per_row": round(1 / decode, 1) if decode > 0 else None}


def bench_prompts(tokenizer, template: str, n: int = 8) -> list[str]:
    """Alpaca-style prompts of realistic length (the rendered template around short instructions)."""
    from .generation import render_prompt

    topics = ["the water cycle", "a healthy breakfast", "how vaccines work", "the French revolution",
              "binary search", "photosynthesis", "saving money", "the rules of chess"]
    style = "chat" if template == "chat" else "alpaca"
    return [render_prompt(tokenizer, f"Explain {t} in three sentences.", style) for t in topics[:n]]


def compare_forms(run: Run, forms: tuple[str, ...] = ("adapter", "merged")) -> dict[str, Any]:
    """4-bit base + adapter against the merged 16-bit model: TTFT and tokens/s at batch 1 and batched.
    Writes `latency.json` (the `forms` part)."""
    import gc

    from .evaluate import load_tuned_model
    from .models import load_tokenizer

    serve_cfg = run.cfg.serve
    rows = []
    for form in forms:
        model = load_tuned_model(run)[0] if form == "adapter" else load_merged(run)
        tokenizer = load_tokenizer(run.cfg.model)
        prompts = bench_prompts(tokenizer, run.cfg.data.template)
        for batch in (1, serve_cfg.bench_batch):
            result = measure_generation(model, tokenizer, prompts, serve_cfg.bench_tokens, batch)
            rows.append({"form": form, **result})
        del model
        gc.collect()
    report = {"device": run.device, "compute_dtype": str(run.compute_dtype), "forms": rows,
              "machine": machine_name(run.device)}
    _update_json(run.path / "latency.json", report)
    return report


def machine_name(device: str) -> str:
    """The card's name, or the CPU and its core count: every timing names its machine."""
    import platform

    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    return f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()})"


def _update_json(path: Path, part: dict[str, Any]) -> None:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.update(part)
    write_json_atomic(path, data)


# --- through the real server: smoke checks and the load test ---------------------------------------------


def _client(server: ServerProcess, api_key: str | None = None, **kw):
    from openai import OpenAI

    return OpenAI(base_url=server.base_url, api_key=api_key or server.api_key or "no-key", **kw)


def stream_request(client, model: str, prompt: str, max_tokens: int, chat: bool = False) -> dict[str, Any]:
    """One streaming request; its text, finish reason, usage, time to first token and total time."""
    start = time.perf_counter()
    first, pieces, finish, usage = None, [], None, None
    kwargs = dict(model=model, max_tokens=max_tokens, temperature=0, stream=True,
                  stream_options={"include_usage": True})
    stream = (client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kwargs)
              if chat else client.completions.create(prompt=prompt, **kwargs))
    for event in stream:
        if event.usage is not None:
            usage = event.usage
        for choice in event.choices:
            piece = choice.delta.content if chat else choice.text
            if piece:
                first = first or time.perf_counter()
                pieces.append(piece)
            finish = choice.finish_reason or finish
    end = time.perf_counter()
    return {"text": "".join(pieces), "finish_reason": finish, "stream": True,
            "completion_tokens": usage.completion_tokens if usage else None,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "ttft_s": (first - start) if first else None, "total_s": end - start}


def plain_request(client, model: str, prompt: str, max_tokens: int, chat: bool = False) -> dict[str, Any]:
    start = time.perf_counter()
    if chat:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, temperature=0)
        text = r.choices[0].message.content
    else:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        text = r.choices[0].text
    return {"text": text, "finish_reason": r.choices[0].finish_reason, "stream": False,
            "completion_tokens": r.usage.completion_tokens, "prompt_tokens": r.usage.prompt_tokens,
            "ttft_s": None, "total_s": time.perf_counter() - start}


def load_prompts(n: int) -> list[str]:
    """Distinct prompts, so that an answer given to the wrong request shows."""
    return [f"Request {i}: write one sentence about the number {i * 7 + 3}." for i in range(n)]


def load_test(server: ServerProcess, model: str, n: int, max_tokens: int, chat: bool = False) -> dict[str, Any]:
    """First each prompt alone (streaming: the single-request reference text and latency), then all
    `n` at once from `n` threads, half streaming. Every concurrent answer must equal its prompt's
    reference (greedy decoding), finish, and count its tokens correctly."""
    from concurrent.futures import ThreadPoolExecutor

    prompts = load_prompts(n)
    client = _client(server, max_retries=0, timeout=600)
    single = [stream_request(client, model, p, max_tokens, chat) for p in prompts]
    barrier = threading.Barrier(n)

    def one(i: int) -> dict[str, Any]:
        barrier.wait()
        try:
            call = stream_request if i % 2 == 0 else plain_request
            return {"index": i, **call(client, model, prompts[i], max_tokens, chat)}
        except Exception as exc:  # noqa: BLE001 - a failed request is a result here, not a crash
            return {"index": i, "error": f"{type(exc).__name__}: {exc}", "stream": i % 2 == 0}

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=n) as pool:
        loaded = list(pool.map(one, range(n)))
    wall = time.perf_counter() - start
    problems = []
    for ref, got in zip(single, loaded):
        if "error" in got:
            problems.append(f"request {got['index']}: {got['error']}")
        elif got["text"] != ref["text"]:
            problems.append(f"request {got['index']}: {got['text']!r} != alone {ref['text']!r}")
        elif got["finish_reason"] not in ("stop", "length") or got["completion_tokens"] != ref["completion_tokens"]:
            problems.append(f"request {got['index']}: finish {got['finish_reason']}, "
                            f"{got['completion_tokens']} tokens (alone: {ref['completion_tokens']})")
    tokens = sum(g.get("completion_tokens") or 0 for g in loaded)
    ttfts = [g["ttft_s"] for g in loaded if g.get("ttft_s")]
    return {
        "requests": n, "streaming": sum(1 for g in loaded if g["stream"]), "max_tokens": max_tokens,
        "ok": n - len(problems), "problems": problems,
        "single": {"ttft_s_median": _median([s["ttft_s"] for s in single]),
                   "tokens_per_s": round(sum(s["completion_tokens"] for s in single)
                                         / sum(s["total_s"] for s in single), 1),
                   "latency_s_median": _median([s["total_s"] for s in single])},
        "loaded": {"ttft_s_median": _median(ttfts), "ttft_s_max": round(max(ttfts), 3) if ttfts else None,
                   "latency_s_median": _median([g["total_s"] for g in loaded if "total_s" in g]),
                   "tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 2)},
        "per_request": [{k: v for k, v in g.items() if k != "text"} for g in loaded],
    }


def _median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def smoke_test(server: ServerProcess, model: str) -> list[dict[str, Any]]:
    """The API as a client sees it: each endpoint once, and the bad requests it must refuse."""
    import httpx
    import openai

    client = _client(server, max_retries=0)
    checks: list[dict[str, Any]] = []

    def check(name: str, fn: Callable[[], Any]) -> None:
        start = time.perf_counter()
        try:
            detail, ok = fn(), True
        except Exception as exc:  # noqa: BLE001 - recorded as a failed check
            detail, ok = f"{type(exc).__name__}: {exc}", False
        checks.append({"check": name, "ok": bool(ok and detail is not False), "detail": str(detail)[:160],
                       "seconds": round(time.perf_counter() - start, 3)})

    def status_of(method: str, path: str, **kw) -> str:
        headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
        headers.update(kw.pop("headers", {}))
        r = httpx.request(method, server.url + path, headers=headers, timeout=30, **kw)
        body = r.json()
        assert "error" in body and body["error"]["message"], body
        return f"{r.status_code}: {body['error']['message']}"

    def expect(code: int, method: str, path: str, **kw):
        result = status_of(method, path, **kw)
        return result if result.startswith(str(code)) else False

    check("GET /v1/models", lambda: [m.id for m in client.models.list().data] == [model] and model)
    check("completion", lambda: plain_request(client, model, "The capital of France is", 8)["text"])
    check("chat", lambda: plain_request(client, model, "Name a colour.", 8, chat=True)["text"])
    check("streaming chat", lambda: stream_request(client, model, "Count to three.", 8, chat=True)["text"])
    check("streaming completion", lambda: stream_request(client, model, "Once upon a time", 8)["text"])
    if server.api_key:
        def refused():
            try:
                _client(server, api_key="wrong-key", max_retries=0).models.list()
            except openai.AuthenticationError as exc:
                return f"401: {exc.body['message'] if isinstance(exc.body, dict) else exc}"
            return False
        check("wrong API key refused", refused)
    body = {"model": model, "prompt": "Hi"}
    check("bad JSON -> 400", lambda: expect(400, "POST", "/v1/completions", content=b"{not json",
                                            headers={"Content-Type": "application/json"}))
    check("unknown model -> 404", lambda: expect(404, "POST", "/v1/completions", json={**body, "model": "nope"}))
    check("negative max_tokens -> 400", lambda: expect(400, "POST", "/v1/completions", json={**body, "max_tokens": -5}))
    check("huge max_tokens -> 400", lambda: expect(400, "POST", "/v1/completions",
                                                   json={**body, "max_tokens": 10**9}))
    check("prompt over the context -> 400", lambda: expect(400, "POST", "/v1/completions",
                                                           json={**body, "prompt": "word " * 100_000}))
    check("unknown field -> 400", lambda: expect(400, "POST", "/v1/completions", json={**body, "best_of": 3}))
    return checks


def save_serve_results(run: Run, server: ServerProcess, checks: list[dict[str, Any]],
                       load: dict[str, Any]) -> dict[str, Any]:
    """`serve_smoke.json` (every check) and the server part of `latency.json` (single and loaded)."""
    smoke = {"url": server.url, "form": server.health()["form"], "checks": checks,
             "passed": sum(c["ok"] for c in checks), "total": len(checks)}
    write_json_atomic(run.path / "serve_smoke.json", smoke)
    _update_json(run.path / "latency.json", {"server": {k: v for k, v in load.items() if k != "per_request"}})
    write_json_atomic(run.path / "serve_load.json", load)
    return smoke
