"""Stage 04: train LoRA adapters on the frozen 4-bit base (QLoRA), resumably, with guards.

Built on transformers' `Trainer` rather than TRL's `SFTTrainer`: stage 03 already hands over
tokenized examples with prompt labels masked, and, when packing, rows with a 4-D block-diagonal
mask. SFTTrainer's own packing (padding-free, position ids only) lets packed examples attend to
each other under sdpa, and would re-tokenize what 03 checked. Trainer brings what we would
otherwise write: gradient accumulation, schedules, paged optimizers, checkpoints with optimizer
and RNG state, resume, W&B, progress bars and accelerate (DDP) for several GPUs.

Notebook 04 makes the core calls in its cells, in this order: `load_model` (02's BitsAndBytesConfig),
`prepare_model_for_kbit_training`, `LoraConfig` + `get_peft_model`, `TrainingArguments` +
`GuardedTrainer` (qlora_helpers.trainer), then `train_adapter`. `load_trainable_model` and
`build_trainer` make the same calls for the CLI, sweeps and benchmarks; tests/test_train.py runs
the notebook's cells and these helpers on one config and requires the same objects.

Imports: peft, wandb and safetensors are imported inside the functions that use them (optional, or
only needed on one path).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainingArguments

from . import fastpath, plan
from .adapter import gather_fsdp_adapter, save_adapter
from .batching import collate_packed, pack_examples
from .config import Config
from .environment import wandb_mode
from .errors import QLoraError
from .fastpath import collate_flat
from .models import keep_4bit_on_autograd_path, load_model, load_tokenizer, resolve_model
from .paths import write_json_atomic
from .prepared import PreparedData, load_prepared
from .runs import RunFolder, Runtime
from .scoring import collate, heldout_loss
from .trainer import (  # noqa: F401
    COMPLETE_MARKER,
    NOT_LEARNING_CHECKS,
    GuardedTrainer,
    NonFiniteLoss,
    NotLearning,
    last_complete_checkpoint,
    local_device,
    peak_memory,
    resolve_checkpoint,
    train_or_checkpoint,
    training_callbacks,
)

OOM_ADVICE = (
    "Out of GPU memory. Lower, in this order: train.micro_batch_size (raise "
    "train.gradient_accumulation_steps to keep the batch), model.max_seq_length, keep "
    "train.gradient_checkpointing=true, and target fewer layers (lora.target_modules=[q_proj, v_proj]) "
    "or a smaller lora.r. Then rerun: train.resume=auto continues from the last checkpoint."
)
GC_KWARGS = {"use_reentrant": False}  # non-reentrant checkpointing: works with frozen inputs and LoRA


# --- model ----------------------------------------------------------------------------------------


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


def kbit_preparation(cfg: Config, device: str) -> bool:
    """Whether the base goes through peft's `prepare_model_for_kbit_training` (QLoRA's own recipe):
    a 4-bit base on the plain path. CUDA's fast path and FSDP prepare it their own way (`prepare_base`)."""
    return cfg.quant.load_in_4bit and not fsdp_active(cfg) and not fastpath.fast_path_active(cfg.train, device)


def adapter_state_bytes(cfg: Config, model) -> int:
    """The LoRA weights, gradients and optimizer states still to come (plan.adapter_bytes), which the fast
    path's recomputation plan counts beside the base; 0 for a config without the LLaMA family's sizes."""
    try:
        shape = plan.shape_from_config(model.config.to_dict())
    except KeyError:
        return 0
    return sum(plan.adapter_bytes(cfg, shape).values())


