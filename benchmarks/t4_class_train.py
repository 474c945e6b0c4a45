"""Training as `train.fast_path: auto` runs it on a T4-class card (issue 14, item 2), on whatever GPU
is at hand: fp16 compute with loss scaling, packed rows with the block-diagonal-mask attention
instead of the varlen kernels (compute capability < 8.0), no Liger. One device call:

    python benchmarks/t4_class_train.py --cache .gpu/cache --out results.json

A random LLaMA (SmolLM2-135M shape by default; the embedded model cannot travel to the GPU machine),
NF4 + double quantization, LoRA on every linear layer. The data is learnable on purpose: a random
prompt (no loss) and a response that counts upward through a 64-token band, so a working training
loop shows a falling loss. Also checked: packed == separate logits under fp16 with the mask.
Reports the card, the fast path's one-line choice, every step's loss, the loss scale, tokens/s.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_examples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(10, 40000) for _ in range(rng.randrange(20, 120))]
        start = rng.randrange(64)
        response = [1000 + (start + i) % 64 for i in range(rng.randrange(20, 120))]
        out.append({"input_ids": prompt + response, "labels": [-100] * len(prompt) + response})
    return out


def packed_vs_separate(model, examples) -> float:
    """Max |logit difference| between the packed row and each example run alone (fp16 autocast)."""
    import torch

    from qlora_helpers.batching import pack_examples
    from qlora_helpers.fastpath import collate_flat

    rows = pack_examples(examples, budget=100_000)
    batch = collate_flat(rows)
    worst = 0.0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        model.eval()
        inputs = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items() if k != "labels"}
        packed = model(**inputs).logits[0]
        cu = batch["cu_seq_lens_q"].tolist()
        ids = batch["input_ids"][0].tolist()
        for a, b in zip(cu[:-1], cu[1:]):
            alone = model(input_ids=torch.tensor([ids[a:b]], device="cuda")).logits[0]
            worst = max(worst, (packed[a:b].float() - alone.float()).abs().max().item())
        model.train()
    return worst


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cache", default=".gpu/cache", help="holds tokenizers/ (the embedded tokenizer)")
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    import torch

    from qlora_helpers.models import ensure_random_model, load_tokenizer
    from qlora_helpers.opening import setup_run
    from qlora_helpers.prepared import PreparedData
    from qlora_helpers.train import build_trainer, load_trainable_model

    folder = ensure_random_model(args.shape, Path(args.cache))
    overrides = [f"model.source={folder}", "quant.compute_dtype=float16", "train.fast_attention=masked",
                 "train.fused_kernels=false", f"train.max_steps={args.steps}", "train.logging_steps=1",
                 "train.save_steps=100000", "train.wandb=disabled", "train.packed_tokens=4096",
                 "train.learning_rate=1e-3", "train.warmup_ratio=0.05", "lora.target_modules=all-linear",
                 "lora.dropout=0.0", "train.gradient_accumulation_steps=1"]
    run = setup_run("default", "t4-class", overrides, tempfile.mkdtemp())
    tokenizer = load_tokenizer(run.cfg.model)
    model = load_trainable_model(run.cfg, "cuda", torch.float16)  # prints the fast path's choice
    examples = make_examples(600)
    isolation = packed_vs_separate(model, examples[:6])
    trainer = build_trainer(run, PreparedData(examples, [], {}, path=None), model, tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    scaler = getattr(trainer.accelerator, "scaler", None)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    result = {
        "gpu": torch.cuda.get_device_name(0), "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "torch": torch.__version__, "shape": args.shape, "steps": len(losses),
        "fast_path": model.qlora_fast_path, "trainer_fp16": trainer.args.fp16, "trainer_bf16": trainer.args.bf16,
        "loss_scale_end": scaler.get_scale() if scaler is not None else None,
        "losses": losses, "all_finite": all(math.isfinite(x) for x in losses),
        "mean_first5": first, "mean_last5": last, "falling": last < first,
        "packed_vs_separate_max_abs_logit_diff": isolation,
        "train_seconds": seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
    }
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}, indent=2))
    print("losses:", " ".join(f"{x:.3f}" for x in losses))


if __name__ == "__main__":
    main()
