"""Trained tokens/s of QLoRA on a LLaMA-2-7B-shaped model, three recipes side by side (issue 7).

One device call: builds the random-weight checkpoint on the GPU (no download), NF4-loads it once
the way the project does (double quantization, bf16 compute), and trains each recipe on the same
examples: token sequences whose lengths follow the real Alpaca sample as stage 03 renders it
(benchmarks/alpaca_lengths.json: lengths only), in a seeded random order, loss on the response.

  A  the seed recipe as users run it: transformers Trainer, bf16, micro-batch 4 padded to the
     longest, paged AdamW, LoRA dropout 0.05, gradient checkpointing, sdpa
  B  the project's default GPU path (qlora_helpers.fastpath through qlora_helpers.train)
  B-12G  B with a 12 GiB budget (the consumer-card variant)
  C  the best peer: TRL SFTTrainer, packing + padding-free + Liger kernels, gradient checkpointing

Reports per recipe and LoRA targets: tokens/s (every non-padding token runs forward and backward:
4N FLOPs each), labelled tokens/s (the response tokens that carry the loss), peak GPU memory,
MFU against the bf16 matmul rate measured in the same run; B/A and B/C; B's loss against the
plain padded loss at the same weights and tokens; and the longest single sequence each recipe
trains under a 24 GiB cap.

    python benchmarks/train_throughput.py --out results.json [--rows A,B,B-12G,C] [--targets qv,all]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GIB = 2**30
TARGETS = {"qv": ["q_proj", "v_proj"], "all": "all-linear"}


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def make_examples(vocab: int, seed: int = 0) -> list[dict]:
    pairs = json.loads((ROOT / "benchmarks" / "alpaca_lengths.json").read_text())["pairs"]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    out = []
    for total, prompt in pairs:
        ids = [rng.randrange(10, vocab) for _ in range(total)]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


class Counting:
    """Wraps a collator; records (tokens processed, tokens with a label) and the example lengths of
    every batch it makes, in the order the trainer consumes them."""

    def __init__(self, inner):
        self.inner, self.records, self.lengths = inner, [], []

    def __call__(self, rows):
        batch = self.inner(rows)
        ids = batch["input_ids"]
        if "cu_seq_lens_q" in batch:  # flat rows with boundaries (B)
            lens = batch["cu_seq_lens_q"].diff().tolist()
        elif "attention_mask" in batch and batch["attention_mask"].dim() == 2:  # padded (A)
            lens = batch["attention_mask"].sum(1).tolist()
        elif "position_ids" in batch:  # padding-free by position ids (C)
            starts = (batch["position_ids"].flatten() == 0).nonzero().flatten().tolist() + [ids.numel()]
            lens = [b - a for a, b in zip(starts[:-1], starts[1:])]
        else:
            lens = [ids.shape[1]] * ids.shape[0]
        self.records.append((int(sum(lens)), int((batch["labels"] != -100).sum())))
        self.lengths.append(lens)
        return batch


def step_timer(warmup: int):
    import torch
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.start = self.end = None

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            if state.global_step == warmup:
                self.start = time.perf_counter()
                torch.cuda.reset_peak_memory_stats()
            self.end = time.perf_counter()

    return Timer()


def model_flops(config, records, lengths_per_step) -> float:
    """Useful work: 4N per processed token (forward + input-gradient backward; the base is frozen)
    with N the matmul weights, plus causal attention (forward 2*L^2*d per layer, backward twice that)."""
    h, kv = config.hidden_size, config.hidden_size * config.num_key_value_heads // config.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * config.intermediate_size  # q, o, k, v, gate, up, down
    n_matmul = config.num_hidden_layers * per_layer + h * config.vocab_size  # + the LM head
    tokens = sum(r[0] for r in records)
    attn = sum(6 * L * L * config.hidden_size * config.num_hidden_layers for L in lengths_per_step)
    return 4 * n_matmul * tokens + attn


def summarize(name, targets, config, records, lens, timer, steps, warmup, peak_tflops, extra=None):
    import torch

    window = records[warmup:steps]
    seconds = timer.end - timer.start
    tokens = sum(r[0] for r in window)
    flops = model_flops(config, window, [L for step in lens[warmup:steps] for L in step])
    out = {"recipe": name, "targets": targets, "steps_timed": steps - warmup, "seconds": seconds,
           "tokens_per_step": tokens / (steps - warmup), "tokens_per_s": tokens / seconds,
           "labelled_tokens_per_s": sum(r[1] for r in window) / seconds,
           "peak_gib": torch.cuda.max_memory_allocated() / GIB,
           "mfu": flops / seconds / (peak_tflops * 1e12), **(extra or {})}
    print(json.dumps(out), flush=True)
    return out


def fake_run(cfg, path: Path):
    from qlora_helpers.runs import Run, Runtime

    runtime = Runtime(device="cuda", compute_dtype="bfloat16", optimizer=cfg.train.optimizer,
                      load_in_4bit=cfg.quant.load_in_4bit)
    return Run(name=path.name, path=path, cfg=cfg, env={"runtime": runtime.to_dict()})


def reset_base(base) -> None:
    """Undo what a recipe did to the shared base: LoRA layers, fp32 upcasts, checkpointing, attention,
    the fused-loss forward (Liger's module kernels stay: B and C both use them, A runs first)."""
    import torch

    for p in base.parameters():
        p.requires_grad_(False)
        if p.dtype == torch.float32 and type(p).__name__ != "Params4bit":
            p.data = p.data.to(torch.bfloat16)
    base.gradient_checkpointing_disable()
    base.__dict__.pop("forward", None)
    base.set_attn_implementation("sdpa")
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--rows", default="A,B,B-12G,C")
    parser.add_argument("--targets", default="qv,all")
    parser.add_argument("--packed-tokens", type=int, default=16384)
    parser.add_argument("--steps-a", type=int, default=14)
    parser.add_argument("--steps-b", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--long", default="4096,8192,16384,32768,65536", help="sequence lengths to try under 24 GiB")
    parser.add_argument("--cache", default="/tmp/qcache")
    args = parser.parse_args()
    import torch
    import transformers

    from qlora_helpers.config import load_config
    from qlora_helpers.models import ensure_random_model, load_model, load_tokenizer

    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d"), "rows": []}
    from importlib.metadata import PackageNotFoundError, version

    for name in ("peft", "bitsandbytes", "trl", "liger-kernel", "accelerate"):
        try:
            results[name] = version(name)
        except PackageNotFoundError:
            results[name] = None
    results["bf16_matmul_tflops"] = peak = matmul_tflops()
    print(f"bf16 matmul: {peak:.0f} TFLOP/s", flush=True)
    t = time.perf_counter()
    folder = ensure_random_model(args.shape, Path(args.cache))
    results["build_seconds"] = time.perf_counter() - t
    base_cfg = load_config("llama2-7b", [f"model.source={folder}", "train.wandb=disabled", "train.save_steps=100000",
                                         "train.logging_steps=1", "train.gradient_accumulation_steps=1",
                                         f"train.packed_tokens={args.packed_tokens}"])
    tokenizer = load_tokenizer(base_cfg.model)
    t = time.perf_counter()
    base = load_model(base_cfg.model, base_cfg.quant, torch.bfloat16, "cuda")
    results["load_seconds"] = time.perf_counter() - t
    results["model_gib"] = torch.cuda.memory_allocated() / GIB
    examples = make_examples(base.config.vocab_size)
    rows = args.rows.split(",")
    tmp = Path(tempfile.mkdtemp())
    # A: the llama2-7b profile (the seed recipe) with the fast path off; B*: the llama2-7b-fast profile
    recipes = {
        "A": ["train.fast_path=never", "train.micro_batch_size=4", "lora.dropout=0.05",
              "train.gradient_checkpointing=true", f"train.max_steps={args.steps_a}"],
        "B": [f"train.max_steps={args.steps_b}"],
        "B-12G": ["train.fast_path=always", "lora.dropout=0.0", "train.memory_budget_gib=11",
                  "train.packed_tokens=8192", f"train.max_steps={args.steps_b + 2}"],
        # ablations: B with one of its changes taken back (--rows B-nofused,B-dropout,B-recompute,B-mask)
        "B-nofused": ["train.fast_path=always", "lora.dropout=0.0", "train.fused_kernels=false",
                      f"train.max_steps={args.steps_b}"],
        "B-dropout": ["train.fast_path=always", "lora.dropout=0.05", f"train.max_steps={args.steps_b}"],
        "B-recompute": ["train.fast_path=always", "lora.dropout=0.0", "train.memory_budget_gib=6",
                        f"train.max_steps={args.steps_b}"],
        "B-mask": ["train.fast_path=always", "lora.dropout=0.0", f"train.max_steps={args.steps_b}"],
    }
    for targets in args.targets.split(","):
        tgt = "[q_proj,v_proj]" if targets == "qv" else "all-linear"
        for name in [r for r in rows if r in recipes]:
            profile = "llama2-7b" if name == "A" else "llama2-7b-fast"
            cfg = load_config(profile, [*_overrides(base_cfg), f"lora.target_modules={tgt}", *recipes[name]])
            steps = cfg.train.max_steps
            try:
                model, row = run_project(name, base, cfg, examples, tokenizer, steps, args.warmup, peak, tmp)
                if name == "B" and targets == "qv":
                    row["loss_check"] = loss_check(model, examples[:64])
                results["rows"].append(row)
                base = model.unload()
            except Exception as exc:  # one recipe failing must not lose the others' figures
                results["rows"].append({"recipe": name, "targets": targets, "error": repr(exc)[:2000]})
                print(f"{name}/{targets} failed: {exc!r}", flush=True)
                base = _unwrap(base)
            reset_base(base)
        if "C" in rows:
            try:
                results["rows"].append(run_trl(base, tokenizer, examples, TARGETS[targets], args, peak))
            except Exception as exc:
                results["rows"].append({"recipe": "C", "targets": targets, "error": repr(exc)[:2000]})
                print(f"C/{targets} failed: {exc!r}", flush=True)
            base = _unwrap(base)
            reset_base(base)
        Path(args.out).write_text(json.dumps(results, indent=2))
    results["ratios"] = ratios(results["rows"])
    if args.long:
        results["longest_under_24gib"] = longest(base, base_cfg, [int(x) for x in args.long.split(",")], rows)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}, indent=2))


