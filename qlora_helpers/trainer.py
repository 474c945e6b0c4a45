"""Stage 04's Trainer and its callbacks: the guards that stop a run that cannot learn, the marker
that makes a checkpoint resumable, the live loss curve, W&B's copy of the run's settings.

Notebook 04 builds `GuardedTrainer(model=..., args=..., callbacks=training_callbacks(run, args))` in
sight; `train.build_trainer` (the CLI, sweeps, benchmarks) makes the same call. Each guard is its own
class, so a reader finds one rule per class. The guards' errors, the device of each process and the
peak memory are shared with stage 04b (preference.py), which trains through TRL's trainer instead.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import ProgressCallback

from .environment import is_interactive
from .errors import QLoraError
from .paths import write_json_atomic

COMPLETE_MARKER = "checkpoint_complete.json"
NOT_LEARNING_CHECKS = (
    "Check: bitsandbytes' version and CPU kernel (01's environment report; on AVX512-BF16 CPUs an eval "
    "pass can repack 4-bit layers into a layout without gradients), that lora.target_modules names "
    "layers the model has and that they are used in the forward pass, and train.learning_rate.")
NON_FINITE_ADVICE = ("Lower train.learning_rate, check the data for broken rows, or use float32 compute "
                     "(quant.compute_dtype=float32). Checkpoints written before this step are intact.")
# Relative change of all trainable weights after an optimizer step below which they "did not move":
# fp32 rounding is ~1e-7 relative; a real AdamW step at any usable learning rate is far above 1e-6.
MIN_RELATIVE_UPDATE = 1e-6


class NonFiniteLoss(QLoraError):
    """The training loss became NaN or infinite."""


class NotLearning(QLoraError):
    """The adapters get no usable gradient, or the optimizer does not move them."""


def local_device(device: str) -> str:
    """cuda:<LOCAL_RANK> in each process of a multi-GPU (accelerate/torchrun) run, else `device`."""
    rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{rank}" if device == "cuda" and rank is not None else device


def peak_memory() -> dict[str, Any]:
    """On CUDA the peak tensor memory of training; elsewhere the peak resident memory of this whole
    process (model loading included), since the CPU has no per-phase counter. The kind says which."""
    if torch.cuda.is_available():
        return {"peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20, "peak_memory_kind": "cuda_max_allocated"}
    try:
        import resource
    except ImportError:  # Windows
        return {"peak_memory_mib": None, "peak_memory_kind": None}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    mib = rss / (2**20 if sys.platform == "darwin" else 2**10)
    return {"peak_memory_mib": mib, "peak_memory_kind": "process_max_rss"}


class GuardedTrainer(Trainer):
    """transformers' Trainer that stops at the first non-finite loss or zero gradient, before it can
    be checkpointed. `fast_path`: what qlora_helpers.fastpath did to the base (None: the plain path)."""

    def __init__(self, model=None, args=None, *rest, fast_path: dict | None = None, **kwargs):
        if args is not None and args.world_size == 1 and args.n_gpu > 1:
            # One process trains on one GPU. Trainer would otherwise wrap the model in DataParallel over
            # every visible GPU (measured: the logged loss doubles on two H100s); several GPUs go
            # through --num-processes N (DDP) instead.
            args._n_gpu = 1
        model.config.use_cache = False  # the KV cache is for generation; training recomputes
        super().__init__(model, args, *rest, **kwargs)
        self.fast_path = fast_path
        _progress_callbacks(self)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not math.isfinite(loss.item()):
            raise NonFiniteLoss(f"The training loss became {loss.item()} at step {self.state.global_step + 1}. "
                                f"{NON_FINITE_ADVICE}")
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # Trainer computes the norm of all trainable gradients once per optimizer step (after
        # accumulation, unscaled under fp16); a zero norm means nothing can learn.
        norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        value = float(norm)
        step = self.state.global_step + 1
        if value == 0.0:
            raise NotLearning(f"The adapters got a zero gradient at optimizer step {step}: training would run "
                              f"but learn nothing. {NOT_LEARNING_CHECKS}")
        if not math.isfinite(value) and not self.args.fp16:  # fp16's loss scaler skips such steps
            raise NonFiniteLoss(f"The gradient norm became {value} at optimizer step {step}. {NON_FINITE_ADVICE}")
        return norm


class AdaptersMoveGuard(TrainerCallback):
    """After the first optimizer steps with a learning rate above zero, the adapters must have
    moved (fp16's loss scaler may skip a few early steps, so it gets more patience)."""

    def __init__(self):
        self.start = None
        self.idle_steps = 0
        self.lr = 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.lr = max(group["lr"] for group in optimizer.param_groups) if optimizer else 0.0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.start is None or self.lr <= 0:
            return
        params = {n: p for n, p in model.named_parameters() if n in self.start}
        moved = torch.sqrt(sum(((params[n].detach().float() - w.float()) ** 2).sum() for n, w in self.start.items()))
        size = max(float(torch.sqrt(sum((w.float() ** 2).sum() for w in self.start.values()))), 1e-12)
        if moved > MIN_RELATIVE_UPDATE * size:
            self.start = None  # checked once: free the copy
            return
        self.idle_steps += 1
        if self.idle_steps >= (10 if args.fp16 else 1):
            raise NotLearning(
                f"The adapters have not moved after {state.global_step} optimizer step(s) at learning "
                f"rate {self.lr:g} (relative change {float(moved) / size:.1e}). {NOT_LEARNING_CHECKS}")


class FiniteWeightsGuard(TrainerCallback):
    """After each optimizer step, before any checkpoint of it: the adapters must be finite
    (one huge step can poison the weights while the loss that caused it still looked fine)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLoss(
                f"The adapter weights became NaN or infinite at step {state.global_step} ({bad[0]}"
                f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}). Lower train.learning_rate, "
                f"keep train.max_grad_norm > 0, or use float32 compute (quant.compute_dtype=float32). "
                f"Checkpoints written before this step are intact.")


class MarkComplete(TrainerCallback):
    """Marks a checkpoint complete once everything in it is written; drops Trainer's pickle of
    its arguments (training_args.bin), which resume does not need."""

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        (folder / "training_args.bin").unlink(missing_ok=True)
        write_json_atomic(folder / COMPLETE_MARKER, {"step": state.global_step, "time": time.time()})


def last_complete_checkpoint(checkpoint_dir: Path, newer_than_ns: int = 0) -> Path | None:
    """The newest checkpoint whose save finished (half-written ones, a crash mid-save, are skipped) among
    those completed at or after `newer_than_ns` (a file time: 04b's must follow the SFT adapter they tuned)."""
    if not checkpoint_dir.is_dir():
        return None
    done = [p for p in checkpoint_dir.glob("checkpoint-*")
            if (p / COMPLETE_MARKER).is_file() and (p / COMPLETE_MARKER).stat().st_mtime_ns >= newer_than_ns]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def resolve_checkpoint(setting: str, checkpoint_dir: Path, key: str, newer_than_ns: int = 0) -> str | None:
    """What a resume setting (`key`: train.resume, preference.resume) names: 'auto' the newest complete
    checkpoint in `checkpoint_dir` (`last_complete_checkpoint`), 'never' none, else that checkpoint folder."""
    if setting == "never":
        return None
    if setting == "auto":
        found = last_complete_checkpoint(checkpoint_dir, newer_than_ns)
        return str(found) if found else None
    path = Path(setting).expanduser()
    if not (path / COMPLETE_MARKER).is_file():
        raise QLoraError(f"{key}={setting!r} is not a complete checkpoint folder "
                         f"(no {COMPLETE_MARKER}). Use 'auto', 'never' or a checkpoint-N folder.")
    return str(path)


def checkpoint_step(checkpoint: str) -> int:
    """The optimizer steps a checkpoint holds (its trainer_state.json's global_step)."""
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("global_step", 0)


def resume_notice(resume: str, step: int, max_steps: int, what: str, setting: str, sharded: bool = False) -> str:
    """The line a resumed run prints: from which checkpoint and step; when that checkpoint (at `step`)
    already reached `max_steps`, that nothing is left to train (its adapter is the result) and how to train
    again. `sharded` (FSDP, DeepSpeed): the weights load inside trainer.train, which then trains one more step."""
    if step < max_steps:
        return f"{what} resumes from {resume} at step {step} of {max_steps} ({setting}=auto)."
    result = ("nothing is left to train, and the adapter saved is that checkpoint's" if not sharded else
              f"under FSDP or DeepSpeed its sharded weights load inside trainer.train, which trains one more "
              f"step (step {step + 1}); the adapter as the checkpoint holds it is in {resume}")
    return (f"{what} resumes from {resume}, which already reached step {step} of {max_steps}: {result}. To train "
            f"again from the start, set {setting}=never or delete {Path(resume).parent}.")


def train_or_checkpoint(trainer, resume: str | None, what: str, again: str, setting: str):
    """trainer.train from checkpoint `resume` (saying so: `resume_notice`, `setting` the resume key); a
    checkpoint that already reached max_steps is the result as it is (`finished_checkpoint`). Ctrl-C saves
    the Trainer's own full checkpoint, marks it complete (MarkComplete) and stops with an error: `what`
    interrupted at step N, then `again`."""
    if resume:
        step, sharded = checkpoint_step(resume), trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
        print(resume_notice(resume, step, trainer.args.max_steps, what, setting, sharded), flush=True)
        if step >= trainer.args.max_steps and not sharded:
            return finished_checkpoint(trainer, resume)
    try:
        return trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        trainer._save_checkpoint(trainer.model, trial=None)  # Trainer's own full checkpoint
        trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)  # marks it complete
        raise QLoraError(f"{what} interrupted at step {trainer.state.global_step}; a checkpoint was "
                         f"saved. {again}") from None


def finished_checkpoint(trainer, resume: str):
    """A checkpoint that already reached max_steps, taken as the result without trainer.train: on such a
    resume transformers trains one step past max_steps (a checkpoint-41 of a 40-step run), because its loop
    skips the batches already seen and steps before it checks the count. The model gets the checkpoint's
    weights as trainer.train would load them, and the trainer its state (steps, log history); nothing is
    trained, so there is no mean training loss (None)."""
    from transformers.trainer_callback import TrainerState
    from transformers.trainer_utils import TrainOutput

    trainer._load_from_checkpoint(resume)
    trainer.state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
    return TrainOutput(trainer.state.global_step, None, {})


class LogRunConfig(TrainerCallback):
    """Logs the resolved config and the environment report into the W&B run Trainer started."""

    def __init__(self, run):
        self.run = run

    def on_train_begin(self, args, state, control, **kwargs):
        try:
            import wandb  # optional: only with the W&B extra
        except ImportError:
            return
        if wandb.run is not None:
            env = {k: v for k, v in self.run.env.items() if k != "hf_auth"}
            wandb.config.update({"qlora": self.run.cfg.to_dict(), "environment": env}, allow_val_change=True)
            sweep = self.run.sweep_info_file  # written by a sweep: its name, tag and swept values
            if sweep.is_file():
                wandb.config.update({"sweep": json.loads(sweep.read_text())}, allow_val_change=True)


class LiveLoss(TrainerCallback):
    """Redraws the loss curve in the notebook at every log (interactive sessions only)."""

    def __init__(self):
        self.handle = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        # matplotlib and IPython only where a person watches: headless runs never import them here
        import matplotlib.pyplot as plt
        from IPython.display import display

        from .plots import plot_training

        if not any("loss" in h for h in state.log_history):
            return
        fig = plot_training(state.log_history, only_loss=True)
        if self.handle is None:
            self.handle = display(fig, display_id=True)
        else:
            self.handle.update(fig)
        plt.close(fig)


def training_callbacks(run, args, distributed: bool = False) -> list[TrainerCallback]:
    """The guards, the checkpoint marker, the live curve when a person watches, W&B's config log
    when `args.report_to` has W&B. Under FSDP (`distributed`) each process holds a shard only, so the
    adapters-move guard, which compares whole weights, is left out."""
    return [FiniteWeightsGuard(), *([] if distributed else [AdaptersMoveGuard()]), MarkComplete(),
            *([LiveLoss()] if is_interactive() else []),
            *([LogRunConfig(run)] if "wandb" in (args.report_to or []) else [])]


def _progress_callbacks(trainer: Trainer) -> None:
    """Plain tqdm in headless runs (papermill logs); Trainer's notebook table when interactive."""
    if is_interactive():
        return
    try:
        from transformers.utils.notebook import NotebookProgressCallback

        trainer.remove_callback(NotebookProgressCallback)
    except ImportError:  # transformers without its notebook helpers
        pass
    if not any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks):
        trainer.add_callback(ProgressCallback)
