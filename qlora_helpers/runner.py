"""Run the stage notebooks headless with papermill, one run folder per run.

Executed copies go to `outputs/<run>/notebooks/`; the source notebooks stay clean. The config is
validated before any notebook starts, and a failing cell stops the run with the notebook, cell,
error and the path of the executed copy. Which notebooks exist, and in what order, is `runs.STAGES`.

Imports: papermill, jupyter_client and zmq are imported when notebooks run (heavy: nbclient and
its kernel machinery).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

from .config import Config, config_from_dict, load_config, origin_label, resolve_config_path
from .errors import ConfigError, DataError, QLoraError
from .opening import STAGE_SECTIONS, config_differences, saved_config
from .paths import PROJECT_ROOT, run_dir
from .runs import NOTEBOOK_DIR, STAGES, NotSetUp, RunFolder, Stage, record_stage, stage_key
from .sources import builtin_notice, check_sources


class StageFailed(QLoraError):
    """A notebook raised while papermill executed it."""


def select_stages(stages: str | Iterable[str] | None) -> list[Stage]:
    """The stages named (`"01,3"`, `["04"]`), in pipeline order; all of them for None."""
    if stages is None:
        return list(STAGES)
    wanted = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages) if s.strip()]
    known = {s.number for s in STAGES}
    if not wanted:
        raise QLoraError(f"No stage named in {stages!r}: give stage numbers separated by commas, e.g. 01,02, "
                         f"from {', '.join(sorted(known))} (or leave --stages out for all).")
    unknown = [s for s in wanted if stage_key(s) not in known]
    if unknown:
        raise QLoraError(f"Unknown stage(s) {', '.join(unknown)}; available: {', '.join(sorted(known))}.")
    return [s for s in STAGES if s.number in {stage_key(w) for w in wanted}]


def stages_argument(text: str) -> str:
    """--stages of `run` and `sweep`: stage numbers the runner knows (checked before anything runs)."""
    try:
        select_stages(text)
    except QLoraError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def applying_stages(chosen: list[Stage], cfg: Config) -> list[Stage]:
    """The stages of `chosen` that `cfg` runs (04b only when the profile enables it); none is an error."""
    selected = [s for s in chosen if s.applies(cfg)]
    if not selected:
        raise QLoraError("Nothing to run: " + "; ".join(f"stage {s.number} runs only when {s.enabled_by} is true"
                                                        for s in chosen) + ". Set it, or name other stages.")
    return selected


def run_pipeline(config: str, run_name: str | None = None, overrides: Iterable[str] = (),
                 stages: str | Iterable[str] | None = None, outputs_dir: str | None = None,
                 progress: bool = True) -> Path:
    """Execute the selected stage notebooks in order; return the run folder."""
    selected, path, parameters = plan_pipeline(config, run_name, overrides, stages, outputs_dir)
    previous = os.environ.get("QLORA_HEADLESS")
    os.environ["QLORA_HEADLESS"] = "1"  # the kernels inherit it: no interactive prompts
    try:
        _execute(selected, RunFolder(path), parameters, progress)
    finally:
        if previous is None:
            os.environ.pop("QLORA_HEADLESS", None)
        else:
            os.environ["QLORA_HEADLESS"] = previous
    return path


def plan_pipeline(config: str, run_name: str | None = None, overrides: Iterable[str] = (),
                  stages: str | Iterable[str] | None = None,
                  outputs_dir: str | None = None) -> tuple[list[Stage], Path, dict]:
    """Every check run_pipeline makes before a notebook starts: (the stages to run, the run folder,
    the notebooks' parameters)."""
    overrides = list(overrides)
    config_path = resolve_config_path(config)
    run_name = config_path.stem if run_name is None else run_name  # "" is refused by run_dir
    chosen = select_stages(stages)
    # fail on a bad key before any notebook starts; without 01 the run exists and its own settings
    # (config.json) are the base, so only the --set keys can differ from them, not the profile's defaults
    saved = saved_config(RunFolder(run_dir(run_name, outputs_dir, create=False))) if chosen[0].number != "01" else None
    cfg = load_config(config_path, overrides) if saved is None else _with_overrides(saved, overrides, run_name)
    selected = applying_stages(chosen, cfg)
    readers = [s.notebook for s in selected if s.reads_sources]
    if readers:  # and on a training file that cannot be read, instead of minutes into the run
        try:
            fallback = check_sources(cfg.data)
        except DataError as exc:
            raise type(exc)(f"Nothing was run: {' and '.join(readers)} read the training data "
                            f"(data.sources). {exc}") from None
        if fallback:  # a hub source out of reach without an offline copy: the run still works
            print(builtin_notice(fallback), flush=True)
    path = run_dir(run_name, outputs_dir, create=selected[0].number == "01")  # without 01: refused if not set up
    parameters = {"config": str(config_path), "run_name": run_name, "overrides": overrides,
                  "outputs_dir": str(path.parent)}
    if selected[0].number != "01":  # the run exists: its settings were fixed by 01, check before starting
        parameters.update(stage_overrides(RunFolder(path), run_name, cfg, selected,
                                          lambda: load_config(config_path)))  # the profile, for an error
    return selected, path, parameters


# The parameters cell of each notebook: 01 chooses the run's settings; 02-06 open the run by name,
# 05 and 06 with changes to their own section only (opening.STAGE_SECTIONS).
PARAMETER_NAMES = {"01": ("config", "run_name", "overrides", "outputs_dir"),
                   "05": ("run_name", "outputs_dir", "eval_overrides"),
                   "06": ("run_name", "outputs_dir", "serve_overrides")}


def notebook_parameters(stage: Stage, parameters: dict) -> dict:
    """The values papermill injects into `stage`'s notebook: only the names its parameters cell has."""
    names = PARAMETER_NAMES.get(stage.number, ("run_name", "outputs_dir"))
    return {k: parameters[k] for k in names if k in parameters}


def _with_overrides(saved: Config, overrides: list[str], run_name: str) -> Config:
    """The run's saved settings with `overrides`; an error about a value names the --set at fault
    (config_from_dict's labels), or every --set where none sets the key it is about."""
    labels = [origin_label("--set", text) for text in overrides]
    try:
        return config_from_dict(saved.to_dict(), overrides, labels)
    except ConfigError as exc:
        named = any(str(exc).startswith(f"{label}: ") for label in labels)
        raise ConfigError(f"Run {run_name!r}'s settings with {exc if named else ' '.join(labels) + ': ' + str(exc)}",
                          key=exc.key) from None


def stage_overrides(folder: RunFolder, run_name: str, asked, stages: list[Stage], profile=None) -> dict:
    """Without stage 01, the overrides must be the run's own settings, except for the sections of 05
    (eval.*) and 06 (serve.*), which go to those notebooks; anything else is the clear error of
    `opening.open_run`, raised before any notebook starts."""
    saved = saved_config(folder)
    if saved is None:
        raise NotSetUp(f"Run {run_name!r} has not been set up ({folder.config_file} is missing): "
                       f"include stage 01 (--stages 01,...).")
    changed = {c.partition(":")[0]: c for c in config_differences(asked, saved)}
    sections = {s.number: STAGE_SECTIONS[s.number] for s in stages if s.number in STAGE_SECTIONS}
    own = {key for key in changed if any(key.startswith(f"{sec}.") for sec in sections.values())}
    fixed = sorted(set(changed) - own)
    if fixed:
        values, last = asked.to_dict(), STAGES.index(stages[-1])
        through = [s.number for s in STAGES[:last + 1] if s.applies(asked)]  # what that setting shapes, redone
        # the run's own settings that differ from the profile (`profile`) come along, or 01 would drop them
        try:
            base = profile() if profile is not None else None
        except ConfigError:
            base = None
        kept = [c.partition(":")[0] for c in (config_differences(saved, base) if base is not None else [])]
        keys = [k for k in kept if k not in changed] + fixed
        sets = " ".join(f"--set '{key}={json.dumps(_value(values, key))}'" for key in keys)
        allowed = " and ".join(f"{sec}.* (stage {n})" for n, sec in sections.items()) or "no setting"
        raise ConfigError(
            f"Run {run_name!r} was set up by stage 01 with other settings ({'; '.join(changed[k] for k in fixed)}); "
            f"without 01, --set may change only {allowed}. To change it, pick a new run name "
            f"(--run-name NEW {sets}), or redo this run from 01: --stages {','.join(through)} {sets}.")
    values = asked.to_dict()
    texts = [f"{key}={json.dumps(_value(values, key))}" for key in sorted(own)]
    return {f"{sec}_overrides": [t for t in texts if t.startswith(f"{sec}.")] for sec in ("eval", "serve")}


def _value(data: dict, dotted: str):
    for key in dotted.split("."):
        data = data[key]
    return data


def _kernel_manager_class():
    """jupyter_client's kernel manager, provisioning CurveZMQ keys for the kernel's channels where the
    kernel declares it can use them (ipykernel 7 does): code and outputs between papermill and the
    kernel are then encrypted, and ipykernel no longer warns on every start that they are not."""
    import zmq
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import CaselessStrEnum

    if not zmq.has("curve"):  # libzmq built without libsodium: jupyter_client's default, plain TCP
        return AsyncKernelManager

    class CurveKernelManager(AsyncKernelManager):
        transport_encryption = CaselessStrEnum(["disabled", "auto", "required"], default_value="auto",
                                               config=True)

    return CurveKernelManager


def _execute(stages: list[Stage], folder: RunFolder, parameters: dict, progress: bool) -> None:
    import papermill
    from papermill.exceptions import PapermillExecutionError

    kernel_manager_class = _kernel_manager_class()

    for i, stage in enumerate(stages, 1):
        notebook = stage.notebook_path
        out = folder.notebooks_dir / stage.notebook
        out.parent.mkdir(parents=True, exist_ok=True)
        shown = out.relative_to(PROJECT_ROOT) if out.is_relative_to(PROJECT_ROOT) else out
        print(f"[{i}/{len(stages)}] {notebook.stem} -> {shown}", flush=True)
        start = time.perf_counter()
        try:
            for attempt in (1, 2):
                try:
                    papermill.execute_notebook(str(notebook), str(out),
                                               parameters=notebook_parameters(stage, parameters),
                                               kernel_name="python3", cwd=str(NOTEBOOK_DIR),
                                               progress_bar=progress, log_output=False,
                                               kernel_manager_class=kernel_manager_class)
                    break
                except RuntimeError as exc:
                    # the kernel process died while starting, before any cell ran (seen once in a
                    # loaded test run): starting it again is safe; a second death is reported
                    if attempt == 2 or "Kernel died before replying to kernel_info" not in str(exc):
                        raise
                    print(f"    the kernel died while starting ({exc}); starting it again", flush=True)
        except PapermillExecutionError as exc:
            record_stage(folder, stage, time.perf_counter() - start, f"{exc.ename}: {exc.evalue}")
            raise StageFailed(
                f"{notebook.name} failed in cell {exc.exec_count} ({exc.ename}: {exc.evalue}). "
                f"The executed copy with all outputs is {out}.") from None
        seconds = time.perf_counter() - start
        record_stage(folder, stage, seconds)
        print(f"    done in {seconds:.0f} s", flush=True)
