"""Our serving engine against transformers' own compiled decoding, in one process (issue 26).

Same model, prompts and tokens for both: --prompt-tokens prompt tokens, exactly --tokens new tokens per
row, greedy. Ours: `static.StaticDecoder` + the engine's batch (`generate_jobs`, as the server runs it),
and --big concurrent requests submitted to a `BatchEngine`. Theirs: `model.generate(...,
cache_implementation="static")` (transformers compiles the decode forward itself) at each batch, and
`generate_batch` (continuous batching) with --big requests. Also: the weight-bandwidth limit (weight
bytes per step at the card's measured copy bandwidth), ablations (the engine without overlapping
steps; the step without coordinate-descent tuning), a torch.profiler view of a few steps of each, and
the warm-up with the compile cache cold, then (--warm-only in a second process) loaded from it.

    python benchmarks/engine_vs_transformers.py --model random:llama2-7b --out h200.json --cache-root /tmp/cc
    python benchmarks/engine_vs_transformers.py --model random:llama2-7b --warm-only --cache-root /tmp/cc
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_latency import copy_bandwidth, weight_bytes  # noqa: E402 - the script's siblings
from warmup_profile import Sampler, compile_metrics  # noqa: E402

START = time.perf_counter()


def prompt_rows(tokenizer, batch: int, length: int) -> list[list[int]]:
    from qlora_helpers.serve import bench_prompts

    rows = [list(ids) for ids in (bench_prompts(tokenizer, "alpaca") * batch)[:batch]]  # token ids already
    return [(ids * (length // len(ids) + 1))[:length] for ids in rows]


def timed(fn, repeats: int = 2) -> float:
    import torch

    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hf_static(model, rows: list[list[int]], tokens: int) -> dict:
    """transformers' generate with a static cache (its forward compiled on first use)."""
    import torch

    ids = torch.tensor(rows, device="cuda")
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                  do_sample=False, cache_implementation="static", pad_token_id=0)
    t0 = time.perf_counter()
    out = model.generate(ids, **kwargs)
    first = time.perf_counter() - t0
    model.generate(ids, **kwargs)
    assert out.shape[1] - ids.shape[1] == tokens, out.shape
    total = timed(lambda: model.generate(ids, **kwargs))
    return {"batch": len(rows), "tokens_per_s": round(len(rows) * tokens / total, 1), "total_s": round(total, 3),
            "first_call_s": round(first, 1)}


def hf_continuous(model, rows: list[list[int]], tokens: int) -> dict:
    """transformers' continuous batching (`generate_batch`): all requests at once."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    t0 = time.perf_counter()
    model.generate_batch(inputs=rows, generation_config=config)
    first = time.perf_counter() - t0
    results = {}

    def once():
        results.update(model.generate_batch(inputs=rows, generation_config=config))
    total = timed(once, 1)
    made = sum(len(r.generated_tokens) for r in results.values())
    return {"batch": len(rows), "tokens_per_s": round(made / total, 1), "total_s": round(total, 3),
            "generated": made, "first_call_s": round(first, 1)}


def engine_concurrent(model, tokenizer, decoder, rows: list[list[int]], tokens: int) -> dict:
    """len(rows) requests submitted at once to the engine the server runs (its queue and worker)."""
    from qlora_helpers.serve.engine import BatchEngine, Job

    def once() -> None:
        left = threading.Semaphore(0)
        engine = BatchEngine(model, tokenizer, max_batch=decoder.slots, max_queue=len(rows), decoder=decoder).start()
        try:
            jobs = [Job(r, tokens, lambda kind, _: left.release() if kind in ("done", "error") else None,
                        ignore_eos=True) for r in rows]
            for job in jobs:
                engine.submit(job)
            for _ in jobs:
                assert left.acquire(timeout=600)
            assert all(len(j.tokens) == tokens for j in jobs), [len(j.tokens) for j in jobs]
        finally:
            engine.stop()
    once()
    total = timed(once)
    return {"batch": len(rows), "tokens_per_s": round(len(rows) * tokens / total, 1), "total_s": round(total, 3)}


def profile_steps(fn, label: str, steps: int, out_dir: Path | None) -> dict:
    """Kernel time against wall time over `fn` (which runs `steps` decode steps), and the top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    syncs = sum(e.count for e in events if "Synchronize" in e.key or e.key == "aten::_local_scalar_dense")
    table = events.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
    if out_dir is not None:  # one file for every profile (what comes back from the device is counted in files)
        with (out_dir / "profiles.txt").open("a") as fh:
            fh.write(f"===== {label}: {steps} steps, {wall * 1000:.1f} ms wall\n{table}\n"
                     f"{events.table(sort_by='self_cpu_time_total', row_limit=25, max_name_column_width=70)}\n")
    return {"profile": label, "steps": steps, "wall_ms_per_step": round(1000 * wall / steps, 3),
            "kernel_ms_per_step": round(kernel_us / 1000 / steps, 3), "syncs": syncs}


