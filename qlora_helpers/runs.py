"""A run: one folder `outputs/<run>/` that every stage reads from and writes into.

This module owns the folder's layout: every file and folder a stage writes is a property of
`RunFolder` (a bare path, for code that inspects a run that may be half done, like a sweep resuming)
and so of `Run` (the folder with its validated config and environment). No other module spells a
run-folder file name. `STAGES` says, once, what each stage notebook reads and the file it writes last
(its report, which marks the stage done). Each stage's sequence is its notebook; 03 and 04, which the
`train` command also runs without notebooks, have an entry point (`run_stage(run) -> report`) over
the same functions the notebook's cells call.

Stage 01 resolves the config and inspects the machine (`setup_run`): the one place a run's settings
are chosen. Every later stage reopens the run by its name from those files (`open_run`, or
`open_run_folder` from a path alone), so the notebooks never depend on each other's memory and
settings are never typed twice; 05 and 06 may change their own section (`STAGE_SECTIONS`) for
themselves, and record it.

Where this differs from docs/design.md's style rules, and why:
- The notebooks end by writing their report, but not always in the very last cell: 03 writes
  `data_report.json` in its second step (`prepare_run_data`, whose later cells only show what it
  made), 05 writes `eval.json` before its cells that show the paired differences and the latest
  sweep (read back from the report), and 06 before it stops the server.
  The report is the stage's last *file*, which is what `STAGES` and a resuming sweep rely on.
- The sweep executes the notebooks (papermill) rather than `Stage.run`: a sweep's runs are meant to be
  read like any run, executed notebooks included; it uses `STAGES` to decide what is done.

Imports: torch (for `Run.compute_dtype`) and the stage modules (for `Stage.run`) are imported where
used, because they are heavy and this module is read by every light tool (sweep planning, the CLI).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, apply_overrides, config_from_dict, load_config
from .environment import collect_environment, plan_runtime, write_setup
from .errors import ConfigError, QLoraError
from .paths import PROJECT_ROOT, read_json, run_dir

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"


class NotSetUp(QLoraError):
    """A stage was asked to open a run that stage 01 has not set up."""


class MissingArtifact(QLoraError):
    """A stage needs a file or folder an earlier stage writes, and it is not there."""


class _Layout:
    """Every path of a run folder, from `self.path`. Grouped by the stage that writes them."""

    path: Path

    # 01 setup
    @property
    def config_file(self) -> Path:
        return self.path / "config.json"

    @property
    def env_file(self) -> Path:
        return self.path / "env.json"

    @property
    def sweep_info_file(self) -> Path:  # written by a sweep into each of its runs: name, tag, swept values
        return self.path / "sweep_run.json"

    @property
    def notebooks_dir(self) -> Path:  # the executed copies papermill writes
        return self.path / "notebooks"

    # 02 quantize
    @property
    def quantization_report(self) -> Path:
        return self.path / "quantization.json"

    @property
    def footprint_plot(self) -> Path:
        return self.path / "quantization_footprint.png"

    @property
    def levels_plot(self) -> Path:
        return self.path / "quantization_levels.png"

    @property
    def layer_errors_plot(self) -> Path:
        return self.path / "quantization_layer_errors.png"

    # 03 data prep
    @property
    def data_dir(self) -> Path:
        return self.path / "data"

    @property
    def data_report(self) -> Path:  # written last by 03: marks the tokenized sets complete
        return self.data_dir / "data_report.json"

    def split_dir(self, split: str) -> Path:
        """The tokenized `train` or `eval` set (a `datasets` folder)."""
        if split not in ("train", "eval"):
            raise QLoraError(f"Unknown split {split!r}; stage 03 writes 'train' and 'eval'.")
        return self.data_dir / split

    @property
    def lengths_plot(self) -> Path:
        return self.path / "data_lengths.png"

    @property
    def padding_plot(self) -> Path:
        return self.path / "data_padding.png"

    # 04 train
    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter_dir(self) -> Path:
        return self.path / "adapter"

    @property
    def has_adapter(self) -> bool:
        return (self.adapter_dir / "adapter_config.json").is_file()  # peft's file: the adapter is complete

    def require_adapter(self) -> Path:
        """The adapter folder, or an error saying to train first."""
        if not self.has_adapter:
            raise MissingArtifact(f"No adapter in {self.adapter_dir}. Run notebooks/04_train.ipynb for run "
                                  f"{self.path.name!r} first.")
        return self.adapter_dir

    @property
    def lora_plot(self) -> Path:  # 04's picture of LoRA's shapes
        return self.path / "lora_shapes.png"

    @property
    def train_log(self) -> Path:
        return self.path / "train_log.json"

    @property
    def training_plot(self) -> Path:
        return self.path / "training_curves.png"

    @property
    def wandb_dir(self) -> Path:  # W&B writes its own `wandb/` folder inside
        return self.path

    # 05 evaluate
    @property
    def eval_report(self) -> Path:
        return self.path / "eval.json"

    @property
    def eval_plot(self) -> Path:
        return self.path / "eval_metrics.png"

    @property
    def generations_html(self) -> Path:
        return self.path / "generations.html"

    @property
    def generations_markdown(self) -> Path:
        return self.path / "generations.md"

    @property
    def lm_eval_tasks_dir(self) -> Path:
        return self.path / "lm_eval_tasks"

    # 06 serve
    @property
    def merged_dir(self) -> Path:
        return self.path / "merged"

    @property
    def has_merged(self) -> bool:
        return (self.merged_dir / "config.json").is_file()  # transformers' file: the export is complete

    @property
    def merge_report(self) -> Path:
        return self.path / "merge.json"

    @property
    def gguf_dir(self) -> Path:  # the [gguf] extra's exports (serve/gguf.py)
        return self.path / "gguf"

    def gguf_file(self, gguf_type: str) -> Path:  # f16, q8_0, q4_k_m
        return self.gguf_dir / f"model-{gguf_type}.gguf"

    @property
    def modelfile(self) -> Path:  # Ollama's, beside the GGUF files it names
        return self.gguf_dir / "Modelfile"

    @property
    def export_report(self) -> Path:  # the export gate (serve/gate.py)
        return self.path / "export.json"

    @property
    def serve_commands_file(self) -> Path:
        return self.path / "serve_commands.md"

    @property
    def latency_report(self) -> Path:
        return self.path / "latency.json"

    @property
    def latency_plot(self) -> Path:
        return self.path / "latency.png"

    @property
    def serve_smoke_report(self) -> Path:
        return self.path / "serve_smoke.json"

    @property
    def serve_load_report(self) -> Path:  # written last by 06's checks
        return self.path / "serve_load.json"

    @property
    def server_logs_dir(self) -> Path:
        return self.path / "serve"

    def require(self, artifact: str) -> Path:
        """The path of `artifact` (a property name above), or an error naming the stage that writes it."""
        target = getattr(self, artifact)
        if not target.exists():
            stage = next((s for s in STAGES if artifact in s.writes), None)
            todo = (f"Run {stage.notebook} for this run first" if stage else "Run the stage that writes it first")
            raise MissingArtifact(f"{target} is missing. {todo} "
                                  f"(python -m qlora_helpers run --stages {stage.number if stage else '...'}).")
        return target


@dataclass(frozen=True)
class RunFolder(_Layout):
    """A run folder's paths without its config: for code that looks at a run another process is
    writing or has half written (a sweep deciding what to resume)."""

    path: Path


@dataclass(frozen=True)
class Runtime:
    """What stage 01 decided this run uses on this machine (`env.json`'s `runtime`)."""

    device: str                 # "cuda" or "cpu"
    compute_dtype: str          # torch dtype name: "bfloat16", "float16" or "float32"
    optimizer: str              # a transformers `optim` name, e.g. "paged_adamw_32bit", "adamw_torch"
    load_in_4bit: bool
    notes: tuple[str, ...] = field(default=())  # why a setting differs from what the config asked

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Runtime:
        return cls(device=data["device"], compute_dtype=data["compute_dtype"], optimizer=data["optimizer"],
                   load_in_4bit=data["load_in_4bit"], notes=tuple(data.get("notes", ())))

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "compute_dtype": self.compute_dtype, "optimizer": self.optimizer,
                "load_in_4bit": self.load_in_4bit, "notes": list(self.notes)}

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.compute_dtype)


