"""The QLoRA paper's central claim at our scale: LoRA on an NF4 base matches LoRA on a full-precision
base. Trains the same LoRA on the same data, steps and seed twice (quant.load_in_4bit true / false)
and reports both held-out losses and their ratio.

    python benchmarks/parity.py --config default --steps 40 [--set KEY=VALUE ...] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def train_once(config: str, name: str, overrides: list[str], outputs: str) -> dict:
    from qlora_helpers.data import prepare_run_data
    from qlora_helpers.opening import setup_run
    from qlora_helpers.train import train_adapter

    run = setup_run(config, name, overrides, outputs)
    start = time.perf_counter()
    summary = train_adapter(run, prepare_run_data(run))["summary"]
    return {"heldout_loss_base": summary["heldout_loss_base"], "heldout_loss_tuned": summary["heldout_loss_tuned"],
            "train_loss": summary["train_loss"], "steps": summary["steps"], "seconds": time.perf_counter() - start,
            "compute_dtype": summary["compute_dtype"], "device": summary["device"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="default")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--outputs", default=str(ROOT / "outputs" / "parity"))
    parser.add_argument("--out", help="write the result JSON here too")
    args = parser.parse_args()
    common = [f"train.max_steps={args.steps}", "train.wandb=disabled", "train.resume=never", *args.overrides]
    result = {"config": args.config, "overrides": common,
              "nf4": train_once(args.config, "nf4", common + ["quant.load_in_4bit=true"], args.outputs),
              "full": train_once(args.config, "full", common + ["quant.load_in_4bit=false"], args.outputs)}
    result["tuned_loss_ratio_nf4_vs_full"] = result["nf4"]["heldout_loss_tuned"] / result["full"]["heldout_loss_tuned"]
    result["improvement"] = {k: result[k]["heldout_loss_base"] - result[k]["heldout_loss_tuned"]
                             for k in ("nf4", "full")}
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    print(f"\nheld-out loss after {args.steps} steps: NF4 base {result['nf4']['heldout_loss_tuned']:.4f}, "
          f"full-precision base {result['full']['heldout_loss_tuned']:.4f}, "
          f"ratio {result['tuned_loss_ratio_nf4_vs_full']:.4f}")


if __name__ == "__main__":
    main()