def _overrides(cfg) -> list[str]:
    return [f"model.source={cfg.model.source}", "train.wandb=disabled", "train.save_steps=100000",
            "train.logging_steps=1", "train.gradient_accumulation_steps=1",
            f"train.packed_tokens={cfg.train.packed_tokens}"]


def _unwrap(model):
    from peft import PeftModel

    while isinstance(model, PeftModel):
        model = model.unload()
    return model


def run_project(name, base, cfg, examples, tokenizer, steps, warmup, peak, tmp):
    import torch

    from qlora_helpers.prepared import PreparedData
    from qlora_helpers.train import build_trainer, load_trainable_model

    model = load_trainable_model(cfg, "cuda", torch.bfloat16, base=base)
    data = PreparedData(examples, [], {}, path=None)
    trainer = build_trainer(fake_run(cfg, tmp / name), data, model, tokenizer)
    if name == "B-mask":  # the same packed rows, attention by sdpa with a 4-D block-diagonal mask
        from qlora_helpers.train import Collator

        model.set_attn_implementation("sdpa")
        trainer.data_collator = Collator(tokenizer.pad_token_id, packed=True)
    trainer.data_collator = counting = Counting(trainer.data_collator)
    timer = step_timer(warmup)
    trainer.add_callback(timer)
    trainer.train()
    row = summarize(name, "qv" if cfg.lora.target_modules != "all-linear" else "all", base.config,
                    counting.records, counting.lengths, timer, steps, warmup, peak,
                    {"fast_path": model.qlora_fast_path})
    return model, row


