"""Run the stage notebooks headless with papermill, one run folder per run.

Executed copies go to `outputs/<run>/notebooks/`; the source notebooks stay clean. The config is
validated before any notebook starts, and a failing cell stops the run with the notebook, cell,
error and the path of the executed copy. Which notebooks exist, and in what order, is `runs.STAGES`.

Imports: papermill, jupyter_client and zmq are imported when notebooks run (heavy: nbclient and
its kernel machinery).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable

from .config import load_config, resolve_config_path
from .data import DataError, builtin_notice, check_sources
from .errors import QLoraError
from .paths import PROJECT_ROOT, run_dir
from .runs import NOTEBOOK_DIR, STAGES, RunFolder, Stage


class StageFailed(QLoraError):
    """A notebook raised while papermill executed it."""


def select_stages(stages: str | Iterable[str] | None) -> list[Stage]:
    """The stages named (`"01,3"`, `["04"]`), in pipeline order; all of them for None."""
    if stages is None:
        return list(STAGES)
    wanted = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages) if s.strip()]
    known = {s.number for s in STAGES}
    unknown = [s for s in wanted if s.zfill(2) not in known]
    if unknown:
        raise QLoraError(f"Unknown stage(s) {', '.join(unknown)}; available: {', '.join(sorted(known))}.")
    return [s for s in STAGES if s.number in {w.zfill(2) for w in wanted}]


def run_pipeline(config: str, run_name: str | None = None, overrides: Iterable[str] = (),
                 stages: str | Iterable[str] | None = None, outputs_dir: str | None = None,
                 progress: bool = True) -> Path:
    """Execute the selected stage notebooks in order; return the run folder."""
    overrides = list(overrides)
    config_path = resolve_config_path(config)
    cfg = load_config(config_path, overrides)  # fail on a bad key before any notebook starts
    run_name = run_name or config_path.stem
    selected = select_stages(stages)
    readers = [s.notebook for s in selected if s.reads_sources]
    if readers:  # and on a training file that cannot be read, instead of minutes into the run
        try:
            fallback = check_sources(cfg.data)
        except DataError as exc:
            raise type(exc)(f"Nothing was run: {' and '.join(readers)} read the training data "
                            f"(data.sources). {exc}") from None
        if fallback:  # a hub source out of reach without an offline copy: the run still works
            print(builtin_notice(fallback), flush=True)
    path = run_dir(run_name, outputs_dir)
    parameters = {"config": str(config_path), "run_name": run_name, "overrides": overrides,
                  "outputs_dir": str(path.parent)}
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
        print(f"[{i}/{len(stages)}] {notebook.stem} -> {out.relative_to(PROJECT_ROOT) if out.is_relative_to(PROJECT_ROOT) else out}", flush=True)
        start = time.perf_counter()
        try:
            for attempt in (1, 2):
                try:
                    papermill.execute_notebook(str(notebook), str(out), parameters=parameters,
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
            raise StageFailed(
                f"{notebook.name} failed in cell {exc.exec_count} ({exc.ename}: {exc.evalue}). "
                f"The executed copy with all outputs is {out}.") from None
        print(f"    done in {time.perf_counter() - start:.0f} s", flush=True)