@dataclass(frozen=True)
class Run(_Layout):
    name: str
    path: Path
    cfg: Config
    env: dict[str, Any]
    stage_overrides: tuple[str, ...] = ()  # the stage's own changes (eval.* in 05, serve.* in 06), for its report

    @property
    def runtime(self) -> Runtime:
        return Runtime.from_dict(self.env["runtime"])

    @property
    def device(self) -> str:
        return self.runtime.device

    @property
    def compute_dtype(self):
        """The torch dtype of compute (`runtime.compute_dtype` is its name)."""
        return self.runtime.torch_dtype


# --- the stage table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    number: str                 # "01" .. "06", also the notebook's prefix and `--stages` value
    notebook: str               # file name under notebooks/
    reads: tuple[str, ...]      # artifacts (RunFolder property names) of earlier stages it needs
    writes: tuple[str, ...]     # artifacts it writes, the report it writes last at the end
    entry: str | None           # "module:function" taking a Run, returning the report; None: notebook only
    reads_sources: bool = False  # reads the training data (data.sources) itself, not only 03's split

    @property
    def notebook_path(self) -> Path:
        return NOTEBOOK_DIR / self.notebook

    @property
    def report(self) -> str:
        """The artifact written last: its presence marks the stage done."""
        return self.writes[-1]

    def done(self, folder: _Layout) -> bool:
        return getattr(folder, self.report).is_file()

    def run(self, run: Run) -> dict[str, Any]:
        """Execute the stage on an open run without the notebook; returns (and has written) its report."""
        if self.number == "01":
            raise QLoraError("Stage 01 sets the run up: call runs.setup_run, not Stage.run.")
        if self.entry is None:
            raise QLoraError(f"Stage {self.number} runs as its notebook, notebooks/{self.notebook}: e.g. "
                             f"python -m qlora_helpers run --config <profile> --stages {self.number}.")
        for artifact in self.reads:
            run.require(artifact)
        module, function = self.entry.split(":")
        fn: Callable[[Run], dict[str, Any]] = getattr(importlib.import_module(module), function)
        return fn(run)


