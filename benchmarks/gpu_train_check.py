"""GPU check of the training stage (issue 4), one device call:

1. the llama2-7b profile's code path (NF4 + double quantization, bf16, paged AdamW, LoRA q_proj/v_proj,
   micro-batch 4 x 4) on a LLaMA-2-7B-shaped model with random weights built on the GPU: a few steps,
   peak memory and trained tokens/s;
2. one GPU against N GPUs (accelerate DDP) at the same global batch on a SmolLM2-135M-shaped random
   model: loss curves and throughput.

    python benchmarks/gpu_train_check.py --out results.json [--skip-7b] [--gpus 2]
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
    if proc.returncode != 0:
        return {"error": proc.stderr[-3000:], "wall_seconds": wall}
    log = json.loads((outputs / name / "train_log.json").read_text())
    losses = [(h["step"], h["loss"]) for h in log["log_history"] if "loss" in h]
    return {"summary": log["summary"], "losses": losses, "wall_seconds": wall}


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
    results["one_gpu"] = train(outputs, "ddp-1", "default", ddp + ["train.gradient_accumulation_steps=4"])
    if args.gpus > 1 and torch.cuda.device_count() >= args.gpus:
        results[f"{args.gpus}_gpus"] = train(outputs, f"ddp-{args.gpus}", "default",
                                             ddp + [f"train.gradient_accumulation_steps={4 // args.gpus}"],
                                             processes=args.gpus)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2)[:6000])


if __name__ == "__main__":
    main()
