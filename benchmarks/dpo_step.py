"""Stage 04b on a GPU (issue 25, item 5): DPO steps on the LLaMA-2-7B shape, 4-bit base, one device call.

    python benchmarks/dpo_step.py --cache .gpu/cache --out results.json

A LLaMA-2-7B-shaped model with random weights (`random:llama2-7b`, built on the GPU; the SmolLM2
tokenizer from the cache) NF4-loaded the project's way, an "SFT adapter" on q_proj/v_proj with
non-zero weights saved into a run folder, then stage 04b's own path: `load_policy_model`, TRL's
DPOTrainer with the frozen reference adapter (`build_dpo_trainer`, `check_reference`). For each
setting: a few optimizer steps, the first a warm-up; the others timed (CUDA synchronized); peak
memory of training (torch.cuda.max_memory_allocated after a reset); tokens/s = the non-padding
tokens of chosen and rejected sequences per second (each passes the policy forward + backward and
the reference forward). Pairs: an Alpaca-style prompt and two answers of Alpaca-like lengths.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = [
    "model", "data", "train", "answer", "question", "river", "mountain", "green", "quickly", "because",
    "system", "value", "number", "simple", "example", "people", "language", "result", "change", "world",
    "small", "large",
]
SETTINGS = {  # name: (overrides of the llama2-7b profile + preference on)
    "llama2-7b (micro-batch 4 pairs, gradient checkpointing, paged AdamW 32-bit)": [
        "preference.micro_batch_size=4", "train.gradient_checkpointing=true", "train.optimizer=paged_adamw_32bit"],
    "12 GB class (micro-batch 1 pair, gradient checkpointing, paged AdamW 8-bit)": [
        "preference.micro_batch_size=1", "train.gradient_checkpointing=true", "train.optimizer=paged_adamw_8bit"],
}


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    from qlora_helpers.prompts import format_alpaca

    rng = random.Random(seed)
    text = lambda k: " ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + "."  # noqa: E731
    return [{"prompt": format_alpaca({"instruction": text(rng.randint(8, 30)), "output": ""})[0],
             "chosen": text(rng.randint(30, 90)), "rejected": text(rng.randint(30, 140))} for _ in range(n)]


def fake_sft_adapter(run, folder: Path) -> None:
    """A LoRA adapter like stage 04's with lora_B non-zero (a trained adapter, not the identity)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from qlora_helpers.models import load_model

    base = load_model(run.cfg.model, run.cfg.quant, run.compute_dtype, run.device)
    lora = run.cfg.lora
    model = get_peft_model(base, LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=lora.target_modules,
                                            lora_dropout=lora.dropout, task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 1e-3)
    model.save_pretrained(folder)
    del model, base


def measure(outputs: Path, name: str, overrides: list[str], steps: int, profile: str, source: str) -> dict:
    import torch
    from transformers import TrainerCallback

    from qlora_helpers.opening import setup_run
    from qlora_helpers.preference import build_dpo_trainer, check_reference, load_policy_model

    run = setup_run(profile, name, [f"model.source={source}", "preference.enabled=true",
                                        f"preference.max_steps={steps}", "preference.gradient_accumulation_steps=1",
                                        "train.wandb=disabled", *overrides], str(outputs))
    shared = outputs / "sft-adapter"
    if not (shared / "adapter_config.json").is_file():
        fake_sft_adapter(run, shared)
    shutil.copytree(shared, run.adapter_dir)
    model, tokenizer = load_policy_model(run)
    pairs = make_pairs(run.cfg.preference.micro_batch_size * steps)
    trainer = build_dpo_trainer(run, model, tokenizer, pairs)
    check_reference(trainer)
    times: list[float] = []
    cuda = torch.cuda.is_available()

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    trainer.add_callback(Timer())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    # every pair is seen once (pairs = batch x steps, in the sampler's order): tokens per step on average
    total = sum(len(r["prompt_ids"]) * 2 + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in trainer.train_dataset)
    logs = [h for h in trainer.state.log_history if "loss" in h and "rewards/margins" in h]
    result = {"steps": steps, "step_seconds": times, "mean_tokens_per_step": total / steps, "peak_gib": peak,
              "pairs_per_step": run.cfg.preference.micro_batch_size,
              "tokens_per_second": total / steps * (steps - 1) / sum(times[1:]),
              "losses": [h["loss"] for h in logs], "grad_norms": [h.get("grad_norm") for h in logs],
              "margins": [h["rewards/margins"] for h in logs]}
    del trainer, model
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cache", required=True, help="model cache holding the SmolLM2 tokenizer")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--profile", default="llama2-7b")
    parser.add_argument("--source", default="random:llama2-7b", help="random:tiny for a quick CPU dry run")
    parser.add_argument("--budget", type=float, default=150, help="seconds after which no new setting starts")
    args = parser.parse_args()
    import os

    import torch

    os.environ["QLORA_CACHE_DIR"] = str(Path(args.cache).resolve())
    outputs = Path(tempfile.mkdtemp(prefix="dpo-bench-"))
    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    report = {"card": card, "torch": torch.__version__, "profile": args.profile, "source": args.source, "settings": {}}
    for module in ("transformers", "peft", "trl", "bitsandbytes", "accelerate"):
        report[module] = __import__(module).__version__
    began = time.perf_counter()
    for i, (name, overrides) in enumerate(SETTINGS.items()):
        if time.perf_counter() - began > args.budget:
            report["settings"][name] = {"skipped": f"over the {args.budget} s budget of this call"}
            continue
        start = time.perf_counter()
        try:
            report["settings"][name] = measure(outputs, f"dpo-{i}", overrides, args.steps, args.profile, args.source)
        except Exception as exc:  # report what broke and go on to the next setting
            report["settings"][name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        report["settings"][name]["wall_seconds"] = time.perf_counter() - start
        print(json.dumps({name: report["settings"][name]}, default=str), flush=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
