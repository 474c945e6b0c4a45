"""The memory plan (`python -m qlora_helpers plan`, qlora_helpers/plan.py) against measured peaks on
a GPU (issue 26, item 4). One device call:

    python benchmarks/memory_plan_check.py --cache .gpu/cache --out results.json

A random LLaMA-2-7B-shaped checkpoint (built on the GPU, no download) is loaded the project's way
for each setting, trained for two optimizer steps at two sizes, and its peak compared with the plan:

  plain-4k   the seed recipe's plain path (llama2-7b, fast path off): micro-batch 1 of 4,096-token
             rows (then 2,048), gradient checkpointing, paged AdamW, LoRA on q,v
  12gb       the 12 GB-class choices (what train.fast_path=auto takes on a T4): fp16, packed rows of
             4,096 tokens (then 2,048) with the block-diagonal mask, no Liger, a 10.8 GiB budget
             (90% of 12 GiB) deciding how many layers are recomputed
  fast-16k   llama2-7b-fast: packed rows of 16,384 tokens (then 8,192), varlen attention, Liger, a
             40 GiB budget (some layers recomputed)
  paper-24gb qlora-paper (LoRA r=64 on every linear layer: 2.4 GiB of adapter state) on the fast path,
             16,384 tokens (then 8,192), the budget the plan gives a 24 GiB card ((24 - 0.6) / 1.15 GiB)
  serve-adapter, serve-merged
             the 4-bit base + adapter, and the merged 16-bit model, in the static KV cache of 8 slots x
             1,024 tokens: a prefill of all 8 slots, then decode steps (eager; the compiled step's
             graphs are extra)

Measured: torch.cuda.max_memory_allocated (what the plan predicts) and max_memory_reserved, from the
memory after loading (weights + adapters) through the steps. Results are written after each setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 2**30
SETTINGS = {
    "plain-4k": (["--config", "llama2-7b"], ["train.fast_path=never", "train.micro_batch_size=1",
                                            "train.gradient_accumulation_steps=1"], [4096, 2048]),
    "12gb": (["--config", "llama2-7b-fast"], ["quant.compute_dtype=float16", "train.fast_attention=masked",
                                              "train.fused_kernels=false", "train.memory_budget_gib=10.8"],
             [4096, 2048]),
    "fast-16k": (["--config", "llama2-7b-fast"], ["train.memory_budget_gib=40"], [16384, 8192]),
    # the QLoRA paper's r=64 on every linear layer, on a 24 GiB card's budget: (24 - 0.6) / 1.15 GiB
    "paper-24gb": (["--config", "qlora-paper"], ["train.memory_budget_gib=20.35"], [16384, 8192]),
}


def rows(tokens: int, count: int, vocab: int, packed: bool, seed: int = 0) -> list[dict]:
    """`count` micro-batches' worth of examples: whole rows of `tokens` (plain path) or Alpaca-length
    examples (from benchmarks/alpaca_lengths.json) that pack into rows of `tokens`."""
    rng = random.Random(seed)
    if not packed:
        out = []
        for _ in range(count):
            ids = [rng.randrange(10, vocab) for _ in range(tokens)]
            out.append({"input_ids": ids, "labels": [-100] * 64 + ids[64:]})
        return out
    pairs = json.loads((ROOT / "benchmarks" / "alpaca_lengths.json").read_text())["pairs"]
    out, total = [], 0
    while total < tokens * (count + 1):
        length, prompt = pairs[rng.randrange(len(pairs))]
        ids = [rng.randrange(10, vocab) for _ in range(length)]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
        total += length
    return out


def set_recompute(model, layers: int) -> None:
    for i, layer in enumerate(model.base_model.model.model.layers):
        layer.gradient_checkpointing = i < layers


def train_once(run, setting: tuple[str, list[str]], model, tokenizer, tokens: int, steps: int) -> dict:
    """Two optimizer steps at `tokens` per micro-batch; the peaks of those steps."""
    import torch

    from qlora_helpers.config import load_config
    from qlora_helpers.plan import GIB, model_shape, training_plan
    from qlora_helpers.prepared import PreparedData
    from qlora_helpers.train import build_trainer

    fast = model.qlora_fast_path is not None
    key = "train.packed_tokens" if fast else "model.max_seq_length"
    config, overrides = setting
    run = dataclasses.replace(run, cfg=load_config(config, [*overrides, f"{key}={tokens}", f"train.max_steps={steps}"]))
    plan = training_plan(run.cfg, model_shape(run.cfg.model.source), 141)
    if fast:  # the same model, replanned for this size as training would plan it
        set_recompute(model, plan["activations"]["recompute_layers"])
    data = PreparedData(rows(tokens, steps, model.config.vocab_size, fast), [], {}, path=None)
    trainer = build_trainer(run, data, model, tokenizer)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    trainer.train()
    peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    del trainer
    return {"tokens": tokens, "seconds": round(time.perf_counter() - start, 1),
            "recompute_layers": plan["activations"]["recompute_layers"],
            "allocated_before_gib": before / GIB, "peak_allocated_gib": peak / GIB, "peak_reserved_gib": reserved / GIB,
            "predicted_gib": plan["peak"] / GIB, "predicted_parts_gib": {k: v / GIB for k, v in plan["parts"].items()},
            "error_percent": 100 * (plan["peak"] - peak) / peak}


def measure_training(name: str, folder: Path, steps: int) -> dict:
    import torch

    from qlora_helpers.models import load_tokenizer
    from qlora_helpers.opening import setup_run
    from qlora_helpers.train import load_trainable_model

    (_, config), overrides, sizes = SETTINGS[name]
    overrides = [f"model.source={folder}", "train.wandb=disabled", "train.save_steps=100000",
                 "train.eval_samples=0", "train.logging_steps=1", *overrides]
    run = setup_run(config, name, overrides, tempfile.mkdtemp())
    tokenizer = load_tokenizer(run.cfg.model)
    torch.cuda.reset_peak_memory_stats()
    model = load_trainable_model(run.cfg, "cuda", getattr(torch, run.runtime.compute_dtype))
    out = {"setting": name, "config": config, "overrides": overrides[1:],
           "loaded_gib": torch.cuda.memory_allocated() / GIB, "fast_path": model.qlora_fast_path,
           "sizes": [train_once(run, (config, overrides), model, tokenizer, t, steps) for t in sizes]}
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def measure_serving(folder: Path, form: str = "adapter", slots: int = 8, context: int = 1024,
                    decode_steps: int = 8) -> dict:
    """One serving form in the static KV cache: a prefill of every slot, then decode steps. `form`:
    "adapter" (the 4-bit base + LoRA) or "merged" (the 16-bit model)."""
    import torch

    from qlora_helpers.config import load_config
    from qlora_helpers.models import load_model, resolve_model
    from qlora_helpers.plan import model_shape, serving_plan
    from qlora_helpers.serve.static import StaticDecoder
    from qlora_helpers.train import add_lora

    cfg = load_config("llama2-7b", [f"model.source={folder}", f"serve.max_concurrent={slots}",
                                    f"serve.context_length={context}"])
    torch.cuda.reset_peak_memory_stats()
    model = load_model(cfg.model, cfg.quant, torch.bfloat16, "cuda", quantized=form == "adapter",
                       resolved=resolve_model(cfg.model))
    model = (add_lora(model, cfg.lora, seed=0) if form == "adapter" else model).eval()
    loaded = torch.cuda.memory_allocated()
    decoder = StaticDecoder(model, slots, context, compile=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 30000) for _ in range(context - decode_steps - 8)] for _ in range(slots)]
    torch.cuda.reset_peak_memory_stats()
    decoder.prefill(0, prompts, all_logits=False)
    for _ in range(decode_steps):
        decoder.decode([1] * slots)
    torch.cuda.synchronize()
    peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    plan = serving_plan(cfg, model_shape(str(folder)))
    predicted = plan["forms"][form]["peak"]
    del decoder, model
    gc.collect()
    torch.cuda.empty_cache()
    return {"setting": f"serve-{form}", "form": form, "slots": slots, "context": context,
            "loaded_gib": loaded / GIB, "peak_allocated_gib": peak / GIB, "peak_reserved_gib": reserved / GIB,
            "predicted_gib": predicted / GIB, "predicted_weights_gib": plan["forms"][form]["weights"] / GIB,
            "predicted_kv_gib": plan["kv_cache"] / GIB, "predicted_prefill_gib": plan["prefill"] / GIB,
            "error_percent": 100 * (predicted - peak) / peak}


def table(path: str) -> list[str]:
    """Measured peaks from a results file beside what the current plan predicts for the layers the run
    recomputed, and how many the current plan would recompute (no GPU needed)."""
    from qlora_helpers.config import load_config
    from qlora_helpers.plan import model_shape, training_plan

    result = json.loads(Path(path).read_text())
    lines = ["| setting | tokens | recomputed | predicted GiB | measured max allocated GiB | error | "
             "max reserved GiB | the plan now recomputes |", "|---|---|---|---|---|---|---|---|"]
    for row in result["settings"]:
        if row["setting"].startswith("serve"):
            continue
        fast = row["fast_path"] is not None
        for size in row["sizes"]:
            key = "train.packed_tokens" if fast else "model.max_seq_length"
            cfg = load_config(row["config"], [*row["overrides"], f"{key}={size['tokens']}"])
            shape, ran = model_shape("random:llama2-7b"), size["recompute_layers"]
            plan, now = training_plan(cfg, shape, 141, recompute=ran), training_plan(cfg, shape, 141)
            measured = size["peak_allocated_gib"]
            predicted = plan["peak"] / GIB
            lines.append(f"| {row['setting']} | {size['tokens']:,} | {ran} of 32 | "
                         f"{predicted:.2f} | {measured:.2f} | {100 * (predicted - measured) / measured:+.1f}% | "
                         f"{size['peak_reserved_gib']:.2f} | {now['activations']['recompute_layers']} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", help="results file to write (runs the settings on the GPU)")
    parser.add_argument("--table", help="a results file: print it beside the current plan's predictions")
    parser.add_argument("--cache", default=".gpu/cache", help="holds tokenizers/ (the embedded tokenizer)")
    # Liger's patches come last
    parser.add_argument("--settings", default="serve-adapter,serve-merged,plain-4k,12gb,fast-16k")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    if args.table:
        print("\n".join(table(args.table)))
        return
    import torch

    from qlora_helpers.models import ensure_random_model

    start = time.perf_counter()
    folder = ensure_random_model("llama2-7b", Path(args.cache))
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "build_seconds": round(time.perf_counter() - start, 1), "settings": []}
    for name in args.settings.split(","):
        t0 = time.perf_counter()
        row = (measure_serving(folder, name.split("-", 1)[1]) if name.startswith("serve-")
               else measure_training(name, folder, args.steps))
        row["wall_seconds"] = round(time.perf_counter() - t0, 1)
        result["settings"].append(row)
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
        print(json.dumps(row, default=str), flush=True)


if __name__ == "__main__":
    main()
