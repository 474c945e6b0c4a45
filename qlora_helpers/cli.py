"""Command line: `python -m qlora_helpers run --config configs/default.yaml --set train.max_steps=10`."""

from __future__ import annotations

import argparse
import sys

from .errors import QLoraError


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
    show = sub.add_parser("config", help="validate a config and print it with every key explained")
    show.add_argument("--config", default="default")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            from .runner import run_pipeline

            path = run_pipeline(args.config, args.run_name, args.overrides, args.stages, args.outputs_dir)
            print(f"Run finished: {path}")
        elif args.command == "config":
            from .config import describe_config, load_config

            for row in describe_config(load_config(args.config, args.overrides)):
                print(f"{row['key']:<36} {row['value']!r:<28} {row['help']}")
    except QLoraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
