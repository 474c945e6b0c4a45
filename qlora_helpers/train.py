"""Stage 04: train LoRA adapters on the frozen 4-bit base (QLoRA), resumably, with guards.

Built on transformers' `Trainer` rather than TRL's `SFTTrainer`: stage 03 already hands over
tokenized examples with prompt labels masked, and, when packing, rows with a 4-D block-diagonal
mask. SFTTrainer's own packing (padding-free, position ids only) lets packed examples attend to
each other under sdpa, and would re-tokenize what 03 checked. Trainer brings what we would
otherwise write: gradient accumulation, schedules, paged optimizers, checkpoints with optimizer
and RNG state, resume, W&B, progress bars and accelerate (DDP) for several GPUs.

Imports: torch, transformers, peft, wandb, safetensors, matplotlib and IPython are imported inside
the functions that use them: heavy (seconds) or optional, and the config-mapping tests need none.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import fastpath
from .config import Config
from .data import PreparedData, collate, collate_packed, load_prepared, pack_examples
from .environment import is_interactive, wandb_mode
from .errors import QLoraError
from .fastpath import collate_flat
from .models import keep_4bit_on_autograd_path, load_model, load_tokenizer, resolve_model
from .paths import atomic_dir, write_json_atomic
from .runs import RunFolder, Runtime
from .scoring import heldout_loss

COMPLETE_MARKER = "checkpoint_complete.json"
OOM_ADVICE = (
    "Out of GPU memory. Lower, in this order: train.micro_batch_size (raise "
    "train.gradient_accumulation_steps to keep the batch), model.max_seq_length, keep "
    "train.gradient_checkpointing=true, and target fewer layers (lora.target_modules=[q_proj, v_proj]) "
    "or a smaller lora.r. Then rerun: train.resume=auto continues from the last checkpoint."
)


class NonFiniteLoss(QLoraError):
    """The training loss became NaN or infinite."""


class NotLearning(QLoraError):
    """The adapters get no usable gradient, or the optimizer does not move them."""


NOT_LEARNING_CHECKS = (
    "Check: bitsandbytes' version and CPU kernel (01's environment report; on AVX512-BF16 CPUs an eval "
    "pass can repack 4-bit layers into a layout without gradients), that lora.target_modules names "
    "layers the model has and that they are used in the forward pass, and train.learning_rate.")
# Relative change of all trainable weights after an optimizer step below which they "did not move":
# fp32 rounding is ~1e-7 relative; a real AdamW step at any usable learning rate is far above 1e-6.
MIN_RELATIVE_UPDATE = 1e-6


# --- model ----------------------------------------------------------------------------------------


def local_device(device: str) -> str:
    """cuda:<LOCAL_RANK> in each process of a multi-GPU (accelerate/torchrun) run, else `device`."""
    rank = os.environ.get("LOCAL_RANK")
    return f"cuda:{rank}" if device == "cuda" and rank is not None else device



def fsdp_active(cfg: Config) -> bool:
    """FSDP when the profile asks for it and accelerate started several processes."""
    return cfg.train.distributed == "fsdp" and int(os.environ.get("WORLD_SIZE", "1")) > 1


def check_fsdp_storage(cfg: Config, compute_dtype) -> None:
    """FSDP flattens each wrapped layer into one tensor of one float dtype: the packed 4-bit weights
    must be stored in the compute dtype too (bnb_4bit_quant_storage), or the layer cannot be sharded."""
    storage = cfg.quant.quant_storage
    dtype = str(compute_dtype).removeprefix("torch.")
    if cfg.quant.load_in_4bit and storage != dtype:
        raise QLoraError(f"train.distributed=fsdp with quant.quant_storage={storage}: FSDP shards only float "
                         f"tensors of one dtype per layer. Set quant.quant_storage={dtype} (the compute dtype), "
                         f"as configs/fsdp-qlora.yaml does.")


def load_trainable_model(cfg: Config, device: str, compute_dtype, base=None):
    """The base (4-bit or full precision) with fresh LoRA adapters, ready for training. On CUDA the
    fast path (qlora_helpers.fastpath) prepares the base; `model.qlora_fast_path` says what it did.
    Under FSDP the base loads without a device map and keeps one dtype (no fp32 upcasts), so that
    accelerate can shard it."""
    from peft import prepare_model_for_kbit_training


    fsdp = fsdp_active(cfg)
    if fsdp:
        import torch

        check_fsdp_storage(cfg, compute_dtype)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    model = base or load_model(cfg.model, cfg.quant, compute_dtype, None if fsdp else device,
                               resolved=resolve_model(cfg.model))
    if keep_4bit_on_autograd_path(model):  # a base that ran inference elsewhere first
        print("The 4-bit layers had been repacked for bitsandbytes' CPU inference kernel (no "
              "gradients); restored the trainable layout.")
    model.config.use_cache = False  # the KV cache is for generation; training recomputes
    gc_kwargs = {"use_reentrant": False}
    fast = None
    if fsdp:
        for p in model.parameters():
            p.requires_grad_(False)
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
            model.enable_input_require_grads()
    elif fastpath.fast_path_active(cfg.train, device):
        fast = fastpath.prepare_fast_model(model, cfg.train, device, cfg.lora.target_modules)
    elif cfg.quant.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    elif cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    peft_model = add_lora(model, cfg.lora, seed=cfg.train.seed)
    peft_model.qlora_fast_path = fast
    return peft_model


def add_lora(model, lora_cfg, seed: int | None = None):
    """Fresh adapters. LoRA's A matrices start random: with `seed` (train.seed) they are the same in
    every run, whatever drew random numbers before (notebook 04 builds the model in its own cell)."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    if seed is not None:
        set_seed(seed)

    lora = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                      target_modules=lora_cfg.target_modules, bias=lora_cfg.bias,
                      use_dora=lora_cfg.use_dora, use_rslora=lora_cfg.use_rslora, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def parameter_counts(model) -> dict[str, Any]:
    """Trainable against total weights (a packed 4-bit tensor holds two weights per element)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    return {"trainable": trainable, "total": total, "trainable_percent": 100 * trainable / total}


# --- data for the Trainer ------------------------------------------------------------------------


class _Rows:
    """A list of tokenized rows as the map-style dataset Trainer expects."""

    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


@dataclass
class Collator:
    pad_token_id: int
    packed: bool = False
    bool_mask: bool = True
    flat: bool = False  # the fast path: one unpadded row with the examples' boundaries

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if self.flat:

            return collate_flat(rows)
        if self.packed:
            return collate_packed(rows, self.pad_token_id, self.bool_mask)
        return collate(rows, self.pad_token_id)


def training_rows(cfg: Config, data: PreparedData, fast: bool = False) -> list[dict[str, Any]]:
    rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in data.train]
    if fast:
        if cfg.train.packed_tokens < cfg.model.max_seq_length:
            raise QLoraError(f"train.packed_tokens={cfg.train.packed_tokens} is below model.max_seq_length="
                             f"{cfg.model.max_seq_length}: the longest examples would not fit a micro-batch. "
                             f"Raise train.packed_tokens.")
        return pack_examples(rows, cfg.train.packed_tokens, seed=cfg.data.seed)
    if cfg.data.packing:
        return pack_examples(rows, cfg.model.max_seq_length, seed=cfg.data.seed)
    return rows


# --- trainer ---------------------------------------------------------------------------------------


def training_arguments(cfg: Config, folder: RunFolder, runtime: Runtime, report_to: list[str],
                       fast: bool = False):
    from transformers import TrainingArguments

    t = cfg.train
    dtype = runtime.compute_dtype
    args = TrainingArguments(
        output_dir=str(folder.checkpoints_dir),
        per_device_train_batch_size=1 if fast else t.micro_batch_size,  # fast: one packed row
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=math.ceil(t.warmup_ratio * t.max_steps) if t.max_steps > 0 else 0,
        max_steps=t.max_steps,
        num_train_epochs=t.num_epochs,
        max_grad_norm=t.max_grad_norm,
        weight_decay=t.weight_decay,
        optim=runtime.optimizer,
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        use_cpu=runtime.device == "cpu",
        train_sampling_strategy=("group_by_length" if t.group_by_length and not cfg.data.packing and not fast
                                 else "random"),
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # the NaN guard must see a NaN
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        save_only_model=False,
        eval_strategy="no",
        seed=t.seed,
        data_seed=t.seed,
        report_to=report_to,
        run_name=folder.path.name,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # frozen base: DDP need not search for unused weights
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    if args.world_size == 1 and args.n_gpu > 1:
        # One process trains on one GPU. Trainer would otherwise wrap the model in DataParallel over
        # every visible GPU (measured: the logged loss doubles on two H100s); several GPUs go
        # through --num-processes N (DDP) instead.
        args._n_gpu = 1
    return args


def _make_trainer_class():
    from transformers import Trainer, TrainerCallback

    class GuardedTrainer(Trainer):
        """Trainer that stops at the first non-finite loss, before it can be checkpointed."""

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            if not math.isfinite(loss.item()):
                raise NonFiniteLoss(
                    f"The training loss became {loss.item()} at step {self.state.global_step + 1}. "
                    f"Lower train.learning_rate, check the data for broken rows, or use float32 compute "
                    f"(quant.compute_dtype=float32). Checkpoints written before this step are intact.")
            return loss

        def _get_grad_norm(self, model, grad_norm=None):
            # Trainer computes the norm of all trainable gradients once per optimizer step (after
            # accumulation, unscaled under fp16); a zero norm means nothing can learn.
            norm = super()._get_grad_norm(model, grad_norm=grad_norm)
            value = float(norm)
            step = self.state.global_step + 1
            if value == 0.0:
                raise NotLearning(
                    f"The adapters got a zero gradient at optimizer step {step}: training would run but "
                    f"learn nothing. {NOT_LEARNING_CHECKS}")
            if not math.isfinite(value) and not self.args.fp16:  # fp16's loss scaler skips such steps
                raise NonFiniteLoss(
                    f"The gradient norm became {value} at optimizer step {step}. Lower "
                    f"train.learning_rate, check the data for broken rows, or use float32 compute "
                    f"(quant.compute_dtype=float32). Checkpoints written before this step are intact.")
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
            import torch

            if self.start is None or self.lr <= 0:
                return
            params = {n: p for n, p in model.named_parameters() if n in self.start}
            moved = torch.sqrt(sum(((params[n].detach().float() - w.float()) ** 2).sum() for n, w in self.start.items()))
            size = torch.sqrt(sum((w.float() ** 2).sum() for w in self.start.values()))
            if moved > MIN_RELATIVE_UPDATE * max(float(size), 1e-12):
                self.start = None  # checked once: free the copy
                return
            self.idle_steps += 1
            if self.idle_steps >= (10 if args.fp16 else 1):
                raise NotLearning(
                    f"The adapters have not moved after {state.global_step} optimizer step(s) at learning "
                    f"rate {self.lr:g} (relative change {float(moved) / max(float(size), 1e-12):.1e}). "
                    f"{NOT_LEARNING_CHECKS}")

    class FiniteWeightsGuard(TrainerCallback):
        """After each optimizer step, before any checkpoint of it: the adapters must be finite
        (one huge step can poison the weights while the loss that caused it still looked fine)."""

        def on_step_end(self, args, state, control, model=None, **kwargs):
            import torch

            bad = [n for n, p in model.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
            if bad:
                raise NonFiniteLoss(
                    f"The adapter weights became NaN or infinite at step {state.global_step} ({bad[0]}"
                    f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}). Lower train.learning_rate, "
                    f"keep train.max_grad_norm > 0, or use float32 compute (quant.compute_dtype=float32). "
                    f"Checkpoints written before this step are intact.")

    class MarkCompleteCallback(TrainerCallback):
        """Marks a checkpoint complete once everything in it is written; drops Trainer's pickle of
        its arguments (training_args.bin), which resume does not need."""

        def on_save(self, args, state, control, **kwargs):
            if not state.is_world_process_zero:
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (folder / "training_args.bin").unlink(missing_ok=True)
            write_json_atomic(folder / COMPLETE_MARKER, {"step": state.global_step, "time": time.time()})

    return GuardedTrainer, MarkCompleteCallback, FiniteWeightsGuard, AdaptersMoveGuard


def last_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest checkpoint whose save finished; half-written ones (a crash mid-save) are skipped."""
    if not checkpoint_dir.is_dir():
        return None
    done = [p for p in checkpoint_dir.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def resolve_resume(cfg: Config, folder: RunFolder) -> str | None:
    setting = cfg.train.resume
    if setting == "never":
        return None
    if setting == "auto":
        found = last_complete_checkpoint(folder.checkpoints_dir)
        return str(found) if found else None
    path = Path(setting).expanduser()
    if not (path / COMPLETE_MARKER).is_file():
        raise QLoraError(f"train.resume={setting!r} is not a complete checkpoint folder "
                         f"(no {COMPLETE_MARKER}). Use 'auto', 'never' or a checkpoint-N folder.")
    return str(path)


def configure_wandb(cfg: Config, folder: RunFolder) -> list[str]:
    """report_to for the Trainer; W&B writes under the run folder, offline unless told otherwise."""
    mode = wandb_mode(cfg.train.wandb)
    if mode == "disabled":
        return []
    try:
        import wandb  # noqa: F401
    except ImportError:
        print("wandb is not installed: logging to the run folder only.")
        return []
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_PROJECT", "qlora-notebooks")
    os.environ["WANDB_DIR"] = str(folder.wandb_dir)
    os.environ.setdefault("WANDB_SILENT", "true")
    if cfg.train.wandb_group:
        os.environ["WANDB_RUN_GROUP"] = cfg.train.wandb_group  # wandb.init reads it
    return ["wandb"]


def wandb_config_callback(run):
    """Logs the resolved config and the environment report into the W&B run Trainer started."""
    from transformers import TrainerCallback

    class LogRunConfig(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            try:
                import wandb
            except ImportError:
                return
            if wandb.run is not None:
                env = {k: v for k, v in run.env.items() if k != "hf_auth"}
                wandb.config.update({"qlora": run.cfg.to_dict(), "environment": env}, allow_val_change=True)
                sweep = run.sweep_info_file  # written by a sweep: its name, tag and swept values
                if sweep.is_file():
                    wandb.config.update({"sweep": json.loads(sweep.read_text())}, allow_val_change=True)

    return LogRunConfig()


def _progress_callbacks(trainer) -> None:
    """Plain tqdm in headless runs (papermill logs); Trainer's notebook table when interactive."""
    from transformers.trainer_callback import ProgressCallback

    if not is_interactive():
        try:
            from transformers.utils.notebook import NotebookProgressCallback

            trainer.remove_callback(NotebookProgressCallback)
        except ImportError:
            pass
        if not any(isinstance(cb, ProgressCallback) for cb in trainer.callback_handler.callbacks):
            trainer.add_callback(ProgressCallback)


def live_loss_callback():
    """A callback that redraws the loss curve in the notebook at every log (interactive only)."""
    from transformers import TrainerCallback

    class LiveLoss(TrainerCallback):
        def __init__(self):
            self.handle = None

        def on_log(self, args, state, control, logs=None, **kwargs):
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

    return [LiveLoss()] if is_interactive() else []


def build_trainer(run, data: PreparedData, model, tokenizer, extra_callbacks=()):
    GuardedTrainer, MarkCompleteCallback, FiniteWeightsGuard, AdaptersMoveGuard = _make_trainer_class()
    cfg = run.cfg
    fast = getattr(model, "qlora_fast_path", None) is not None
    report_to = configure_wandb(cfg, run)
    args = training_arguments(cfg, run, run.runtime, report_to, fast=fast)
    trainer = GuardedTrainer(
        model=model, args=args, train_dataset=_Rows(training_rows(cfg, data, fast=fast)),
        data_collator=Collator(tokenizer.pad_token_id, packed=cfg.data.packing,
                               bool_mask=cfg.model.attn_implementation != "eager", flat=fast),
        callbacks=[FiniteWeightsGuard(), *([] if fsdp_active(cfg) else [AdaptersMoveGuard()]),
                   MarkCompleteCallback(), *live_loss_callback(), *extra_callbacks,
                   *([wandb_config_callback(run)] if report_to else [])],
    )
    _progress_callbacks(trainer)
    return trainer


def heldout_eval_loss(run, model, tokenizer, data: PreparedData) -> float:
    """Token-weighted held-out loss on the first train.eval_samples eval examples (as stages 02/05)."""
    pairs = data.eval_pairs()[:run.cfg.train.eval_samples]
    return heldout_loss(model, tokenizer, pairs, run.cfg.eval.batch_size, run.cfg.model.max_seq_length,
                        desc="held-out loss", template=run)["loss"]


def train_adapter(run, data: PreparedData, model=None, tokenizer=None, extra_callbacks=()) -> dict[str, Any]:
    """Train, guard, checkpoint, resume; save the adapter atomically; return the results."""
    import torch


    cfg = run.cfg
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    model = model or load_trainable_model(cfg, local_device(run.device), run.compute_dtype)
    trainer = build_trainer(run, data, model, tokenizer, extra_callbacks)
    resume = resolve_resume(cfg, run)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # measure training, not model loading or building
    # Under FSDP the weights end up sharded across processes: the held-out loss is left to stage 05,
    # which loads the saved adapter whole; so it is with train.eval_samples: 0.
    evaluate = not fsdp_active(cfg) and cfg.train.eval_samples > 0
    base_loss = heldout_eval_loss(run, model, tokenizer, data) if resume is None and evaluate else None
    keep_4bit_on_autograd_path(model)  # whatever ran before, the 4-bit layers must pass gradients
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    except KeyboardInterrupt:
        trainer._save_checkpoint(trainer.model, trial=None)  # Trainer's own full checkpoint
        trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)  # marks it complete
        raise QLoraError(f"Training interrupted at step {trainer.state.global_step}; a checkpoint was "
                         f"saved. Run again with train.resume=auto to continue.") from None
    except torch.cuda.OutOfMemoryError:
        raise QLoraError(OOM_ADVICE) from None
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start  # all threads; unlike wall time, not slowed by other users
    tuned_loss = heldout_eval_loss(run, trainer.model, tokenizer, data) if evaluate else None
    history = list(trainer.state.log_history)
    if base_loss is not None:
        history.insert(0, {"step": 0, "heldout_loss": base_loss})
    if tuned_loss is not None:
        history.append({"step": trainer.state.global_step, "heldout_loss": tuned_loss})
    summary = {
        "steps": trainer.state.global_step, "resumed_from": resume, "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,
        "train_loss": result.training_loss,
        "final_logged_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
        "heldout_loss_base": base_loss, "heldout_loss_tuned": tuned_loss,
        "eval_examples": min(cfg.train.eval_samples, len(data.eval)) if evaluate else 0, "parameters": parameter_counts(trainer.model),
        "trained_tokens": _trained_tokens(trainer), "device": run.device,
        "compute_dtype": run.runtime.compute_dtype, "optimizer": run.runtime.optimizer,
        "fast_path": getattr(trainer.model, "qlora_fast_path", None),
    }
    summary["trained_tokens_per_second"] = summary["trained_tokens"] / seconds if seconds else None
    if torch.cuda.is_available():
        summary["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    state_dict = None
    if trainer.is_fsdp_enabled:  # gather the sharded adapter from every process (a collective)
        state_dict = gather_fsdp_adapter(trainer)
    summary.update(peak_memory())
    if trainer.is_world_process_zero():
        summary["processes"] = trainer.args.world_size
        summary["distributed"] = "fsdp" if trainer.is_fsdp_enabled else ("ddp" if trainer.args.world_size > 1 else None)
        save_adapter(run, trainer.model, tokenizer, summary, state_dict)
        write_json_atomic(run.train_log, {"summary": summary, "log_history": history})
    return {"summary": summary, "log_history": history, "trainer": trainer}


def run_stage(run) -> dict[str, Any]:
    """Stage 04's entry point (CLI, accelerate workers): train on the sets 03 saved; the adapter and
    `train_log.json` (written last) are the stage's outputs. Returns the summary."""
    return train_adapter(run, load_prepared(run))["summary"]


def peak_memory() -> dict[str, Any]:
    """On CUDA the peak tensor memory of training; elsewhere the peak resident memory of this whole
    process (model loading included), since the CPU has no per-phase counter. The kind says which."""
    import torch

    if torch.cuda.is_available():
        return {"peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20, "peak_memory_kind": "cuda_max_allocated"}
    try:
        import resource
    except ImportError:  # Windows
        return {"peak_memory_mib": None, "peak_memory_kind": None}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_memory_mib": rss / (2**20 if sys.platform == "darwin" else 2**10), "peak_memory_kind": "process_max_rss"}


def _trained_tokens(trainer) -> int:
    """Tokens with a label in the batches this run consumed (an estimate when resumed)."""
    rows = trainer.train_dataset.rows
    per_row = sum(sum(1 for x in r["labels"] if x != -100) for r in rows) / max(len(rows), 1)
    args = trainer.args
    seen = (trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
            * args.world_size)
    return int(per_row * seen)


def gather_fsdp_adapter(trainer) -> dict[str, Any]:
    """Every process unshards the weights together; rank 0 copies the adapter tensors to the CPU,
    named as peft names them (the wrappers' name parts removed). An empty result is an error: an
    adapter file without weights must never be written."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    wrappers = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
    state: dict[str, Any] = {}
    wrapped = trainer.model_wrapped
    with FSDP.summon_full_params(wrapped, writeback=False, rank0_only=True, offload_to_cpu=True):
        if trainer.is_world_process_zero():
            for name, param in wrapped.named_parameters():
                if "lora_" in name:
                    for w in wrappers:
                        name = name.replace(w, "")
                    state[name] = param.detach().clone()
    if trainer.is_world_process_zero():
        if not state:
            raise QLoraError("FSDP: no adapter weights could be gathered from the sharded model; the adapter "
                             "was not written. The last complete checkpoint under checkpoints/ holds the run.")
        print(f"FSDP: gathered {len(state)} adapter tensors (e.g. {next(iter(state))})")
    return state


def save_adapter(run, model, tokenizer, summary: dict[str, Any], state_dict=None) -> Path:
    """outputs/<run>/adapter/: safetensors weights, adapter config, tokenizer, config, model card.
    Written to a temporary folder and renamed, so a crash never leaves half an adapter. Under FSDP
    `state_dict` holds the adapter tensors gathered from all processes."""
    final = run.adapter_dir
    with atomic_dir(final) as tmp:
        if state_dict is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:  # FSDP: peft's own save matches weights to the (wrapped) modules; write its layout directly
            from safetensors.torch import save_file

            weights = {k.replace(".default.", "."): v.contiguous() for k, v in state_dict.items()}
            save_file(weights, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
            model.peft_config["default"].save_pretrained(str(tmp))
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "qlora_config.json", run.cfg.to_dict())
        (tmp / "README.md").write_text(model_card(run, summary), encoding="utf-8")
    return final


def model_card(run, summary: dict[str, Any]) -> str:
    cfg = run.cfg
    sources = ", ".join(s.path for s in cfg.data.sources)
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    return f"""---
library_name: peft
base_model: {cfg.model.source}
tags: [qlora, lora, peft]
---
# QLoRA adapter: {run.name}

LoRA adapter trained with qlora-notebooks on a {'4-bit ' + cfg.quant.quant_type.upper() if cfg.quant.load_in_4bit else 'full-precision'} base.

- Base model: `{cfg.model.source}`
- Data: {sources} (template: {cfg.data.template}, loss on {'all tokens' if cfg.data.train_on_prompt else 'responses only'}, packing: {cfg.data.packing})
- LoRA: r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout}, targets={cfg.lora.target_modules}, DoRA={cfg.lora.use_dora}, rsLoRA={cfg.lora.use_rslora}
- Training: {summary['steps']} steps, micro-batch {cfg.train.micro_batch_size} x {cfg.train.gradient_accumulation_steps} accumulation, lr {cfg.train.learning_rate} ({cfg.train.lr_scheduler}), optimizer {summary['optimizer']}, compute {summary['compute_dtype']} on {summary['device']}, seed {cfg.train.seed}
- Trainable parameters: {summary['parameters']['trainable']:,} ({summary['parameters']['trainable_percent']:.3f}% of {summary['parameters']['total']:,})

| | loss |
|---|---|
| training (mean over the run) | {fmt(summary['train_loss'])} |
| last logged training loss | {fmt(summary['final_logged_loss'])} |
| held-out, base model | {fmt(summary['heldout_loss_base'])} |
| held-out, with this adapter | {fmt(summary['heldout_loss_tuned'])} |

Held-out: {f"the first {summary['eval_examples']} examples of the eval split (never trained on)" if summary['eval_examples'] else "not measured during training (stage 05 measures it)"}.
Load with `PeftModel.from_pretrained(base, "<this folder>")`; the full resolved configuration is in
`qlora_config.json`.
"""
