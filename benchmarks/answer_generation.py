"""Stage 05's answer generation, side by side in one process (issue 23): today's
`generation.generate` (model.generate on the 4-bit base + LoRA adapter, batches of 8) against
`decoding.generate_answers` (finished rows leave the batch; the 4-bit base on its de-quantized
weights) at several batch sizes, on the same prompts, greedy, the same token budget.

The prompts are the held-out split of the built-in data (qlora_helpers/builtin_data.py, seed 42)
rendered in the Alpaca template, so the run needs no data folder. The adapter is LoRA on q_proj/v_proj
with random, non-zero B (an untrained adapter costs the same as a trained one, and makes tuned differ
from base); `--adapter DIR` loads a trained one instead (a run's adapter/), whose answers stop early.
For each path: seconds, generated tokens, and how many answers are identical to today's path's
(greedy on the same numbers should match; a near-tie flipped by another summation order would not).

    python benchmarks/answer_generation.py --prompts 64 --tokens 64 --out results/cpu_answers.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path


def load(adapter: str | None):
    import torch
    from peft import PeftModel

    from qlora_helpers.config import load_config
    from qlora_helpers.models import load_model, load_tokenizer
    from qlora_helpers.train import add_lora

    cfg = load_config("default")
    tokenizer = load_tokenizer(cfg.model)
    base = load_model(cfg.model, cfg.quant, torch.float32, "cpu")
    if adapter:
        return PeftModel.from_pretrained(base, adapter).eval(), tokenizer
    model = add_lora(base, cfg.lora, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.eval(), tokenizer


def prompts(n: int) -> list[str]:
    from qlora_helpers.builtin_data import split_records
    from qlora_helpers.prompts import format_alpaca

    return [format_alpaca(r)[0] for r in split_records(42, 200)[1][:n]]


def timed(fn):
    """(result, wall seconds, CPU seconds of this process): on a busy machine the CPU seconds are the
    steadier measure of the work done."""
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batches", default="8,16,32")
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--sides", default="tuned,base", help="tuned (adapter on), base (adapter off), or both")
    parser.add_argument("--four-bit", action="store_true",
                        help="also time generate_answers on the 4-bit layers (rows leave, no de-quantized weights)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from qlora_helpers.decoding import generate_answers
    from qlora_helpers.generation import generate

    model, tokenizer = load(args.adapter)
    texts = [tokenizer(p)["input_ids"] for p in prompts(args.prompts)]  # token ids, as both generators take
    rows = []
    for side in args.sides.split(","):
        ctx = model.disable_adapter if side == "base" else torch.no_grad
        with ctx():
            today, today_seconds, today_cpu = timed(lambda: generate(model, tokenizer, texts, args.tokens, 8))
            rows.append({"side": side, "path": "generation.generate, 4-bit + adapter", "batch": 8,
                         "seconds": round(today_seconds, 1), "cpu_seconds": round(today_cpu, 1)})
            print(rows[-1], flush=True)
            for dense in ((False, True) if args.four_bit else (True,)):
                for batch in [int(b) for b in args.batches.split(",")]:
                    if not dense and batch != 8:
                        continue
                    answers, seconds, cpu = timed(lambda b=batch, d=dense: generate_answers(model, tokenizer, texts,
                                                                                         args.tokens, b, dense=d))
                    rows.append({"side": side, "batch": batch, "seconds": round(seconds, 1),
                                 "cpu_seconds": round(cpu, 1), "cpu_speedup": round(today_cpu / cpu, 2),
                                 "path": f"decoding.generate_answers, {'dense de-quantized' if dense else '4-bit'}",
                                 "tokens": sum(a.tokens for a in answers),
                                 "stopped": sum(a.stopped for a in answers),
                                 "same_text_as_today": sum(a.text == t for a, t in zip(answers, today)),
                                 "speedup": round(today_seconds / seconds, 2)})
                    print(rows[-1], flush=True)
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "prompts": args.prompts, "max_new_tokens": args.tokens,
              "adapter": args.adapter or "random LoRA q_proj/v_proj, B ~ N(0, 0.02)", "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
