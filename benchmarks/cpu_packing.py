"""Does packing pay on the CPU? (issue 23) Trained tokens/s of the embedded model's training step on
the same examples, three ways, side by side in one process, alternating (A B C A B C ...):

- padded: micro-batches of 4 in a seeded random order, right-padded to the longest (what the CPU
  default does today: data.packing false, train.group_by_length false);
- grouped: the same, but micro-batches of similar lengths (train.group_by_length true);
- packed: whole examples packed into rows of max_seq_length tokens with the 4-D block-diagonal mask
  (data.packing true: qlora_helpers.batching.pack_examples / collate_packed), micro-batches of
  --packed-rows rows.

Each pass is forward + backward of every example once (the model from qlora_helpers.train's own
load_trainable_model: NF4 base, fp32 compute, LoRA r=16 on q_proj/v_proj, no gradient
checkpointing); the optimizer step is left out (the same few LoRA parameters either way). The
examples have the real Alpaca lengths (benchmarks/alpaca_lengths.json: total and prompt tokens per
example) filled with random token ids, so no data folder is needed; only response tokens are
trained. CPU seconds of the process are reported next to wall seconds (on a busy machine the steadier
measure).

    python benchmarks/cpu_packing.py --examples 64 --rounds 2 --threads 1 --out results/cpu_packing.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def examples(n: int, seed: int, vocab: int) -> list[dict[str, list[int]]]:
    pairs = json.loads((HERE / "alpaca_lengths.json").read_text())["pairs"]
    rng = random.Random(seed)
    out = []
    for total, prompt in rng.sample(pairs, n):
        ids = [rng.randrange(100, vocab) for _ in range(total)]
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def batches(rows: list[dict], mode: str, micro: int, budget: int, seed: int, packed_rows: int) -> list[list[dict]]:
    from qlora_helpers.batching import pack_examples

    if mode == "packed":
        packed = pack_examples(rows, budget, seed=seed)
        return [packed[i:i + packed_rows] for i in range(0, len(packed), packed_rows)]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    if mode == "grouped":  # like transformers' LengthGroupedSampler: sorted within mega-batches of 50 x micro
        mega = micro * 50
        order = [i for s in range(0, len(order), mega)
                 for i in sorted(order[s:s + mega], key=lambda i: -len(rows[i]["input_ids"]))]
    return [[rows[i] for i in order[s:s + micro]] for s in range(0, len(order), micro)]


def one_pass(model, groups, mode: str, pad: int) -> dict[str, float]:
    from qlora_helpers.batching import collate_packed
    from qlora_helpers.scoring import collate

    start, cpu = time.perf_counter(), time.process_time()
    computed = 0
    for group in groups:
        batch = collate_packed(group, pad) if mode == "packed" else collate(group, pad)
        computed += batch["input_ids"].numel()
        loss = model(**batch).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
            "computed_tokens": computed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--packed-rows", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import torch

    from qlora_helpers.config import load_config
    from qlora_helpers.models import load_tokenizer
    from qlora_helpers.train import load_trainable_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config("default")
    tok = load_tokenizer(cfg.model)
    model = load_trainable_model(cfg, "cpu", torch.float32)
    model.train()
    rows = examples(args.examples, cfg.data.seed, len(tok))
    trained = sum(sum(1 for x in r["labels"] if x != -100) for r in rows)
    real = sum(len(r["input_ids"]) for r in rows)
    modes = ["padded", "grouped", "packed"]
    groups = {m: batches(rows, m, args.micro, cfg.model.max_seq_length, cfg.data.seed, args.packed_rows) for m in modes}
    one_pass(model, groups["padded"][:2], "padded", tok.pad_token_id)  # warm-up
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for m in modes:
            runs[m].append(one_pass(model, groups[m], m, tok.pad_token_id))
            print(m, r, {k: round(v, 1) for k, v in runs[m][-1].items()}, flush=True)
    table = {}
    for m in modes:
        wall = statistics.median(x["seconds"] for x in runs[m])
        cpu = statistics.median(x["cpu_seconds"] for x in runs[m])
        table[m] = {"micro_batches": len(groups[m]), "computed_tokens": runs[m][0]["computed_tokens"],
                    "real_share": round(real / runs[m][0]["computed_tokens"], 3),
                    "seconds": round(wall, 1), "cpu_seconds": round(cpu, 1),
                    "trained_tokens_per_s": round(trained / wall, 1),
                    "trained_tokens_per_cpu_s": round(trained / cpu, 1)}
    for m in modes:
        table[m]["cpu_speedup_vs_padded"] = round(table["padded"]["cpu_seconds"] / table[m]["cpu_seconds"], 2)
    result = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "examples": args.examples, "real_tokens": real,
              "trained_tokens": trained, "rounds": args.rounds, "micro_batch": args.micro,
              "packed_rows_per_micro_batch": args.packed_rows, "budget": cfg.model.max_seq_length,
              "attn_implementation": cfg.model.attn_implementation, "table": table}
    print(json.dumps(table, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