def prepare_base(cfg: Config, model, device: str):
    """(model, fast_path): the loaded base made ready for adapters. A 4-bit base on the plain path gets
    `prepare_model_for_kbit_training` exactly as notebook 04 calls it; FSDP keeps one dtype and no
    upcasts (accelerate shards it); CUDA's fast path packs rows and fuses kernels (`fast_path` says
    what it did); a full-precision base only freezes and checkpoints."""
    from peft import prepare_model_for_kbit_training

    if keep_4bit_on_autograd_path(model):  # a base that ran inference elsewhere first
        print("The 4-bit layers had been repacked for bitsandbytes' CPU inference kernel (no "
              "gradients); restored the trainable layout.")
    if kbit_preparation(cfg, device):
        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.train.gradient_checkpointing,
                                               gradient_checkpointing_kwargs=GC_KWARGS), None
    if fastpath.fast_path_active(cfg.train, device) and not fsdp_active(cfg):
        return model, fastpath.prepare_fast_model(model, cfg.train, device, cfg.lora.target_modules,
                                                  adapter_state_bytes(cfg, model), cfg.lora.dropout)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=GC_KWARGS)
        model.enable_input_require_grads()
    return model, None


def lora_config(lora_cfg):
    """The LoraConfig of the `lora` section (notebook 04 builds the same in sight)."""
    from peft import LoraConfig

    return LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                      target_modules=lora_cfg.target_modules, bias=lora_cfg.bias,
                      use_dora=lora_cfg.use_dora, use_rslora=lora_cfg.use_rslora, task_type="CAUSAL_LM")


def add_lora(model, config, seed: int | None = None):
    """Fresh adapters (`config`: a LoraConfig, or the `lora` section). LoRA's A matrices start random:
    with `seed` (train.seed) they are the same in every run, whatever drew random numbers before."""
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    if not isinstance(config, LoraConfig):
        config = lora_config(config)
    if seed is not None:
        set_seed(seed)
    return get_peft_model(model, config)


def load_trainable_model(cfg: Config, device: str, compute_dtype, base=None):
    """The base (4-bit or full precision) with fresh LoRA adapters, ready for training: notebook 04's
    calls in its order. `model.qlora_fast_path` says what CUDA's fast path did (None: plain path).
    Under FSDP the base loads without a device map, so that accelerate can shard it."""
    fsdp = fsdp_active(cfg)
    if fsdp:
        check_fsdp_storage(cfg, compute_dtype)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    model = base or load_model(cfg.model, cfg.quant, compute_dtype, None if fsdp else device,
                               resolved=resolve_model(cfg.model))
    model, fast = prepare_base(cfg, model, device)
    peft_model = add_lora(model, lora_config(cfg.lora), seed=cfg.train.seed)
    peft_model.qlora_fast_path = fast
    return peft_model


def parameter_counts(model) -> dict[str, Any]:
    """Trainable against total weights (a packed 4-bit tensor holds two weights per element)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    return {"trainable": trainable, "total": total, "trainable_percent": 100 * trainable / total}


# --- data for the Trainer ------------------------------------------------------------------------


class Rows:
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
        plan.check_packed_tokens(cfg)
        return pack_examples(rows, cfg.train.packed_tokens, seed=cfg.data.seed)
    if cfg.data.packing:
        return pack_examples(rows, cfg.model.max_seq_length, seed=cfg.data.seed)
    return rows


def training_dataset(cfg: Config, data: PreparedData, fast: bool = False) -> Rows:
    """03's training examples as the Trainer's dataset: as they are, packed (data.packing), or in
    the fast path's long rows."""
    return Rows(training_rows(cfg, data, fast=fast))


def make_collator(cfg: Config, tokenizer, fast: bool = False) -> Collator:
    """Batches of rows: padded, packed with a block-diagonal mask, or the fast path's one flat row."""
    return Collator(tokenizer.pad_token_id, packed=cfg.data.packing,
                    bool_mask=cfg.model.attn_implementation != "eager", flat=fast)


# --- trainer ---------------------------------------------------------------------------------------


def warmup_steps(train_cfg) -> int:
    """train.warmup_ratio of train.max_steps (0 when training by epochs)."""
    return math.ceil(train_cfg.warmup_ratio * train_cfg.max_steps) if train_cfg.max_steps > 0 else 0


