"""Command line: `python -m qlora_helpers run --config configs/default.yaml --set train.max_steps=10`.

Imports: everything at the top but `serve` (FastAPI, uvicorn and torch: seconds), which only the
`serve` command needs; the stage modules load when a stage runs (`runs.Stage.run`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

import yaml

from .config import CONFIG_DIR, GGUF_TYPES, describe_config, load_config, resolve_config_path
from .errors import QLoraError, UsageError
from .machines import check_port_free, launch, open_run_in_worker
from .opening import open_run, open_run_folder, setup_run
from .paths import run_dir
from .plan import describe_fix, describe_plan, fits, memory_plan
from .runner import run_pipeline, stages_argument
from .runs import stage
from .sweep import add_arguments as add_sweep_arguments
from .sweep import sweep_command


def run_name_argument(text: str) -> str:
    """--run-name: a usable folder name; empty is refused (it used to become the profile's name)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the run name is empty: give one (letters, digits, '.', '_', '-'), "
                                         "or leave --run-name out to use the profile's name")
    try:
        run_dir(text, create=False)  # the naming rules of a run folder; nothing is created
    except QLoraError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def gib_argument(text: str) -> float:
    """--gpu-gib: a card's memory, a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a card size: give the card's memory in GiB, a "
                                         f"positive number, e.g. --gpu-gib 24")
    return value


def port_argument(text: str) -> int:
    """--port: a TCP port, 1 .. 65535 (0 used to serve on serve.port's 8000 without a word)."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port: give 1 .. 65535, e.g. --port 8001 "
                                         f"(leave --port out to use serve.port)")
    return port


CONFIG_HELP = "a profile name in configs/ (default, llama2-7b, ...) or a YAML file (default: default)"
VALUE_WIDTH = 28  # the value column of `config`; a longer value puts its help on the next line


def yaml_text(value) -> str:
    """A setting's value as a profile or --set writes it: YAML flow style, a list of sources as the
    mappings a user writes (their keys that differ from the defaults, the first one always)."""
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        first = dataclasses.fields(value[0])[0].name
        value = [{k: v for k, v in dataclasses.asdict(item).items()
                  if k == first or v != getattr(type(item)(), k)} for item in value]
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=math.inf).strip()
    return text.removesuffix("...").strip()  # a plain scalar ends with YAML's document-end marker


def config_lines(cfg) -> list[str]:
    """`config`'s table: each key, its value as YAML and what it does, the help in one column."""
    rows = describe_config(cfg)
    width = max(len(row["key"]) for row in rows)
    lines = []
    for row in rows:
        value = yaml_text(row["value"])
        if len(value) <= VALUE_WIDTH:
            lines.append(f"{row['key']:<{width}}  {value:<{VALUE_WIDTH}}  {row['help']}")
        else:
            lines += [f"{row['key']:<{width}}  {value}", " " * (width + VALUE_WIDTH + 4) + row["help"]]
    return lines


PLAN_HELP = ("predict the peak GPU memory of training and serving a profile, from the model's shape (no "
             "download, no GPU); exits 1 when training does not fit the card")


def add_plan_parser(sub) -> None:
    plan = sub.add_parser("plan", help=PLAN_HELP, description=PLAN_HELP[0].upper() + PLAN_HELP[1:] + ", and then "
                          "prints the settings that would fit. A CUDA card's memory: a CPU run is not planned.")
    plan.add_argument("--config", default="default", help=CONFIG_HELP)
    plan.add_argument("--gpu-gib", type=gib_argument, default=12.0, help="the card's memory in GiB (default: 12)")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override one setting, e.g. --set train.packed_tokens=8192 (repeatable)")


