"""A run: one folder `outputs/<run>/` that every stage reads from and writes into.

This module owns the folder's layout: every file and folder a stage writes is a property of
`RunFolder` (a bare path, for code that inspects a run that may be half done, like a sweep resuming)
and so of `Run` (the folder with its validated config and environment). No other module spells a
run-folder file name. `STAGES` says, once, what each stage notebook reads and the file it writes last
(its report, which marks the stage done). Each stage's sequence is its notebook; 03 and 04, which the
`train` command also runs without notebooks, have an entry point (`run_stage(run) -> report`) over
the same functions the notebook's cells call.

Setting a run up (stage 01) and opening it again by name (02-06, serving) live in `opening.py`.

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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config
from .errors import QLoraError
from .paths import PROJECT_ROOT, read_json, write_json_atomic

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

    def require_adapter(self, final: bool = True) -> Path:
        """The final adapter (`final_adapter_dir`: what 05 evaluates and 06 serves), or with
        `final=False` the SFT adapter stage 04 wrote; an error saying to train first."""
        if not self.has_adapter:
            raise MissingArtifact(f"No adapter in {self.adapter_dir}. Run notebooks/04_train.ipynb for run "
                                  f"{self.path.name!r} first.")
        return self.final_adapter_dir if final else self.adapter_dir

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

    # 04b preference (only when the profile enables it: preference.enabled)
    @property
    def preference_adapter_dir(self) -> Path:
        return self.path / "adapter_preference"

    @property
    def has_preference_adapter(self) -> bool:
        return (self.preference_adapter_dir / "adapter_config.json").is_file()

    @property
    def preference_pairs(self) -> Path:  # the pairs trained on and held out, with where each came from
        return self.path / "preference_pairs.json"

    @property
    def preference_checkpoints_dir(self) -> Path:
        return self.path / "checkpoints_preference"

    @property
    def preference_plot(self) -> Path:
        return self.path / "preference_margins.png"

    @property
    def preference_report(self) -> Path:  # written last by 04b
        return self.path / "preference.json"

    @property
    def final_adapter_stage(self) -> str:
        """Which stage wrote the adapter that 05 evaluates and 06 serves: "04b" when the preference
        stage saved one after the SFT adapter was written (a retrained SFT adapter makes it stale), else "04"."""
        if self.has_preference_adapter and self.has_adapter:
            sft = (self.adapter_dir / "adapter_config.json").stat().st_mtime_ns
            if (self.preference_adapter_dir / "adapter_config.json").stat().st_mtime_ns >= sft:
                return "04b"
        return "04"

    @property
    def final_adapter_dir(self) -> Path:
        return self.preference_adapter_dir if self.final_adapter_stage == "04b" else self.adapter_dir

    @property
    def stages_file(self) -> Path:  # which stages ran here, when and for how long (runner, Stage.run)
        return self.path / "stages.json"

    # 05 evaluate
    @property
    def eval_report(self) -> Path:
        return self.path / "eval.json"

    @property
    def eval_plot(self) -> Path:
        return self.path / "eval_metrics.png"

    @property
    def answers_plot(self) -> Path:  # base vs tuned per answer metric, with the paired intervals
        return self.path / "eval_answers.png"

    @property
    def three_way_plot(self) -> Path:  # after 04b: base, SFT and SFT+DPO per answer metric, each step's interval
        return self.path / "eval_answers_three_way.png"

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

    def gguf_file(self, gguf_type: str) -> Path:  # one of config.GGUF_TYPES
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
    enabled_by: str | None = None  # a boolean config key ("preference.enabled"); None: always runs

    def applies(self, cfg: Config | None) -> bool:
        """Does this stage run for `cfg`? (None: a folder without config, every stage applies.)"""
        if self.enabled_by is None or cfg is None:
            return True
        section, key = self.enabled_by.split(".")
        return bool(getattr(getattr(cfg, section), key))

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
            raise QLoraError("Stage 01 sets the run up: call opening.setup_run, not Stage.run.")
        if self.entry is None:
            raise QLoraError(f"Stage {self.number} runs as its notebook, notebooks/{self.notebook}: e.g. "
                             f"python -m qlora_helpers run --config <profile> --stages {self.number}.")
        for artifact in self.reads:
            run.require(artifact)
        module, function = self.entry.split(":")
        fn: Callable[[Run], dict[str, Any]] = getattr(importlib.import_module(module), function)
        start = time.perf_counter()
        try:
            report = fn(run)
        except Exception as exc:
            record_stage(run, self, time.perf_counter() - start, f"{type(exc).__name__}: {exc}")
            raise
        record_stage(run, self, time.perf_counter() - start)
        return report


STAGES: tuple[Stage, ...] = (
    Stage("01", "01_setup.ipynb", (), ("config_file", "env_file"), None),
    Stage("02", "02_quantize.ipynb", ("config_file", "env_file"), ("quantization_report",), None,
          reads_sources=True),  # held-out pairs for perplexity
    Stage("03", "03_data_prep.ipynb", ("config_file", "env_file"), ("data_dir", "data_report"),
          "qlora_helpers.data:run_stage", reads_sources=True),
    Stage("04", "04_train.ipynb", ("config_file", "env_file", "data_report"),
          ("checkpoints_dir", "adapter_dir", "train_log"), "qlora_helpers.train:run_stage"),
    Stage("04b", "04b_preference.ipynb", ("config_file", "env_file", "data_report", "adapter_dir"),
          ("preference_adapter_dir", "preference_report"), "qlora_helpers.preference:run_stage",
          enabled_by="preference.enabled"),
    Stage("05", "05_evaluate.ipynb", ("config_file", "env_file", "data_report", "adapter_dir"),
          ("generations_html", "eval_report"), None),
    Stage("06", "06_serve.ipynb", ("config_file", "env_file", "adapter_dir"),
          ("merged_dir", "merge_report", "export_report", "latency_report", "serve_smoke_report",
           "serve_load_report"), None),
)


def record_stage(folder: _Layout, done: Stage, seconds: float, error: str | None = None) -> None:
    """Add a finished stage to the run's `stages.json` (latest entry per stage; the table's order). A
    stage that raised (`error`) is recorded as failed, replacing its earlier success: its outputs in
    the folder may be those of an earlier run of it, for other settings."""
    entries = read_json(folder.stages_file).get("stages", {}) if folder.stages_file.is_file() else {}
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    entries[done.number] = {"notebook": done.notebook, "seconds": round(seconds, 1),
                            **({"failed": now, "error": error[:500]} if error else {"finished": now})}
    order = [s.number for s in STAGES]
    entries = dict(sorted(entries.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    write_json_atomic(folder.stages_file, {"stages": entries, "final_adapter": folder.final_adapter_stage})


def stage_key(number: str | int) -> str:
    """A stage number as STAGES spells it: 4 -> "04", "4b" -> "04b"."""
    text = str(number).strip()
    digits = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    return f"{int(digits):02d}{text[len(digits):]}" if digits.isdigit() else text


def stage(number: str | int) -> Stage:
    """The stage numbered `number` ("4", "04" or 4; "4b" or "04b")."""
    key = stage_key(number)
    for s in STAGES:
        if s.number == key:
            return s
    raise QLoraError(f"Unknown stage {number!r}; stages: {', '.join(s.number for s in STAGES)}.")
