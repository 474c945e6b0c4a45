"""Generation speed of the serving forms (issues 6, 17): the 4-bit NF4 base + LoRA adapter against the
merged 16-bit model, through the batching code the server uses (qlora_helpers.serve.generate_jobs),
and with --gguf the same merged weights as GGUF files (llama.cpp's own converter; the [gguf] extra)
run by llama.cpp behind the same engine (qlora_helpers.serve.llamacpp), all in one process, one
after another, with each row's tokens/s as a multiple of merged's (`x_merged`).

Time to first token and tokens/s at batch 1 and batched, exactly --tokens new tokens per row (EOS
ignored, so random weights never stop early); median of --repeats runs after a warm-up. The adapter
is LoRA on q_proj/v_proj with random, non-zero B (an untrained adapter costs the same as a trained
one). The merged model comes from the stage's own path: de-quantize the 4-bit base, merge.
Needs torch, transformers, peft, bitsandbytes and qlora_helpers only.

    python benchmarks/inference_latency.py --model embedded --tokens 32 --out cpu.json       # CPU
    python benchmarks/inference_latency.py --model embedded --tokens 64 --gguf f16,q8_0 --out cpu.json
    python benchmarks/inference_latency.py --model random:llama2-7b --out h100.json           # GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:smollm2-135m",
                        help="model.source: embedded, random:smollm2-135m, random:llama2-7b, a folder or hub id")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per row")
    parser.add_argument("--batch", type=int, default=8, help="batch size of the batched measurement")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--gguf", default="", help="comma-separated GGUF types to measure too (f16,q8_0,q4_k_m)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from qlora_helpers.config import load_config
    from qlora_helpers.models import load_model, load_tokenizer, resolve_model
    from qlora_helpers.serve import bench_prompts, machine_name, measure_generation

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    cfg = load_config("default", [f"model.source={args.model}"])
    start = time.perf_counter()
    resolved = resolve_model(cfg.model)  # builds a random shape once (on the GPU when there is one)
    build_s = time.perf_counter() - start
    tokenizer = load_tokenizer(cfg.model, resolved)
    prompts = bench_prompts(tokenizer, "alpaca")
    rows: list[dict] = []

    def measure(form: str, model) -> None:
        for batch in (1, args.batch):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            result = measure_generation(model, tokenizer, prompts, args.tokens, batch, args.repeats)
            if cuda:
                result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            rows.append({"form": form, **result})
            print(json.dumps(rows[-1]), flush=True)

    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                      target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        base = load_model(cfg.model, cfg.quant, dtype, device, quantized=True, resolved=resolved)
        torch.manual_seed(0)
        adapted = get_peft_model(base, lora).eval()
        adapted.save_pretrained(tmp)
        load_4bit_s = time.perf_counter() - t0
        measure("4-bit base + adapter", adapted)
        del adapted, base
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        t0 = time.perf_counter()
        base = load_model(cfg.model, cfg.quant, dtype, device, quantized=True, resolved=resolved)
        merged = PeftModel.from_pretrained(base.dequantize(dtype=dtype), tmp).merge_and_unload().eval()
        merge_s = time.perf_counter() - t0
        measure(f"merged {str(dtype).replace('torch.', '')}", merged)
        for gguf_type in [t for t in args.gguf.split(",") if t]:
            from qlora_helpers.serve.gguf import quantize, run_converter
            from qlora_helpers.serve.llamacpp import LlamaCppModel

            folder = Path(tmp) / "merged"
            if not folder.is_dir():  # what 06 exports: the merged weights in bf16, with the tokenizer
                merged.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
                tokenizer.save_pretrained(folder)
                merged.to(dtype)
            path = Path(tmp) / f"model-{gguf_type}.gguf"
            if gguf_type in ("f16", "q8_0"):
                run_converter(folder, path, gguf_type)
            else:
                if not (Path(tmp) / "model-f16.gguf").is_file():
                    run_converter(folder, Path(tmp) / "model-f16.gguf", "f16")
                quantize(Path(tmp) / "model-f16.gguf", path, gguf_type)
            model = LlamaCppModel(path, context=512, rows=args.batch)
            measure(f"GGUF {gguf_type} (llama.cpp)", model)
            model.close()

    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["form"].startswith("merged")}
    for r in rows:
        r["x_merged"] = round(r["tokens_per_s"] / base[r["batch"]], 2)
    machine = machine_name(device)
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("transformers", "peft", "bitsandbytes"):
        versions[name] = __import__(name).__version__
    if args.gguf:
        from qlora_helpers.serve.gguf import llama_cpp_version

        versions["llama-cpp-python"] = llama_cpp_version()
    report = {"model": args.model, "machine": machine, "device": device, "compute_dtype": str(dtype),
              "tokens": args.tokens, "batch": args.batch, "lora_r": args.lora_r, "versions": versions,
              "seconds": {"build_or_resolve": round(build_s, 1), "load_4bit_and_adapter": round(load_4bit_s, 1),
                          "load_and_merge": round(merge_s, 1), "total": round(time.perf_counter() - start, 1)},
              "rows": rows}
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