def trainer_plumbing(cfg: Config, folder: RunFolder, runtime: Runtime, report_to: list[str],
                     fast: bool = False) -> dict[str, Any]:
    """TrainingArguments that are bookkeeping rather than the recipe: logging, checkpoints, seeds,
    W&B, the CPU, evaluation batch size (notebook 04 spells the recipe's arguments out beside them)."""
    t = cfg.train
    return dict(
        per_device_eval_batch_size=cfg.eval.batch_size,
        weight_decay=t.weight_decay,
        use_cpu=runtime.device == "cpu",
        train_sampling_strategy=("group_by_length" if t.group_by_length and not cfg.data.packing and not fast
                                 else "random"),
        logging_steps=t.logging_steps,
        logging_nan_inf_filter=False,  # the NaN guard must see a NaN
        save_strategy="steps", save_steps=t.save_steps, save_total_limit=t.save_total_limit,
        save_only_model=False,
        eval_strategy="no",
        seed=t.seed, data_seed=t.seed,
        report_to=report_to, run_name=folder.path.name,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,  # frozen base: DDP need not search for unused weights
        dataloader_num_workers=0,
        disable_tqdm=False,
    )


def training_arguments(cfg: Config, folder: RunFolder, runtime: Runtime, report_to: list[str],
                       fast: bool = False) -> TrainingArguments:
    """The TrainingArguments notebook 04 builds in sight, for the CLI and sweeps."""
    t = cfg.train
    return TrainingArguments(
        output_dir=str(folder.checkpoints_dir),
        per_device_train_batch_size=1 if fast else t.micro_batch_size,  # fast: one packed row
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=warmup_steps(t),
        max_steps=t.max_steps,
        num_train_epochs=t.num_epochs,
        max_grad_norm=t.max_grad_norm,
        optim=runtime.optimizer,
        bf16=runtime.compute_dtype == "bfloat16",
        fp16=runtime.compute_dtype == "float16",
        **trainer_plumbing(cfg, folder, runtime, report_to, fast),
    )


def resolve_resume(cfg: Config, folder: RunFolder) -> str | None:
    return resolve_checkpoint(cfg.train.resume, folder.checkpoints_dir, "train.resume")


def configure_wandb(cfg: Config, folder: RunFolder) -> list[str]:
    """report_to for the Trainer; W&B writes under the run folder, offline unless told otherwise."""
    mode = wandb_mode(cfg.train.wandb)
    if mode == "disabled":
        return []
    try:
        import wandb  # noqa: F401  (optional)
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


def build_trainer(run, data: PreparedData, model, tokenizer, extra_callbacks=()) -> GuardedTrainer:
    """The Trainer as notebook 04 builds it, for the CLI, sweeps and benchmarks."""
    cfg = run.cfg
    fast_path = getattr(model, "qlora_fast_path", None)
    fast = fast_path is not None
    args = training_arguments(cfg, run, run.runtime, configure_wandb(cfg, run), fast=fast)
    return GuardedTrainer(model=model, args=args, train_dataset=training_dataset(cfg, data, fast),
                          data_collator=make_collator(cfg, tokenizer, fast), fast_path=fast_path,
                          callbacks=[*training_callbacks(run, args, distributed=fsdp_active(cfg)),
                                     *extra_callbacks])


def heldout_eval_loss(run, model, tokenizer, data: PreparedData) -> float:
    """Token-weighted held-out loss on the first train.eval_samples eval examples (as stages 02/05)."""
    pairs = data.eval_pairs()[:run.cfg.train.eval_samples]
    return heldout_loss(model, tokenizer, pairs, run.cfg.eval.batch_size, run.cfg.model.max_seq_length,
                        desc="held-out loss", template=run)["loss"]


def _fit(trainer, resume: str | None):
    """trainer.train, with an interrupt saved as a complete checkpoint and OOM explained."""
    try:
        return train_or_checkpoint(trainer, resume, "Training", "Run again with train.resume=auto to continue.",
                                   "train.resume")
    except torch.cuda.OutOfMemoryError:
        raise QLoraError(OOM_ADVICE) from None