def add_train_parser(sub) -> None:
    """`train`: the run's settings, and the layout of its processes on one machine or several."""
    train = sub.add_parser("train", help="set up the run, prepare the data and train (no notebooks)")
    train.add_argument("--config", default="default", help=CONFIG_HELP)
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one setting, e.g. --set train.max_steps=100 (repeatable; with several "
                            "machines, the same on each)")
    train.add_argument("--run-name", type=run_name_argument,
                       help="run folder name under outputs/ (default: the profile name)")
    train.add_argument("--outputs-dir", help="where run folders go (default: outputs/); with several machines, a "
                       "folder every machine sees (a shared filesystem)")
    train.add_argument("--num-processes", type=int, default=1,
                       help="processes on this machine, one per GPU, launched with accelerate (DDP, or FSDP when "
                            "train.distributed=fsdp); the global batch is micro_batch_size x "
                            "gradient_accumulation_steps x N x machines")
    train.add_argument("--num-machines", type=int, default=1,
                       help="machines (nodes) training together; run the same command on each with its own "
                            "--machine-rank (docs/multi-node.md)")
    train.add_argument("--machine-rank", type=int, default=0,
                       help="this machine's rank, 0 .. num-machines - 1; machine 0 prepares the run and data")
    train.add_argument("--main-address", help="address of machine 0, which every machine can reach "
                       "(needed with --num-machines > 1)")
    train.add_argument("--main-port", type=int, help="a free TCP port on machine 0 (default: 29500)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qlora_helpers",
                                     description="QLoRA fine-tuning, one stage notebook at a time.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute the stage notebooks with papermill into outputs/<run>/")
    run.add_argument("--config", default="default", help=CONFIG_HELP)
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override one setting, e.g. --set train.learning_rate=1e-4 (repeatable)")
    run.add_argument("--run-name", type=run_name_argument,
                     help="run folder name under outputs/ (default: the profile name)")
    run.add_argument("--stages", type=stages_argument, help="comma-separated stage numbers, e.g. 01,02 (default: all)")
    run.add_argument("--outputs-dir", help="where run folders go (default: outputs/)")
    add_train_parser(sub)
    serve = sub.add_parser("serve", help="serve a trained run on the OpenAI API (FastAPI + uvicorn)",
                           description="Serve a trained run on the OpenAI API (FastAPI + uvicorn) on 127.0.0.1. "
                           "merged/ and the GGUF served are made first when missing or older than the adapter.")
    serve.add_argument("--run", required=True, help="the run folder, e.g. outputs/default")
    serve.add_argument("--port", type=port_argument, help="TCP port, 1 .. 65535 (default: serve.port, 8000)")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="serve.KEY=VALUE",
                       help="override a serve setting, e.g. --set serve.form=adapter (repeatable)")
    export_help = ("merge the adapter (again when it changed since merged/ was made), export GGUF files with "
                   "llama.cpp and run the export gate (export.json, as stage 06 writes it); exits 1 when a form "
                   "disagrees with the adapter model")
    export = sub.add_parser("export", help=export_help, description=export_help[0].upper() + export_help[1:] + ".")
    export.add_argument("--run", required=True, help="the run folder, e.g. outputs/default")
    export.add_argument("--gguf", action="append", default=[], choices=GGUF_TYPES,
                        help="GGUF type to write into <run>/gguf/ and check (repeatable; needs the [gguf] extra); "
                             "the first is the one the Ollama Modelfile names (default: the run's serve.gguf, "
                             "as stage 06 exports; without the extra those are left out, and export.json says so)")
    export.add_argument("--set", dest="overrides", action="append", default=[], metavar="serve.KEY=VALUE",
                        help="override a serve setting for this export, e.g. --set 'serve.gguf=[q8_0,f16]' or "
                             "--set serve.export_dtype=float16 (repeatable)")
    add_sweep_arguments(sub.add_parser("sweep", help="run the pipeline once per combination of settings "
                                       "into outputs/sweeps/<name>/ and compare the runs"))
    add_plan_parser(sub)
    show = sub.add_parser("config", help="validate a config and print it with every key explained")
    show.add_argument("--config", default="default", help=CONFIG_HELP)
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


# How accelerate launches the workers: configs/accelerate/<ddp|fsdp>.yaml (FSDP + QLoRA as peft keeps
# it in examples/sft/configs); the machine layout comes from the command line.
ACCELERATE_CONFIGS = CONFIG_DIR / "accelerate"


def accelerate_command(args, run_name: str, distributed: str) -> list[str]:
    """`accelerate launch` of this same `train` command on every process of this machine."""
    machines = args.num_machines
    layout = ["--num_machines", str(machines), "--num_processes", str(args.num_processes * machines)]
    if machines > 1:
        layout += ["--machine_rank", str(args.machine_rank), "--main_process_ip", args.main_address,
                   "--main_process_port", str(args.main_port or 29500)]
    elif args.main_port:
        layout += ["--main_process_port", str(args.main_port)]
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(ACCELERATE_CONFIGS / f"{distributed}.yaml"), *layout,
           "-m", "qlora_helpers", "train", "--config", args.config, "--run-name", run_name]
    cmd += [x for o in args.overrides for x in ("--set", o)]
    return cmd + (["--outputs-dir", args.outputs_dir] if args.outputs_dir else [])


