"""A run: one folder `outputs/<run>/` that every stage reads from and writes into.

Stage 01 resolves the config and inspects the machine (`setup_run`); every later stage reopens the
run from those files (`open_run`), so the notebooks never depend on each other's memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .config import Config, config_from_dict, load_config
from .environment import collect_environment, plan_runtime, write_setup
from .errors import ConfigError, QLoraError
from .paths import read_json, run_dir


@dataclass(frozen=True)
class Run:
    name: str
    path: Path
    cfg: Config
    env: dict[str, Any]

    @property
    def runtime(self) -> dict[str, Any]:
        return self.env["runtime"]

    @property
    def device(self) -> str:
        return self.runtime["device"]

    @property
    def compute_dtype(self):
        import torch

        return getattr(torch, self.runtime["compute_dtype"])


def setup_run(config: str, run_name: str, overrides: Iterable[str] = (),
              outputs_dir: str | None = None) -> Run:
    """Stage 01: validate the config, inspect the machine, write config.json and env.json."""
    cfg = load_config(config, list(overrides))
    path = run_dir(run_name, outputs_dir)
    env = collect_environment()
    write_setup(path, cfg, env, plan_runtime(cfg, env))
    return open_run(config, run_name, overrides, outputs_dir)


def open_run(config: str, run_name: str, overrides: Iterable[str] = (),
             outputs_dir: str | None = None) -> Run:
    """Stages 02-06: reopen a run set up by 01, checking the parameters still match it."""
    path = run_dir(run_name, outputs_dir, create=False)
    if not (path / "config.json").is_file():
        raise QLoraError(f"Run {run_name!r} has not been set up ({path / 'config.json'} is missing). "
                         f"Run notebooks/01_setup.ipynb with the same parameters first.")
    cfg = config_from_dict(read_json(path / "config.json"))
    asked = load_config(config, list(overrides))
    if asked != cfg:
        changed = _differences(asked.to_dict(), cfg.to_dict())
        raise ConfigError(
            f"Run {run_name!r} was set up with different settings ({'; '.join(changed[:5])}). "
            f"Rerun 01_setup with these parameters, or pick a new run name.")
    return Run(run_name, path, cfg, read_json(path / "env.json"))


def _differences(asked: dict[str, Any], saved: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in asked:
        a, s = asked[key], saved.get(key)
        if isinstance(a, dict) and isinstance(s, dict):
            out += _differences(a, s, f"{prefix}{key}.")
        elif a != s:
            out.append(f"{prefix}{key}: now {a!r}, run has {s!r}")
    return out