def train_adapter(run, data: PreparedData, model=None, tokenizer=None, extra_callbacks=(),
                  trainer=None) -> dict[str, Any]:
    """Train (`trainer`: the one notebook 04 built; else `build_trainer`), guard, checkpoint, resume;
    save the adapter atomically; return the results."""
    cfg = run.cfg
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    if trainer is None:
        model = model or load_trainable_model(cfg, local_device(run.device), run.compute_dtype)
        trainer = build_trainer(run, data, model, tokenizer, extra_callbacks)
    resume = resolve_resume(cfg, run)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # measure training, not model loading or building
    # Under FSDP the weights end up sharded across processes: the held-out loss is left to stage 05,
    # which loads the saved adapter whole; so it is with train.eval_samples: 0.
    evaluate = not fsdp_active(cfg) and cfg.train.eval_samples > 0
    base_loss = heldout_eval_loss(run, trainer.model, tokenizer, data) if resume is None and evaluate else None
    keep_4bit_on_autograd_path(trainer.model)  # whatever ran before, the 4-bit layers must pass gradients
    start, cpu_start = time.perf_counter(), time.process_time()
    result = _fit(trainer, resume)
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start  # all threads; unlike wall time, not slowed by other users
    tuned_loss = heldout_eval_loss(run, trainer.model, tokenizer, data) if evaluate else None
    history = list(trainer.state.log_history)
    if base_loss is not None:
        history.insert(0, {"step": 0, "heldout_loss": base_loss})
    if tuned_loss is not None:
        history.append({"step": trainer.state.global_step, "heldout_loss": tuned_loss})
    summary = _summary(run, trainer, result, history, resume, (seconds, cpu_seconds), (base_loss, tuned_loss),
                       len(data.eval) if evaluate else 0)
    state_dict = gather_fsdp_adapter(trainer) if trainer.is_fsdp_enabled else None  # a collective
    summary.update(peak_memory())
    if trainer.is_world_process_zero():
        summary["processes"] = trainer.args.world_size
        summary["distributed"] = ("fsdp" if trainer.is_fsdp_enabled
                                  else "ddp" if trainer.args.world_size > 1 else None)
        save_adapter(run, trainer.model, tokenizer, summary, state_dict)
        write_json_atomic(run.train_log, {"summary": summary, "log_history": history})
    return {"summary": summary, "log_history": history, "trainer": trainer}


def _summary(run, trainer, result, history, resume, times, heldout, eval_rows: int) -> dict[str, Any]:
    """train_log.json's summary: what ran, how long, the losses, the tokens, the machine."""
    cfg = run.cfg
    (seconds, cpu_seconds), (base, tuned) = times, heldout
    summary = {
        "steps": trainer.state.global_step, "resumed_from": resume, "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,
        "train_loss": result.training_loss,
        "final_logged_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
        "heldout_loss_base": base, "heldout_loss_tuned": tuned,
        "eval_examples": min(cfg.train.eval_samples, eval_rows),
        "parameters": parameter_counts(trainer.model),
        "trained_tokens": _trained_tokens(trainer), "device": run.device,
        "compute_dtype": run.runtime.compute_dtype, "optimizer": run.runtime.optimizer,
        "fast_path": getattr(trainer, "fast_path", None),
    }
    summary["trained_tokens_per_second"] = summary["trained_tokens"] / seconds if seconds else None
    if torch.cuda.is_available():
        summary["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return summary


def run_stage(run) -> dict[str, Any]:
    """Stage 04's entry point (CLI, accelerate workers): train on the sets 03 saved; the adapter and
    `train_log.json` (written last) are the stage's outputs. Returns the summary."""
    tokenizer = load_tokenizer(run.cfg.model)
    return train_adapter(run, load_prepared(run, tokenizer), tokenizer=tokenizer)["summary"]


def _trained_tokens(trainer) -> int:
    """Tokens with a label in the batches this run consumed (an estimate when resumed)."""
    rows = trainer.train_dataset.rows
    per_row = sum(sum(1 for x in r["labels"] if x != -100) for r in rows) / max(len(rows), 1)
    args = trainer.args
    seen = (trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
            * args.world_size)
    return int(per_row * seen)
