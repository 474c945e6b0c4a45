"""What Dynamo's guards cost per decode step, merged against the 4-bit base + adapter (issue 26, item 1).

The compiled step is looked up by Dynamo on every call: it evaluates the guards of the cached graph
(one per tensor, module attribute and Python object the trace read) before it replays the CUDA graph.
bitsandbytes' layers carry a `QuantState` object each (absmax, code, shape, blocksize, a nested state),
so the 4-bit form's step may guard far more than the merged one. Guard evaluation is host work, so it
can be measured on the CPU: a random LLaMA with L layers (env L, default 32, as LLaMA-2-7B) and tiny
width, compiled per form (`StaticDecoder`, bucket 1), then torch's own counts (`guard_count`,
`guard_latency_us`) and the profiler's "TorchDynamo Cache Lookup" time per step.

    python benchmarks/guards_cpu.py --out guards.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build(form: str, layers: int, folder: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        LlamaForCausalLM(config).save_pretrained(folder)
    if form == "merged":
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    from peft import LoraConfig, get_peft_model

    from qlora_helpers.models import keep_4bit_on_autograd_path

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quant, dtype=torch.float32,
                                                device_map="cpu")
    keep_4bit_on_autograd_path(base)
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False)
    return get_peft_model(base, lora).eval()


def measure(form: str, layers: int, folder: Path, steps: int, guards: str) -> dict:
    """`guards`: "all" (the step compiled without a guard filter), "skip_eval" (that, with
    torch.compiler.set_stance's skip_guard_eval_unsafe around the steps), "no_module_guards"
    (guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe, which the decoder used until the
    H200 found the compiled step's tokens differing from the dynamic path's with it)."""
    from torch._dynamo.utils import get_compilation_metrics
    from torch.profiler import ProfilerActivity, profile

    from qlora_helpers.serve.static import StaticDecoder

    torch._dynamo.reset()
    before = len(get_compilation_metrics())
    model = build(form, layers, folder)
    decoder = StaticDecoder(model, slots=1, max_len=64, compile=True, buckets=(1,), tune=False)
    options = decoder.options  # the decoder as it is: every guard
    if guards == "no_module_guards":
        options = dict(options, guard_filter_fn=torch.compiler.skip_guard_on_all_nn_modules_unsafe)
    decoder._step = torch.compile(decoder._decode, options=options, fullgraph=False, dynamic=None)
    warm = decoder.warm_up()
    metrics = [m for m in get_compilation_metrics()[before:] if m.guard_count]
    decoder.columns.zero_(), decoder.positions.zero_()
    times, tokens, token = [], [], 0
    with torch.no_grad(), torch.compiler.set_stance("default", skip_guard_eval_unsafe=guards == "skip_eval"):
        for _ in range(steps):  # greedy from token 0 (the step's own inputs), then a fixed step again
            t0 = time.perf_counter()
            _, (token,) = decoder.decode([token])
            tokens.append(token)
            times.append(time.perf_counter() - t0)
        decoder.columns.zero_(), decoder.positions.zero_()
        for _ in range(steps):
            t0 = time.perf_counter()
            decoder.decode([0])
            times.append(time.perf_counter() - t0)
            decoder.columns.zero_(), decoder.positions.zero_()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                decoder.decode([0])
                decoder.columns.zero_(), decoder.positions.zero_()
    lookups = [e for e in prof.key_averages() if e.key == "TorchDynamo Cache Lookup"]
    lookup = sum(e.cpu_time_total for e in lookups)
    return {"form": form, "layers": layers, "guards": guards, "greedy_tokens": tokens, "warm_up_s": round(warm, 1),
            "guard_count": [m.guard_count for m in metrics], "guard_latency_us": [m.guard_latency_us for m in metrics],
            "cache_lookup_ms_per_step": round(lookup / 1e3 / steps, 3),
            "cache_lookups_per_step": sum(e.count for e in lookups) / steps,
            "step_ms_median": round(statistics.median(times) * 1e3, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--forms", default="merged,adapter")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    layers = int(os.environ.get("L", 32))
    folder = Path(tempfile.mkdtemp(prefix="guards-")) / "model"
    rows = [{"torch": torch.__version__, "threads": torch.get_num_threads()}]
    for form in args.forms.split(","):
        for guards in ("all", "skip_eval", "no_module_guards"):
            rows.append(measure(form, layers, folder, args.steps, guards))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
