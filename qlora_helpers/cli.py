"""Command line: `python -m qlora_helpers run --config configs/default.yaml --set train.max_steps=10`.

Imports: everything at the top but `serve` (FastAPI, uvicorn and torch: seconds), which only the
`serve` command needs; the stage modules load when a stage runs (`runs.Stage.run`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from .config import describe_config, load_config, resolve_config_path
from .errors import QLoraError
from .runner import run_pipeline
from .runs import open_run, open_run_folder, setup_run, stage
from .sweep import add_arguments as add_sweep_arguments
from .sweep import sweep_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qlora_helpers",
                                     description="QLoRA fine-tuning, one stage notebook at a time.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the stage notebooks with papermill into outputs/<run>/")
    run.add_argument("--config", default="default", help="profile name or YAML path (default: default)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one setting, e.g. --set train.learning_rate=1e-4 (repeatable)")
    run.add_argument("--run-name", help="run folder name under outputs/ (default: the profile name)")
    run.add_argument("--stages", help="comma-separated stage numbers, e.g. 01,02 (default: all)")
    run.add_argument("--outputs-dir", help="where run folders go (default: outputs/)")
    train = sub.add_parser("train", help="set up the run, prepare the data and train (no notebooks)")
    train.add_argument("--config", default="default")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    train.add_argument("--run-name", help="run folder name under outputs/ (default: the profile name)")
    train.add_argument("--outputs-dir", help="where run folders go (default: outputs/)")
    train.add_argument("--num-processes", type=int, default=1,
                       help="GPUs to train on with accelerate (DDP); the global batch is "
                            "micro_batch_size x gradient_accumulation_steps x N")
    serve = sub.add_parser("serve", help="serve a trained run on the OpenAI API (FastAPI + uvicorn)")
    serve.add_argument("--run", required=True, help="the run folder, e.g. outputs/default")
    serve.add_argument("--port", type=int, help="TCP port (default: serve.port)")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="serve.KEY=VALUE",
                       help="override a serve setting, e.g. --set serve.form=adapter (repeatable)")
    export = sub.add_parser("export", help="merge the adapter, export GGUF files with llama.cpp and run the "
                            "export gate (export.json); exits 1 when a form disagrees with the adapter model")
    export.add_argument("--run", required=True, help="the run folder, e.g. outputs/default")
    export.add_argument("--gguf", action="append", default=[], choices=["f16", "q8_0", "q4_k_m"],
                        help="GGUF type to write into <run>/gguf/ (repeatable; needs the [gguf] extra); the "
                             "first is the one the Ollama Modelfile names")
    export.add_argument("--set", dest="overrides", action="append", default=[], metavar="serve.KEY=VALUE")
    add_sweep_arguments(sub.add_parser("sweep", help="run the pipeline once per combination of settings "
                                       "into outputs/sweeps/<name>/ and compare the runs"))
    show = sub.add_parser("config", help="validate a config and print it with every key explained")
    show.add_argument("--config", default="default")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


# FSDP + QLoRA as peft and bitsandbytes document it: whole decoder layers sharded, the adapters
# wrapped on their own (Trainer does that for peft models), rank 0 loads and the others receive.
FSDP_LAUNCH = ["--use_fsdp", "--fsdp_version", "1", "--fsdp_sharding_strategy", "FULL_SHARD",
               "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_backward_prefetch", "BACKWARD_PRE",
               "--fsdp_state_dict_type", "SHARDED_STATE_DICT", "--fsdp_cpu_ram_efficient_loading", "true",
               "--fsdp_sync_module_states", "true", "--fsdp_use_orig_params", "false",
               "--fsdp_offload_params", "false"]


def train_command(args) -> int:
    """Stages 01, 03 and 04 through their entry points (`runs.STAGES`); with --num-processes N the
    parent sets up and prepares, then launches N accelerate workers that only open the run and train."""
    run_name = args.run_name or resolve_config_path(args.config).stem
    if "LOCAL_RANK" in os.environ:  # a worker of a multi-GPU run: the parent prepared everything
        run = open_run(run_name, args.outputs_dir)  # the parent set it up with these settings
    else:
        run = setup_run(args.config, run_name, args.overrides, args.outputs_dir)
        stage("03").run(run)
        if args.num_processes > 1:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
                   "--num_processes", str(args.num_processes), "--mixed_precision", "no", "--dynamo_backend", "no",
                   *(FSDP_LAUNCH if run.cfg.train.distributed == "fsdp" else ["--multi_gpu"]),
                   "-m", "qlora_helpers", "train", "--config", args.config, "--run-name", run_name]
            cmd += [x for o in args.overrides for x in ("--set", o)]
            cmd += ["--outputs-dir", args.outputs_dir] if args.outputs_dir else []
            return subprocess.call(cmd)
    summary = stage("04").run(run)
    if "LOCAL_RANK" not in os.environ or os.environ["LOCAL_RANK"] == "0":
        losses = (f"held-out loss {summary['heldout_loss_base']} -> {summary['heldout_loss_tuned']}"
                  if summary["heldout_loss_tuned"] is not None else "held-out loss: run stage 05")
        print(f"Adapter saved to {run.adapter_dir}; {losses}")
    return 0


def export_command(args) -> int:
    """Merge (when merged/ is missing), write the GGUF files and the Modelfile, run the export gate."""
    from .serve.export import merge_and_export
    from .serve.gate import gate_summary, gate_table, run_export_gate
    from .serve.gguf import export_gguf

    run = open_run_folder(args.run, args.overrides)
    if not run.has_merged:
        merge_and_export(run)
    types = list(dict.fromkeys(args.gguf))
    if types:
        for gguf_type, info in export_gguf(run, types)["gguf"].items():
            print(f"wrote {info['path']} ({info['mib']} MiB, {info['how']}, {info['seconds']} s)")
    report = run_export_gate(run, types)
    for row in gate_table(report):
        print(f"{row['form']:<14} greedy equal {row['greedy equal']}, mean KL {row['mean KL']} "
              f"(bound {row['KL bound']}), tokenization {row['tokenization']}: {row['verdict']}")
    print(gate_summary(report))
    print(f"report: {run.export_report}")
    return 0 if report["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            path = run_pipeline(args.config, args.run_name, args.overrides, args.stages, args.outputs_dir)
            print(f"Run finished: {path}")
        elif args.command == "train":
            return train_command(args)
        elif args.command == "serve":
            # Before torch loads OpenMP: idle OpenMP threads that spin take the CPU from the event loop
            # thread; on the 2-core test machine a 5-token request took 0.5 s spinning, 0.04 s passive.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            from .serve import serve_run  # heavy: FastAPI, uvicorn and torch

            port = [f"serve.port={args.port}"] if args.port else []
            serve_run(open_run_folder(args.run, args.overrides + port))
        elif args.command == "export":
            return export_command(args)
        elif args.command == "sweep":
            return sweep_command(args)
        elif args.command == "config":
            for row in describe_config(load_config(args.config, args.overrides)):
                print(f"{row['key']:<36} {row['value']!r:<28} {row['help']}")
    except QLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
