"""Why the 4-bit base + adapter does not decode faster than the merged model at batch 1 (issue 26): the
GPU time of one decode step by kernel group, from torch.profiler over eager static-slot steps (the
bitsandbytes 4-bit matmul is a custom op that Inductor leaves as it is, so its kernels are the ones the
compiled step replays too), and the bandwidth those 4-bit matmuls reach on their packed bytes.

    python benchmarks/fourbit_step_profile.py --model random:llama2-7b --out fourbit_profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference_latency import copy_bandwidth  # noqa: E402 - the script's sibling

GROUPS = [("bitsandbytes 4-bit matmul (gemv_4bit)", ("gemv_4bit", "kgemm_4bit", "4bit")),
          ("other matmuls (LoRA, lm_head, attention)", ("gemm", "gemv", "nvjet", "cutlass", "sm90", "splitk")),
          ("elementwise / reductions / copies", ("",))]


def group(name: str) -> str:
    lower = name.lower()
    return next(label for label, marks in GROUPS if any(m in lower for m in marks))


def four_bit_bytes(model) -> int:
    """Packed 4-bit weights and their absmax (what each step reads for the quantized linears)."""
    total = 0
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += p.numel() * p.element_size() + state.absmax.numel() * state.absmax.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="random:llama2-7b")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile

    from qlora_helpers.config import load_config
    from qlora_helpers.models import load_model, resolve_model
    from qlora_helpers.serve.static import StaticDecoder

    cfg = load_config("default", [f"model.source={args.model}"])
    base = load_model(cfg.model, cfg.quant, torch.bfloat16, "cuda", quantized=True, resolved=resolve_model(cfg.model))
    torch.manual_seed(0)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                      init_lora_weights=False)
    model = get_peft_model(base, lora).eval()
    decoder = StaticDecoder(model, slots=1, max_len=64 + args.steps + 8, compile=False)
    decoder.prefill(0, [list(range(100, 164))], all_logits=False)
    for _ in range(4):
        decoder.decode([1])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            decoder.decode([1])
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    groups: dict[str, dict] = {}
    for e in kernels:
        g = groups.setdefault(group(e.key), {"ms_per_step": 0.0, "kernels_per_step": 0.0})
        g["ms_per_step"] += e.self_device_time_total / 1000 / args.steps
        g["kernels_per_step"] += e.count / args.steps
    bandwidth, packed = copy_bandwidth("cuda"), four_bit_bytes(model)
    gemv_s = groups.get(GROUPS[0][0], {}).get("ms_per_step", 0) / 1000
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": args.steps,
              "gpu_ms_per_step": round(sum(g["ms_per_step"] for g in groups.values()), 3),
              "groups": {k: {n: round(v, 3) for n, v in g.items()} for k, g in groups.items()},
              "four_bit_gib": round(packed / 2**30, 3), "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
              "four_bit_matmul_gb_s": round(packed / gemv_s / 1e9, 1) if gemv_s else None,
              "four_bit_at_copy_bandwidth_ms": round(1000 * packed / bandwidth, 3),
              "top_kernels": [{"name": e.key[:120], "calls_per_step": e.count / args.steps,
                               "ms_per_step": round(e.self_device_time_total / 1000 / args.steps, 3)} for e in top]}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