STAGES: tuple[Stage, ...] = (
    Stage("01", "01_setup.ipynb", (), ("config_file", "env_file"), None),
    Stage("02", "02_quantize.ipynb", ("config_file", "env_file"), ("quantization_report",), None,
          reads_sources=True),  # held-out pairs for perplexity
    Stage("03", "03_data_prep.ipynb", ("config_file", "env_file"), ("data_dir", "data_report"),
          "qlora_helpers.data:run_stage", reads_sources=True),
    Stage("04", "04_train.ipynb", ("config_file", "env_file", "data_report"),
          ("checkpoints_dir", "adapter_dir", "train_log"), "qlora_helpers.train:run_stage"),
    Stage("05", "05_evaluate.ipynb", ("config_file", "env_file", "data_report", "adapter_dir"),
          ("generations_html", "eval_report"), None),
    Stage("06", "06_serve.ipynb", ("config_file", "env_file", "adapter_dir"),
          ("merged_dir", "merge_report", "export_report", "latency_report", "serve_smoke_report",
           "serve_load_report"), None),
)


def stage(number: str | int) -> Stage:
    """The stage numbered `number` ("4", "04" or 4)."""
    key = f"{int(number):02d}" if str(number).strip().isdigit() else str(number)
    for s in STAGES:
        if s.number == key:
            return s
    raise QLoraError(f"Unknown stage {number!r}; stages: {', '.join(s.number for s in STAGES)}.")


# --- opening a run ------------------------------------------------------------------------------


# What a later stage may change for itself: its own section, which shapes nothing an earlier stage made.
STAGE_SECTIONS = {"05": "eval", "06": "serve"}


def setup_run(config: str, run_name: str, overrides: Iterable[str] = (),
              outputs_dir: str | None = None) -> Run:
    """Stage 01: validate the config, inspect the machine, write config.json and env.json. This is the
    one place a run's settings are chosen (notebook 01's parameters, or `--set` on the command line)."""
    cfg = load_config(config, list(overrides))
    folder = RunFolder(run_dir(run_name, outputs_dir))
    env = collect_environment()
    write_setup(folder.config_file, folder.env_file, cfg, env, plan_runtime(cfg, env))
    return open_run(run_name, outputs_dir)


def open_run(run_name: str, outputs_dir: str | None = None, overrides: Iterable[str] = (),
             stage: str | None = None) -> Run:
    """Stages 02-06: reopen a run set up by 01 by its name alone, with the settings 01 saved.

    `overrides` may change only `stage`'s own section (`eval.*` for "05", `serve.*` for "06"): they
    apply to this stage only and travel in `Run.stage_overrides` into its report. Any other change is
    an error naming the setting: it would make this stage disagree with what earlier stages made."""
    folder = RunFolder(run_dir(run_name, outputs_dir, create=False))
    saved = _saved_config(folder, run_name)
    overrides = [o.strip() for o in overrides if o.strip()]
    if not overrides:
        return Run(run_name, folder.path, saved, read_json(folder.env_file))
    asked = config_from_dict(apply_overrides(saved.to_dict(), overrides))
    section = STAGE_SECTIONS.get(str(stage).zfill(2) if stage is not None else "")
    changed = [c for c in config_differences(asked, saved) if section is None or not c.startswith(f"{section}.")]
    if changed:
        own = f" Only {section}.* settings can change in stage {stage}." if section else ""
        raise ConfigError(
            f"Run {run_name!r} was set up with different settings ({'; '.join(changed[:5])}).{own} "
            f"Set them in 01_setup (or `python -m qlora_helpers run --set KEY=VALUE`) for a new run "
            f"name, or rerun 01_setup for this one.")
    return Run(run_name, folder.path, asked, read_json(folder.env_file), tuple(overrides))


def open_run_folder(path: str | Path, overrides: Iterable[str] = ()) -> Run:
    """A finished run from its folder alone (`outputs/<run>`), as serving opens it; `overrides` may
    change `serve.*` settings only, since everything else shaped the adapter."""
    folder = RunFolder(Path(path).expanduser().resolve())
    overrides = list(overrides)
    bad = [o for o in overrides if not o.strip().startswith("serve.")]
    if bad:
        raise ConfigError(f"Only serve.* settings can change when serving a finished run; got {bad[0]!r}. "
                          f"Other settings belong to the run (set them in 01 and retrain).")
    _saved_config(folder, folder.path.name)  # the same error as open_run when 01 never ran
    cfg = config_from_dict(apply_overrides(read_json(folder.config_file), overrides))
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


def saved_config(folder: _Layout) -> Config | None:
    """The config a run folder was set up with, or None when 01 has not run there."""
    return config_from_dict(read_json(folder.config_file)) if folder.config_file.is_file() else None


def _saved_config(folder: _Layout, run_name: str) -> Config:
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
