"""Generation speed of the serving forms (issues 6 and 17): the 4-bit NF4 base + LoRA adapter and the
merged 16-bit model, each through the dynamic-cache path and the static-slot path with the compiled
decode step (qlora_helpers/serve/static.py), and with --gguf the same merged weights as GGUF files
(llama.cpp's own converter; the [gguf] extra) run by llama.cpp behind the same engine
(qlora_helpers/serve/llamacpp.py); all through the batching code the server uses
(qlora_helpers.serve.generate_jobs), in one process, one after another, each row's tokens/s also as a
multiple of the merged model's dynamic path at the same batch (`x_merged`).

Time to first token and tokens/s at batch 1 and batched, exactly --tokens new tokens per row (EOS
ignored, so random weights never stop early) after --prompt-tokens prompt tokens; median of --repeats
runs after a warm-up. The adapter is LoRA on q_proj/v_proj with random, non-zero B (an untrained
adapter costs the same as a trained one). The merged model comes from the stage's own path:
de-quantize the 4-bit base, merge. On CUDA the static decoder's warm-up (compiling and capturing
each batch bucket) is timed and reported, and the weight-bandwidth limit line: weight bytes read per
step against the card's measured copy bandwidth. Needs torch, transformers, peft, bitsandbytes and
qlora_helpers only.

    python benchmarks/inference_latency.py --model embedded --tokens 32 --out cpu.json       # CPU
    python benchmarks/inference_latency.py --model embedded --tokens 64 --paths dynamic --gguf f16,q8_0 --out cpu.json
    python benchmarks/inference_latency.py --model random:llama2-7b --out h100.json           # GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
import time
import traceback
from pathlib import Path


def copy_bandwidth(device: str, gib: float = 2.0) -> float:
    """Bytes/s of a large device-to-device copy (bytes read + written), median of 10."""
    import statistics

    import torch

    src = torch.randn(int(gib * 2**30) // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    del src, dst
    return 2 * gib * 2**30 / statistics.median(times[2:])


def weight_bytes(model) -> int:
    """Bytes of the weights as stored (4-bit weights count their packed bytes and their absmax)."""
    total = 0
    for p in model.parameters():
        total += p.numel() * p.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:smollm2-135m",
                        help="model.source: embedded, random:smollm2-135m, random:llama2-7b, a folder or hub id")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per row")
    parser.add_argument("--prompt-tokens", type=int, default=64,
                        help="prompt tokens per row (0: the prompts as rendered)")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the batched measurement")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--forms", default="merged,adapter", help="which forms, in this order: merged, adapter")
    parser.add_argument("--paths", default="dynamic,static", help="dynamic (DynamicCache, eager), static "
                        "(static slots; compiled on CUDA)")
    parser.add_argument("--buckets", default="", help="batch buckets the static step is compiled for "
                        "(default: 1 and --batch, the two measured; the server compiles 1, 2, 4, ...)")
    parser.add_argument("--gguf", default="", help="comma-separated GGUF types to measure too (f16,q8_0,q4_k_m; "
                        "the [gguf] extra)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from qlora_helpers.config import load_config
    from qlora_helpers.models import load_model, load_tokenizer, resolve_model
    from qlora_helpers.serve import bench_prompts, machine_name, measure_generation
    from qlora_helpers.serve.static import StaticDecoder

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    cfg = load_config("default", [f"model.source={args.model}"])
    start = time.perf_counter()
    resolved = resolve_model(cfg.model)  # builds a random shape once (on the GPU when there is one)
    build_s = time.perf_counter() - start
    tokenizer = load_tokenizer(cfg.model, resolved)
    prompts = bench_prompts(tokenizer, "alpaca")
    buckets = tuple(int(b) for b in args.buckets.split(",")) if args.buckets else tuple(sorted({1, args.batch}))
    bandwidth = copy_bandwidth(device) if cuda else None
    rows: list[dict] = []
    seconds: dict[str, float] = {}
    warmups: dict[str, dict] = {}
    limits: dict[str, dict] = {}

    def measure(form: str, path: str, model, decoder=None) -> None:
        for batch in (1, args.batch):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            result = measure_generation(model, tokenizer, prompts, args.tokens, batch, args.repeats,
                                        decoder=decoder, prompt_tokens=args.prompt_tokens or None)
            if cuda:
                result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            rows.append({"form": form, "path": path, **result})
            print(json.dumps(rows[-1]), flush=True)

    def measure_form(form: str, model) -> None:
        if bandwidth:
            weights = weight_bytes(model)
            limits[form] = {"weight_gib": round(weights / 2**30, 2),
                            "batch1_tokens_per_s": round(bandwidth / weights, 1),
                            f"batch{args.batch}_tokens_per_s": round(args.batch * bandwidth / weights, 1)}
            print(json.dumps({"limit": form, **limits[form]}), flush=True)
        if "dynamic" in args.paths:
            measure(form, "dynamic", model)
        if "static" not in args.paths:
            return
        prompt = args.prompt_tokens or max(len(tokenizer(p)["input_ids"]) for p in prompts)
        decoder = StaticDecoder(model, slots=args.batch, max_len=prompt + args.tokens, buckets=buckets)
        try:
            decoder.warm_up()
            warmups[form] = decoder.describe()
        except Exception as exc:  # noqa: BLE001 - say what happens, then measure the eager slots
            traceback.print_exc()
            warmups[form] = {"compile_error": f"{type(exc).__name__}: {str(exc)[:400]}"}
            decoder = StaticDecoder(model, slots=args.batch, max_len=prompt + args.tokens, compile=False)
            warmups[form]["fallback"] = "static slots, eager"
        print(json.dumps({"warm_up": form, **warmups[form]}), flush=True)
        measure(form, "static, compiled" if decoder.compiled else "static, eager", model, decoder)
        del decoder
        torch._dynamo.reset()

    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                      target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        base = load_model(cfg.model, cfg.quant, dtype, device, quantized=True, resolved=resolved)
        torch.manual_seed(0)
        get_peft_model(base, lora).save_pretrained(tmp)
        del base
        seconds["adapter"] = round(time.perf_counter() - t0, 1)
        for form in args.forms.split(","):
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            t0 = time.perf_counter()
            base = load_model(cfg.model, cfg.quant, dtype, device, quantized=True, resolved=resolved)
            if form == "adapter":
                model, name = PeftModel.from_pretrained(base, tmp).eval(), "4-bit base + adapter"
            else:
                model = PeftModel.from_pretrained(base.dequantize(dtype=dtype), tmp).merge_and_unload().eval()
                name = f"merged {str(dtype).replace('torch.', '')}"
            seconds[f"load_{form}"] = round(time.perf_counter() - t0, 1)
            measure_form(name, model)
            if form == "merged" and args.gguf:  # what 06 exports: the merged weights in bf16, with the tokenizer
                model.to(torch.bfloat16).save_pretrained(Path(tmp) / "merged", safe_serialization=True)
                tokenizer.save_pretrained(Path(tmp) / "merged")
            del model, base
        for gguf_type in [t for t in args.gguf.split(",") if t]:
            from qlora_helpers.serve.gguf import quantize, run_converter
            from qlora_helpers.serve.llamacpp import LlamaCppModel

            if not (Path(tmp) / "merged").is_dir():
                raise SystemExit("--gguf needs the merged form in --forms")
            f16 = Path(tmp) / "model-f16.gguf"
            if not f16.is_file():
                run_converter(Path(tmp) / "merged", f16, "f16")
            path = Path(tmp) / f"model-{gguf_type}.gguf"
            if gguf_type != "f16":
                quantize(f16, path, gguf_type)
            model = LlamaCppModel(path, context=args.prompt_tokens + args.tokens + 64, rows=args.batch)
            measure(f"GGUF {gguf_type}", "llama.cpp", model)
            model.close()

    merged = {r["batch"]: r["tokens_per_s"] for r in rows if r["form"].startswith("merged") and r["path"] == "dynamic"}
    for r in rows:
        r["x_merged"] = round(r["tokens_per_s"] / merged[r["batch"]], 2) if merged.get(r["batch"]) else None

    machine = machine_name(device)
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("transformers", "peft", "bitsandbytes"):
        versions[name] = __import__(name).__version__
    if args.gguf:
        from qlora_helpers.serve.gguf import llama_cpp_version

        versions["llama-cpp-python"] = llama_cpp_version()
    seconds.update(build_or_resolve=round(build_s, 1), total=round(time.perf_counter() - start, 1))
    report = {"model": args.model, "machine": machine, "device": device, "compute_dtype": str(dtype),
              "tokens": args.tokens, "prompt_tokens": args.prompt_tokens, "batch": args.batch,
              "lora_r": args.lora_r, "versions": versions, "seconds": seconds,
              "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1) if bandwidth else None,
              "bandwidth_limit": limits, "static_warm_up": warmups, "rows": rows}
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))
    for row in rows:
        print(f"{row['form']:24} {row['path']:17} batch {row['batch']}: {row['tokens_per_s']:8.1f} tokens/s, "
              f"TTFT {row['ttft_s']:.3f} s, x merged {row['x_merged']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
