"""GPU check of the training stage (issue 4), one device call:

1. the llama2-7b profile's code path (NF4 + double quantization, bf16, paged AdamW, LoRA q_proj/v_proj,
   micro-batch 4 x 4) on a LLaMA-2-7B-shaped model with random weights built on the GPU: a few steps,
   peak memory and trained tokens/s;
2. one GPU against N GPUs (accelerate DDP) at the same global batch on a SmolLM2-135M-shaped random
   model: loss curves and throughput;
3. with --fsdp: the fsdp-qlora profile (FSDP + QLoRA, 4-bit weights stored in bf16) on a
   LLaMA-2-7B-shaped model, one GPU against N GPUs at the same global batch: loss curves, peak
   memory per GPU, and the saved adapter loaded back and run.

    python benchmarks/gpu_train_check.py --out results.json [--skip-7b] [--skip-ddp] [--fsdp] [--gpus 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def train(outputs: Path, name: str, config: str, overrides: list[str], processes: int = 1) -> dict:
    cmd = [sys.executable, "-m", "qlora_helpers", "train", "--config", config, "--run-name", name,
           "--outputs-dir", str(outputs), "--num-processes", str(processes)]
    for o in overrides:
        cmd += ["--set", o]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    print("\n".join(line for line in proc.stdout.splitlines() if line.startswith(("FSDP", "Adapter"))), flush=True)
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:], "wall_seconds": wall}
    log = json.loads((outputs / name / "train_log.json").read_text())
    losses = [(h["step"], h["loss"]) for h in log["log_history"] if "loss" in h]
    return {"summary": log["summary"], "losses": losses, "wall_seconds": wall}


def reload_adapter(run: Path) -> dict:
    """The adapter FSDP saved, loaded back onto a fresh 4-bit base on one GPU: trained weights
    present (lora_B no longer zero) and finite logits."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file

    sys.path.insert(0, str(ROOT))
    from qlora_helpers.config import load_config
    from qlora_helpers.models import load_model
    from qlora_helpers.runs import RunFolder

    folder = RunFolder(run)
    try:
        cfg = load_config(folder.config_file)
        weights = load_file(str(folder.adapter_dir / "adapter_model.safetensors"))
        lora_b = [v for k, v in weights.items() if "lora_B" in k]
        base = load_model(cfg.model, cfg.quant, torch.bfloat16, "cuda:0")
        model = PeftModel.from_pretrained(base, str(folder.adapter_dir))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([[1, 2, 3, 4, 5]], device="cuda:0")).logits
        return {"tensors": len(weights), "lora_B_tensors": len(lora_b),
                "lora_B_nonzero": sum(int(v.abs().sum() > 0) for v in lora_b),
                "logits_finite": bool(torch.isfinite(logits).all())}
    except Exception as exc:  # report, do not lose the training figures
        return {"error": repr(exc)[:2000]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--outputs", default="/tmp/qlora-gpu-check")
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--skip-7b", action="store_true")
    parser.add_argument("--steps-7b", type=int, default=6)
    parser.add_argument("--steps-ddp", type=int, default=40)
    parser.add_argument("--ddp-shape", default="smollm2-135m", help="random model shape for the DDP comparison")
    parser.add_argument("--ddp-micro", type=int, default=8)
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--skip-one-gpu", action="store_true", help="FSDP: only the N-GPU run")
    parser.add_argument("--steps-fsdp", type=int, default=10)
    args = parser.parse_args()
    import torch

    outputs = Path(args.outputs)
    results: dict = {"gpu": torch.cuda.get_device_name(0), "gpus_visible": torch.cuda.device_count(),
                     "torch": torch.__version__}
    common = ["train.wandb=disabled", "train.eval_samples=32", "train.save_steps=100000"]
    if not args.skip_7b:
        results["llama2_7b_shape"] = train(
            outputs, "llama2-7b-shape", "llama2-7b",
            ["model.source=random:llama2-7b", f"train.max_steps={args.steps_7b}", "train.logging_steps=1",
             *common])
    # same global batch: 1 GPU x (micro x accumulation 4) against N GPUs x (micro x accumulation 4/N)
    ddp = [f"model.source=random:{args.ddp_shape}", f"train.micro_batch_size={args.ddp_micro}",
           f"train.max_steps={args.steps_ddp}",
           "train.logging_steps=2", "train.learning_rate=2e-4", "lora.dropout=0.0", "model.max_seq_length=512",
           *common]
    if not args.skip_ddp:
        results["one_gpu"] = train(outputs, "ddp-1", "default", ddp + ["train.gradient_accumulation_steps=4"])
        if args.gpus > 1 and torch.cuda.device_count() >= args.gpus:
            results[f"{args.gpus}_gpus"] = train(outputs, f"ddp-{args.gpus}", "default",
                                                 ddp + [f"train.gradient_accumulation_steps={4 // args.gpus}"],
                                                 processes=args.gpus)
    if args.fsdp:
        fsdp = ["model.source=random:llama2-7b", f"train.max_steps={args.steps_fsdp}", "train.logging_steps=1",
                "train.micro_batch_size=2", "model.max_seq_length=512", "lora.dropout=0.0", *common]
        if not args.skip_one_gpu:
            results["fsdp_one_gpu"] = train(outputs, "fsdp-1", "fsdp-qlora",
                                            fsdp + ["train.gradient_accumulation_steps=8"])
        if args.gpus > 1 and torch.cuda.device_count() >= args.gpus:
            name = f"fsdp-{args.gpus}"
            results[f"fsdp_{args.gpus}_gpus"] = train(
                outputs, name, "fsdp-qlora", fsdp + [f"train.gradient_accumulation_steps={8 // args.gpus}"],
                processes=args.gpus)
            results["fsdp_adapter_reload"] = reload_adapter(outputs / name)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2)[:6000])


if __name__ == "__main__":
    main()