class Report:
    """Rows as they come (one JSON line each, flushed: a call cut short keeps what ran), then the summary."""

    def __init__(self, out: Path | None, deadline_s: float):
        self.out, self.deadline, self.rows = out, deadline_s, []
        self.lines = out.with_suffix(".jsonl").open("w") if out else None

    def add(self, **row) -> None:
        row["at_s"] = round(time.perf_counter() - START, 1)
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.lines:
            self.lines.write(json.dumps(row) + "\n")
            self.lines.flush()

    def attempt(self, label: str, fn, *args, **row) -> None:
        """`fn(*args)` unless the deadline passed; its dict (when it returns one) is added as a row with
        `row`'s fields. An error is a row too, not the end of the run."""
        if time.perf_counter() - START > self.deadline:
            return self.add(skipped=label, reason="deadline")
        try:
            result = fn(*args)
        except Exception as exc:  # noqa: BLE001 - the other measurements still count
            traceback.print_exc()
            return self.add(failed=label, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        if result is not None:
            self.add(**row, **result)


def ours_jobs(model, tokenizer, decoder, rows: list[list[int]], tokens: int) -> None:
    """`rows` through the engine's batch, `tokens` new tokens each (what a profile of ours runs)."""
    from qlora_helpers.serve.engine import Job, generate_jobs

    generate_jobs(model, tokenizer, [Job(r, tokens, lambda *_: None, ignore_eos=True) for r in rows], decoder)


def ours(report: Report, form: str, model, tokenizer, args, buckets: tuple[int, ...], slots: int,
         extras: bool) -> None:
    """Our engine: warm-up (cold or from the cache), each batch, the concurrent requests, ablations."""
    import torch

    from qlora_helpers.serve import bench_prompts, measure_generation
    from qlora_helpers.serve.static import StaticBatch, StaticDecoder

    decoder = StaticDecoder(model, slots=slots, max_len=args.prompt_tokens + args.tokens, buckets=buckets)
    t0 = time.perf_counter()
    decoder.warm_up(args.cache_root)
    report.add(warm_up=form, seconds=round(time.perf_counter() - t0, 1), **decoder.describe(),
               cache=decoder.compile_cache)
    prompts = bench_prompts(tokenizer, "alpaca")
    for b in args.batches:
        row = measure_generation(model, tokenizer, prompts, args.tokens, b, args.repeats, decoder=decoder,
                                 prompt_tokens=args.prompt_tokens)
        report.add(engine="ours", form=form, path="static, compiled, overlapped", **row)
    if extras and slots >= args.big:
        big = prompt_rows(tokenizer, args.big, args.prompt_tokens)
        report.attempt("ours concurrent", engine_concurrent, model, tokenizer, decoder, big, args.tokens,
                       engine="ours", form=form, path="BatchEngine, concurrent")
    if extras:
        StaticBatch.overlap = False
        try:
            for b in args.batches:
                row = measure_generation(model, tokenizer, prompts, args.tokens, b, args.repeats, decoder=decoder,
                                         prompt_tokens=args.prompt_tokens)
                report.add(engine="ours", form=form, path="ablation: no overlap (one step at a time)", **row)
        finally:
            StaticBatch.overlap = True
    for b in args.batches:
        run = functools.partial(ours_jobs, model, tokenizer, decoder, prompt_rows(tokenizer, b, args.prompt_tokens), 32)
        report.attempt(f"profile ours {form} {b}", profile_steps, run, f"ours_{form.split()[0]}_b{b}", 32,
                       args.out_dir, engine="ours", form=form, batch=b)
    del decoder
    torch._dynamo.reset()


def without_tuning(report: Report, model, tokenizer, args) -> None:
    """The step compiled without coordinate-descent tuning (cuBLAS's GEMV at batch 1): what tuning gains."""
    import torch

    from qlora_helpers.serve import bench_prompts, measure_generation
    from qlora_helpers.serve.static import StaticDecoder

    decoder = StaticDecoder(model, slots=1, max_len=args.prompt_tokens + args.tokens, buckets=(1,), tune=False)
    report.add(warm_up="merged bf16, no tuning", seconds=round(decoder.warm_up(), 1))
    prompts = bench_prompts(tokenizer, "alpaca")
    row = measure_generation(model, tokenizer, prompts, args.tokens, 1, args.repeats, decoder=decoder,
                             prompt_tokens=args.prompt_tokens)
    report.add(engine="ours", form="merged bf16", path="ablation: no coordinate-descent tuning", **row)
    del decoder
    torch._dynamo.reset()


def theirs(report: Report, model, tokenizer, args) -> None:
    for b in args.batches:
        rows = prompt_rows(tokenizer, b, args.prompt_tokens)
        report.attempt(f"hf static {b}", hf_static, model, rows, args.tokens, engine="transformers",
                       path="generate, static cache, compiled")
        report.attempt(f"profile hf {b}", profile_steps, functools.partial(hf_static_once, model, rows, 32),
                       f"transformers_b{b}", 32, args.out_dir, engine="transformers", batch=b)
    rows = prompt_rows(tokenizer, args.big, args.prompt_tokens)
    report.attempt("hf continuous", hf_continuous, model, rows, args.tokens, engine="transformers",
                   path="generate_batch (continuous)")


def hf_static_once(model, rows, tokens: int) -> None:
    import torch

    ids = torch.tensor(rows, device="cuda")
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                   do_sample=False, cache_implementation="static", pad_token_id=0)


