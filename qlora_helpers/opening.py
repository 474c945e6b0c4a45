"""Setting a run up and opening it again: the one place a run's settings are chosen, and the way every
later stage reopens the run by name.

Stage 01 resolves the config and inspects the machine (`setup_run`). Every later stage reopens the run
by its name from the files 01 wrote (`open_run`, or `open_run_folder` from a path alone), so the
notebooks never depend on each other's memory and settings are never typed twice; 05 and 06 may change
their own section (`STAGE_SECTIONS`) for themselves, and record it. The folder's layout is `runs.py`'s.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .config import Config, config_from_dict, load_config, origin_label
from .environment import collect_environment, plan_runtime, write_setup
from .errors import ConfigError
from .paths import read_json, run_dir
from .runs import STAGES, NotSetUp, Run, RunFolder

# What a later stage may change for itself: its own section, which shapes nothing an earlier stage made.
STAGE_SECTIONS = {"05": "eval", "06": "serve"}


def setup_run(config: str, run_name: str, overrides: Iterable[str] = (),
              outputs_dir: str | None = None, origin: str = "notebook parameter overrides") -> Run:
    """Stage 01: validate the config, inspect the machine, write config.json and env.json. This is the
    one place a run's settings are chosen (notebook 01's parameters, or `--set` on the command line);
    `origin` names where `overrides` came from in an error about one (`--set` for the command line)."""
    overrides = list(overrides)
    cfg = load_config(config, overrides, [origin_label(origin, text) for text in overrides])
    folder = RunFolder(run_dir(run_name, outputs_dir))
    env = collect_environment()
    write_setup(folder.config_file, folder.env_file, cfg, env, plan_runtime(cfg, env))
    return open_run(run_name, outputs_dir)


def open_run(run_name: str, outputs_dir: str | None = None, overrides: Iterable[str] = (),
             stage: str | None = None, origin: str | None = None) -> Run:
    """Stages 02-06: reopen a run set up by 01 by its name alone, with the settings 01 saved.

    `overrides` may change only `stage`'s own section (`eval.*` for "05", `serve.*` for "06"): they
    apply to this stage only and travel in `Run.stage_overrides` into its report. Any other change is
    an error naming the setting: it would make this stage disagree with what earlier stages made.
    `origin` names where `overrides` came from in an error about a value (default: the notebook
    parameter of 05 and 06, `eval_overrides` / `serve_overrides`, as papermill or a user sets it)."""
    folder = RunFolder(run_dir(run_name, outputs_dir, create=False))
    saved = _saved_config(folder, run_name)
    overrides = [o.strip() for o in overrides if o.strip()]
    if not overrides:
        return Run(run_name, folder.path, saved, read_json(folder.env_file))
    section = STAGE_SECTIONS.get(str(stage).zfill(2) if stage is not None else "")
    origin = origin or (f"notebook parameter {section}_overrides" if section else "override")
    asked = config_from_dict(saved.to_dict(), overrides, [origin_label(origin, text) for text in overrides])
    changed = [c for c in config_differences(asked, saved) if section is None or not c.startswith(f"{section}.")]
    if changed:
        own = f" Only {section}.* settings can change in stage {stage}." if section else ""
        raise ConfigError(
            f"Run {run_name!r} was set up with different settings ({'; '.join(changed[:5])}).{own} "
            f"Set them in 01_setup (or `python -m qlora_helpers run --set KEY=VALUE`) for a new run "
            f"name, or rerun 01_setup for this one.")
    return Run(run_name, folder.path, asked, read_json(folder.env_file), tuple(overrides))


def open_run_folder(path: str | Path, overrides: Iterable[str] = (), origin: str = "--set") -> Run:
    """A finished run from its folder alone (`outputs/<run>`), as serving opens it; `overrides` may
    change `serve.*` settings only, since everything else shaped the adapter. `origin` names where
    they came from in an error about one (the `serve` and `export` commands' --set by default)."""
    given = Path(path).expanduser()
    folder = RunFolder(given.resolve())
    overrides = list(overrides)
    labels = [origin_label(origin, text) for text in overrides]
    bad = [label for text, label in zip(overrides, labels) if not text.strip().startswith("serve.")]
    if bad:
        raise ConfigError(f"Only serve.* settings can change for a finished run (serve, export); got {bad[0]}. "
                          f"Other settings belong to the run (set them in 01 and retrain).")
    if not folder.path.exists():
        raise NotSetUp(f"Run folder {given} does not exist: give --run the folder of a trained run, "
                       f"e.g. outputs/default.")
    if not folder.path.is_dir():
        raise NotSetUp(f"Run folder {given} is a file, not a folder: give --run the folder of a trained run, "
                       f"e.g. outputs/default.")
    if saved_config(folder) is None:  # open_run's advice (`run --run-name`) would set up outputs/<name>, not here
        raise NotSetUp(f"{given} is not a run folder ({folder.config_file} is missing): give --run the folder "
                       f"a run was set up and trained in, e.g. outputs/default.")
    cfg = config_from_dict(read_json(folder.config_file), overrides, labels)
    return Run(folder.path.name, folder.path, cfg, read_json(folder.env_file), tuple(overrides))


def describe_run(run: Run) -> str:
    """One line for the top of 02-06: the run, where its settings live, the ones that shape it most,
    and this stage's own changes (01 shows every changed setting in a table)."""
    cfg = run.cfg
    quant = f"{cfg.quant.quant_type.upper()} 4-bit" if cfg.quant.load_in_4bit else "full precision"
    targets = cfg.lora.target_modules if isinstance(cfg.lora.target_modules, str) else ",".join(cfg.lora.target_modules)
    steps = f"{cfg.train.max_steps} steps" if cfg.train.max_steps > 0 else f"{cfg.train.num_epochs:g} epochs"
    own = f"; for this stage only: {', '.join(run.stage_overrides)}" if run.stage_overrides else ""
    return (f"run {run.name!r} (settings fixed by 01 in {run.config_file.parent.name}/{run.config_file.name}): "
            f"{cfg.model.source}, {quant}, LoRA r={cfg.lora.r} alpha={cfg.lora.alpha} on {targets}, "
            f"lr {cfg.train.learning_rate:g} for {steps}; {run.device}, {run.runtime.compute_dtype}{own}")


def saved_config(folder: RunFolder | Run) -> Config | None:
    """The config a run folder was set up with, or None when 01 has not run there."""
    return config_from_dict(read_json(folder.config_file)) if folder.config_file.is_file() else None


def _saved_config(folder: RunFolder | Run, run_name: str) -> Config:
    cfg = saved_config(folder)
    if cfg is None:
        raise NotSetUp(f"Run {run_name!r} has not been set up ({folder.config_file} is missing). "
                       f"Run notebooks/{STAGES[0].notebook} with run_name={run_name!r} first (it fixes the "
                       f"run's settings), or `python -m qlora_helpers run --stages 01 --run-name {run_name}`.")
    return cfg


def config_differences(asked: Config, saved: Config) -> list[str]:
    """'section.key: now X, run has Y' for every setting that differs."""
    return _differences(asked.to_dict(), saved.to_dict())


def _differences(asked: dict[str, Any], saved: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in asked:
        a, s = asked[key], saved.get(key)
        if isinstance(a, dict) and isinstance(s, dict):
            out += _differences(a, s, f"{prefix}{key}.")
        elif a != s:
            out.append(f"{prefix}{key}: now {a!r}, run has {s!r}")
    return out