def check_layout(args) -> None:
    """The machine layout of `train`, checked before anything is set up (UsageError: exit 2)."""
    if args.num_processes < 1 or args.num_machines < 1:
        raise UsageError(f"--num-processes {args.num_processes} and --num-machines {args.num_machines} must be "
                         f"at least 1.")
    if args.num_machines > 1 and not args.main_address:
        raise UsageError(f"--num-machines {args.num_machines} needs --main-address: the address of machine 0 "
                         f"that every machine can reach (docs/multi-node.md).")
    if not 0 <= args.machine_rank < args.num_machines:
        raise UsageError(f"--machine-rank {args.machine_rank} is outside 0 .. {args.num_machines - 1} "
                         f"(--num-machines {args.num_machines}).")
    if args.main_port is not None and not 1 <= args.main_port <= 65535:
        raise UsageError(f"--main-port {args.main_port} is not a TCP port: use 1 .. 65535, a free port on "
                         f"machine 0 (default 29500).")


def train_command(args) -> int:
    """Stages 01, 03 and 04 through their entry points (`runs.STAGES`); with --num-processes N (and
    --num-machines M) machine 0's parent sets up and prepares, then every machine launches its N
    accelerate workers, which only open the run and train."""
    run_name = resolve_config_path(args.config).stem if args.run_name is None else args.run_name
    check_layout(args)
    if "LOCAL_RANK" in os.environ:  # a worker of a multi-process run: machine 0's parent prepared everything
        run = (open_run_in_worker(args, run_name) if int(os.environ.get("WORLD_SIZE", "1")) > 1
               else open_run(run_name, args.outputs_dir))  # the parent set it up with these settings
    elif args.machine_rank > 0:  # another machine: its workers wait for machine 0's
        distributed = load_config(args.config, args.overrides).train.distributed
        return launch(accelerate_command(args, run_name, distributed))
    else:
        if args.num_machines > 1:
            check_port_free(args.main_port or 29500)
        run = setup_run(args.config, run_name, args.overrides, args.outputs_dir, origin="--set")
        stage("03").run(run)
        if args.num_processes * args.num_machines > 1:
            return launch(accelerate_command(args, run_name, run.cfg.train.distributed))
    summary = stage("04").run(run)
    if os.environ.get("RANK", "0") == "0":
        losses = (f"held-out loss {summary['heldout_loss_base']} -> {summary['heldout_loss_tuned']}"
                  if summary["heldout_loss_tuned"] is not None else "held-out loss: run stage 05")
        print(f"Adapter saved to {run.adapter_dir}; {losses}")
    return 0


def export_command(args) -> int:
    """Merge (when merged/ is missing or older than the adapter served), write the GGUF files (--gguf,
    default serve.gguf's) and the Modelfile, run the export gate: export.json as stage 06 writes it."""
    run = open_run_folder(args.run, args.overrides)  # a wrong --run is said before the imports
    from .serve.export import ensure_merged
    from .serve.gate import export_and_check, gate_summary, gate_table

    ensure_merged(run)
    types = list(dict.fromkeys(args.gguf)) or None  # None: the run's serve.gguf, as 06 exports
    report = export_and_check(run, types)
    exported = report["export"] or {"gguf": {}}
    for info in (i for i in exported["gguf"].values() if not i.get("kept")):  # kept: an earlier export's
        print(f"wrote {info['path']} ({info['mib']} MiB, {info['bits_per_weight']} bits per weight, "
              f"{info['how']}, {info['seconds']} s)")
    if report["note"]:
        print(report["note"])
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
            port = [f"serve.port={args.port}"] if args.port is not None else []
            run = open_run_folder(args.run, args.overrides + port)  # a wrong --run is said before the imports
            from .serve import serve_run  # heavy: FastAPI, uvicorn and torch

            serve_run(run)
        elif args.command == "export":
            return export_command(args)
        elif args.command == "sweep":
            return sweep_command(args)
        elif args.command == "plan":
            cfg = load_config(args.config, args.overrides)
            plan = memory_plan(cfg, args.gpu_gib)
            print("\n".join(describe_plan(plan)))
            if fits(plan["training"]["peak"], args.gpu_gib):
                return 0
            print("\n".join(describe_fix(cfg, args.config, args.overrides, args.gpu_gib)))
            return 1
        elif args.command == "config":
            print("\n".join(config_lines(load_config(args.config, args.overrides))))
    except UsageError as exc:  # as argparse reports a wrong option
        print(f"python -m qlora_helpers {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except QLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
