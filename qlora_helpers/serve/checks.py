"""Client-side checks: latency in process, and the real server as a client sees it (smoke checks,
a load test, with the official `openai` client). They return results; the caller decides.

Imports: torch, openai and httpx are imported inside the functions that use them (heavy; a server-side
process that imports this package never needs the clients)."""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..models import load_tokenizer
from ..paths import write_json_atomic
from ..prompts import encode_prompts
from ..runs import Run
from .engine import Job, generate_jobs
from .forms import FORMS, checked_forms
from .gguf import gguf_available
from .process import ServerProcess


def measure_generation(model, tokenizer, prompts: list[list[int]], new_tokens: int, batch_size: int,
                       repeats: int = 2, decoder=None, prompt_tokens: int | None = None) -> dict[str, Any]:
    """Time to first token and tokens/s for `batch_size` prompts generated as one batch, exactly
    `new_tokens` each (EOS ignored, so random weights cannot stop early); median of `repeats` runs
    after one warm-up. `prompts`: token ids (`bench_prompts`); `decoder`: a warmed-up
    `static.StaticDecoder` (else the dynamic path); `prompt_tokens`: each prompt's token ids repeated
    or cut to exactly that many."""
    import torch

    rows = [list(p) for p in (prompts * batch_size)[:batch_size]]
    if prompt_tokens:
        rows = [(ids * (prompt_tokens // len(ids) + 1))[:prompt_tokens] for ids in rows]

    def once(tokens: int) -> tuple[float, float, int]:
        jobs = [Job(ids, tokens, lambda *_: None, ignore_eos=True) for ids in rows]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate_jobs(model, tokenizer, jobs, decoder)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        end = time.perf_counter()
        short = sum(len(j.tokens) != tokens for j in jobs)
        return jobs[0].first_token_at - start, end - start, short

    once(2)
    runs = [once(new_tokens) for _ in range(repeats)]
    ttft = statistics.median(r[0] for r in runs)
    total = statistics.median(r[1] for r in runs)
    decode = (total - ttft) / max(1, new_tokens - 1)
    return {"batch": batch_size, "new_tokens": new_tokens, "prompt_tokens": max(len(r) for r in rows),
            "ttft_s": round(ttft, 4), "total_s": round(total, 3),
            "tokens_per_s": round(batch_size * new_tokens / total, 1),
            "decode_tokens_per_s_per_row": round(1 / decode, 1) if decode > 0 else None,
            "rows_stopped_early": max(r[2] for r in runs)}


def bench_prompts(tokenizer, template: str, n: int = 8) -> list[list[int]]:
    """Token ids of prompts of realistic length (the run's template around short instructions)."""
    topics = ["the water cycle", "a healthy breakfast", "how vaccines work", "the French revolution",
              "binary search", "photosynthesis", "saving money", "the rules of chess"]
    return encode_prompts(template, tokenizer, [f"Explain {t} in three sentences." for t in topics[:n]])


def compare_forms(run: Run, forms: tuple[str, ...] | None = None) -> dict[str, Any]:
    """4-bit base + adapter, the merged 16-bit model and (with the [gguf] extra, on a CPU) each GGUF of
    serve.gguf through llama.cpp, measured one after another in this process: TTFT and tokens/s at
    batch 1 and batched, and each form's speed as a multiple of merged's. Writes `latency.json`
    (the `forms` part)."""
    serve_cfg = run.cfg.serve
    if forms is None:
        ggufs = serve_cfg.gguf if gguf_available() and run.device == "cpu" else ()
        forms = tuple(f.name for f in checked_forms(ggufs))
    rows = []
    for form in forms:
        model = FORMS[form].load(run, rows=max(1, serve_cfg.bench_batch))
        tokenizer = load_tokenizer(run.cfg.model)
        prompts = bench_prompts(tokenizer, run.cfg.data.template)
        for batch in (1, serve_cfg.bench_batch):
            result = measure_generation(model, tokenizer, prompts, serve_cfg.bench_tokens, batch)
            rows.append({"form": form, **result})
        if hasattr(model, "close"):
            model.close()
        del model
        gc.collect()
    merged = {r["batch"]: r["tokens_per_s"] for r in rows if r["form"] == "merged"}
    for r in rows:
        r["x_merged"] = round(r["tokens_per_s"] / merged[r["batch"]], 2) if merged.get(r["batch"]) else None
    report = {"device": run.device, "compute_dtype": str(run.compute_dtype), "forms": rows,
              "machine": machine_name(run.device)}
    _update_json(run.latency_report, report)
    return report


def machine_name(device: str) -> str:
    """The card's name, or the CPU and its core count: every timing names its machine."""
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
    reference (greedy decoding), finish, and count its tokens correctly; a reference that is empty
    (the model ended at once) is a problem too, since it compares nothing. `chat`: chat requests (the
    server frames each prompt in the run's template) instead of bare completions."""
    if n < 1:  # serve.load_requests: 0 turns the load test off
        return {"requests": 0, "streaming": 0, "max_tokens": max_tokens, "chat": chat, "ok": 0,
                "problems": [], "off": "serve.load_requests is 0", "single": {}, "loaded": {}, "per_request": []}
    prompts = load_prompts(n)
    client = _client(server, max_retries=0, timeout=600)
    start = time.perf_counter()
    single = [stream_request(client, model, p, max_tokens, chat) for p in prompts]
    single_wall = time.perf_counter() - start
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
    problems = compare_answers(single, loaded)
    return {
        "requests": n, "streaming": sum(1 for g in loaded if g["stream"]), "max_tokens": max_tokens, "chat": chat,
        "ok": n - len(problems), "problems": problems,
        "single": _load_stats(single, single_wall), "loaded": _load_stats(loaded, wall),
        "per_request": [{k: v for k, v in g.items() if k != "text"} for g in loaded],
    }


def compare_answers(single: list[dict[str, Any]], loaded: list[dict[str, Any]]) -> list[str]:
    """One line per request whose answer under load is not the one it got alone (or failed, or stopped
    otherwise), and per request whose answer alone was empty: an empty reference checks nothing."""
    problems = []
    for i, (ref, got) in enumerate(zip(single, loaded)):
        if "error" in got:
            problems.append(f"request {i}: {got['error']}")
        elif not ref["text"]:
            problems.append(f"request {i}: the answer alone was empty ({ref['completion_tokens']} token(s), "
                            f"finish {ref['finish_reason']}): the model ended at once, so there is nothing to "
                            "compare (a tuned model reads a bare prompt as a finished text: use chat requests)")
        elif got["text"] != ref["text"]:
            problems.append(f"request {i}: {got['text']!r} != alone {ref['text']!r}")
        elif got["finish_reason"] not in ("stop", "length") or got["completion_tokens"] != ref["completion_tokens"]:
            problems.append(f"request {i}: finish {got['finish_reason']}, "
                            f"{got['completion_tokens']} tokens (alone: {ref['completion_tokens']})")
    return problems


def _load_stats(results: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """The same figures for the requests alone and at once: time to the first token (streaming
    requests), latency, and completion tokens per second of wall time."""
    ttfts = [r["ttft_s"] for r in results if r.get("ttft_s")]
    tokens = sum(r.get("completion_tokens") or 0 for r in results)
    return {"ttft_s_median": _median(ttfts), "ttft_s_max": round(max(ttfts), 3) if ttfts else None,
            "latency_s_median": _median([r["total_s"] for r in results if "total_s" in r]),
            "tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 2)}


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
        if not isinstance(body, dict) or not (body.get("error") or {}).get("message"):
            return f"{r.status_code} without an OpenAI error body: {str(body)[:100]}"
        return f"{r.status_code}: {body['error']['message']}"

    def expect(code: int, method: str, path: str, **kw):
        result = status_of(method, path, **kw)
        return result if result.startswith(str(code)) else False

    check("GET /v1/models", lambda: [m.id for m in client.models.list().data] == [model] and model)
    check("completion", lambda: _answer(plain_request(client, model, "The capital of France is", 8)))
    check("chat", lambda: _answer(plain_request(client, model, "Name a colour.", 8, chat=True)))
    check("streaming chat", lambda: _answer(stream_request(client, model, "Count to three.", 8, chat=True)))
    check("streaming completion", lambda: _answer(stream_request(client, model, "Once upon a time", 8)))
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
    check("unknown field -> 400", lambda: expect(400, "POST", "/v1/completions", json={**body, "frobnicate": 3}))
    return checks


def _answer(result: dict[str, Any]) -> str:
    """A check's answer text; an empty one fails the check (the request worked, but shows nothing)."""
    if not result["text"]:
        raise ValueError(f"empty answer ({result['completion_tokens']} token(s), finish {result['finish_reason']})")
    return result["text"]


def save_serve_results(run: Run, server: ServerProcess, checks: list[dict[str, Any]],
                       load: dict[str, Any]) -> dict[str, Any]:
    """`serve_smoke.json` (every check) and the server part of `latency.json` (single and loaded)."""
    smoke = {"url": server.url, "form": server.health()["form"], "checks": checks,
             "passed": sum(c["ok"] for c in checks), "total": len(checks)}
    write_json_atomic(run.serve_smoke_report, smoke)
    _update_json(run.latency_report, {"server": {k: v for k, v in load.items() if k != "per_request"}})
    write_json_atomic(run.serve_load_report, load)  # last: marks stage 06 done (runs.STAGES)
    return smoke