def loss_check(model, examples) -> dict:
    """Same weights, same tokens: B's loss (flat row, varlen attention, fused loss) against the plain
    padded loss (sdpa with the padding mask, ordinary logits and cross-entropy)."""
    import torch

    from qlora_helpers.batching import pack_examples
    from qlora_helpers.fastpath import collate_flat
    from qlora_helpers.scoring import collate

    dev = "cuda"
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.train()
        flat = collate_flat(pack_examples(examples, budget=100_000))
        fast = model(**{k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in flat.items()}).loss.float()
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(examples), 8):
            batch = {k: v.to(dev) for k, v in collate(examples[i:i + 8], 0).items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch).loss) * n
            count += n
    plain = total / count
    return {"fast_loss": float(fast), "plain_loss": plain, "relative_difference": abs(float(fast) - plain) / plain}


def run_trl(base, tokenizer, examples, targets, args, peak) -> dict:
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    rows = [{"input_ids": e["input_ids"], "completion_mask": [int(x != -100) for x in e["labels"]]}
            for e in examples]
    ds = datasets.Dataset.from_list(rows)
    steps = args.steps_b
    config = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=1,
                       gradient_accumulation_steps=1, learning_rate=2e-4, bf16=True, optim="paged_adamw_32bit",
                       gradient_checkpointing=True, packing=True, padding_free=True, max_length=args.packed_tokens,
                       completion_only_loss=True, use_liger_kernel=True, logging_steps=1, save_strategy="no",
                       report_to=[], dataloader_num_workers=0, seed=42)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=base, args=config, train_dataset=ds, processing_class=tokenizer, peft_config=lora)
    trainer.data_collator = counting = Counting(trainer.data_collator)
    timer = step_timer(args.warmup)
    trainer.add_callback(timer)
    trainer.train()
    return summarize("C", "qv" if targets != "all-linear" else "all", base.config, counting.records,
                     counting.lengths, timer, steps, args.warmup, peak)