def warm_only(report: Report, merged, args, buckets: tuple[int, ...]) -> None:
    """The restart measurement: warm the decoder up (from the compile cache when --cache-root holds one);
    with --profile-warmup, where the seconds went (warmup_profile.py), into <out dir>/warmup_profile.json."""
    from qlora_helpers.serve.static import StaticDecoder

    decoder = StaticDecoder(merged, slots=args.big, max_len=args.prompt_tokens + args.tokens, buckets=buckets)
    t0 = time.perf_counter()
    if args.profile_warmup:
        with Sampler() as sampler:
            decoder.warm_up(args.cache_root)
    else:
        decoder.warm_up(args.cache_root)
    report.add(warm_up="merged bf16", seconds=round(time.perf_counter() - t0, 1),
               process_ready_s=round(time.perf_counter() - START, 1), **decoder.describe(),
               cache=decoder.compile_cache)
    if args.profile_warmup and args.out_dir is not None:
        profile = {"compile_cache": decoder.compile_cache["state"], "sampler": sampler.report(),
                   **compile_metrics()}
        path = args.out_dir / f"warmup_profile_{decoder.compile_cache['state']}.json"
        path.write_text(json.dumps(profile, indent=1, default=str) + "\n")
        report.add(profile=str(path), phases_s=profile["sampler"]["phases_s"])


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:llama2-7b")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--big", type=int, default=32, help="concurrent requests (ours: BatchEngine; theirs: "
                        "generate_batch)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--forms", default="merged,adapter")
    parser.add_argument("--cache-root", type=Path, help="the compile cache folder (compile_cache.py)")
    parser.add_argument("--warm-only", action="store_true", help="build the merged form, warm the decoder up "
                        "(buckets 1, batches, big) and report the seconds: the restart measurement")
    parser.add_argument("--profile-warmup", action="store_true", help="with --warm-only: sample where the "
                        "warm-up's seconds go and keep torch's compile metrics (warmup_profile.py)")
    parser.add_argument("--deadline", type=float, default=540, help="seconds after which measurements are skipped")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.out_dir = args.out.parent if args.out else None
    return args


def main() -> None:
    args = parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from qlora_helpers.config import load_config
    from qlora_helpers.models import load_model, load_tokenizer, resolve_model
    from qlora_helpers.serve import machine_name

    report = Report(args.out, args.deadline)
    cfg = load_config("default", [f"model.source={args.model}"])
    resolved = resolve_model(cfg.model)
    tokenizer = load_tokenizer(cfg.model, resolved)
    dtype = torch.bfloat16
    buckets = tuple(sorted({1, *args.batches, args.big}))
    merged = None
    if args.warm_only or "merged" in args.forms:
        merged = load_model(cfg.model, cfg.quant, dtype, "cuda", quantized=False, resolved=resolved).eval()
        report.add(loaded="merged bf16", seconds=round(time.perf_counter() - START, 1))
    if args.warm_only:
        return warm_only(report, merged, args, buckets)
    bandwidth = copy_bandwidth("cuda")
    versions = {n: __import__(n).__version__ for n in ("torch", "transformers", "peft", "triton")}
    report.add(machine=machine_name("cuda"), copy_bandwidth_gb_s=round(bandwidth / 1e9, 1), versions=versions)
    if "merged" in args.forms:
        report.add(limit="merged bf16", weight_gib=round(weight_bytes(merged) / 2**30, 2),
                   batch1_tokens_per_s=round(bandwidth / weight_bytes(merged), 1))
        report.attempt("ours merged", ours, report, "merged bf16", merged, tokenizer, args, buckets, args.big, True)
        report.attempt("theirs merged", theirs, report, merged, tokenizer, args)
    torch._dynamo.reset()
    if "adapter" in args.forms:
        base = load_model(cfg.model, cfg.quant, dtype, "cuda", quantized=True, resolved=resolved)
        torch.manual_seed(0)
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                          init_lora_weights=False)
        adapter = get_peft_model(base, lora).eval()
        report.add(limit="4-bit NF4 + adapter", weight_gib=round(weight_bytes(adapter) / 2**30, 2),
                   batch1_tokens_per_s=round(bandwidth / weight_bytes(adapter), 1))
        report.attempt("ours adapter", ours, report, "4-bit NF4 + adapter", adapter, tokenizer, args,
                       tuple(sorted({1, *args.batches})), max(args.batches), False)
        del adapter, base
    if "merged" in args.forms:
        report.attempt("no tuning", without_tuning, report, merged, tokenizer, args)
    if args.out:
        args.out.write_text(json.dumps(report.rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