def ratios(rows) -> dict:
    by = {(r["recipe"], r["targets"]): r.get("tokens_per_s") for r in rows}
    out = {}
    for t in ("qv", "all"):
        a, b, c = by.get(("A", t)), by.get(("B", t)), by.get(("C", t))
        if a and b:
            out[f"B/A {t}"] = b / a
        if b and c:
            out[f"B/C {t}"] = b / c
        if a and by.get(("B-12G", t)):
            out[f"B-12G/A {t}"] = by[("B-12G", t)] / a
    return out


def longest(base, base_cfg, lengths, rows) -> dict:
    """The longest single sequence (batch 1) each recipe trains (forward + backward) under a 24 GiB cap."""
    import torch

    from qlora_helpers import fastpath
    from qlora_helpers.config import load_config
    from qlora_helpers.scoring import collate
    from qlora_helpers.train import load_trainable_model

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(24 * GIB / total)
    out = {}
    recipes = {"A": ["train.fast_path=never", "train.gradient_checkpointing=true", "lora.dropout=0.05"],
               "B": ["train.fast_path=always", "lora.dropout=0.0", "train.memory_budget_gib=23"]}
    for name in [r for r in rows if r in recipes]:
        best = None
        for L in lengths:
            cfg = load_config("llama2-7b", [*_overrides(base_cfg), *recipes[name], f"train.packed_tokens={L}",
                                            f"model.max_seq_length={L}"])
            model = None
            try:
                model = load_trainable_model(cfg, "cuda", torch.bfloat16, base=base)
                model.train()
                ids = torch.randint(10, base.config.vocab_size, (L,)).tolist()
                ex = [{"input_ids": ids, "labels": [-100] * (L // 2) + ids[L // 2:]}]
                if name == "B":
                    from qlora_helpers.batching import pack_examples

                    batch = fastpath.collate_flat(pack_examples(ex, budget=L))
                else:
                    batch = collate(ex, 0)
                batch = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in batch.items()}
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    model(**batch).loss.backward()
                torch.cuda.synchronize()
                best = L
                print(f"longest {name}: {L} ok, peak {torch.cuda.max_memory_allocated() / GIB:.1f} GiB", flush=True)
            except torch.cuda.OutOfMemoryError:
                print(f"longest {name}: {L} out of memory", flush=True)
                break
            finally:
                if model is not None:
                    base = _unwrap(model)
                reset_base(base)
                torch.cuda.reset_peak_memory_stats()
        out[name] = best
    torch.cuda.set_per_process_memory_fraction(1.0)
    return out


if __name__ == "__main__":
    main()
