"""The adapter folder stage 04 writes (`outputs/<run>/adapter/`): peft's safetensors and config, the
tokenizer, the resolved config and a model card, written atomically; under FSDP, the adapter gathered
from every process first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import QLoraError
from .paths import atomic_dir, write_json_atomic


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
    """The adapter's README.md: Hugging Face's model-card header, what was trained on what, the losses."""
    cfg = run.cfg
    lora, t = cfg.lora, cfg.train
    sources = ", ".join(s.path for s in cfg.data.sources)
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    base = f"4-bit {cfg.quant.quant_type.upper()}" if cfg.quant.load_in_4bit else "full-precision"
    params = summary["parameters"]
    heldout = (f"the first {summary['eval_examples']} examples of the eval split (never trained on)"
               if summary["eval_examples"] else "not measured during training (stage 05 measures it)")
    return f"""---
library_name: peft
base_model: {cfg.model.source}
tags: [qlora, lora, peft]
---
# QLoRA adapter: {run.name}

LoRA adapter trained with qlora-notebooks on a {base} base.

- Base model: `{cfg.model.source}`
- Data: {sources} (template: {cfg.data.template}, loss on \
{'all tokens' if cfg.data.train_on_prompt else 'responses only'}, packing: {cfg.data.packing})
- LoRA: r={lora.r}, alpha={lora.alpha}, dropout={lora.dropout}, targets={lora.target_modules}, \
DoRA={lora.use_dora}, rsLoRA={lora.use_rslora}
- Training: {summary['steps']} steps, micro-batch {t.micro_batch_size} x {t.gradient_accumulation_steps} \
accumulation, lr {t.learning_rate} ({t.lr_scheduler}), optimizer {summary['optimizer']}, compute \
{summary['compute_dtype']} on {summary['device']}, seed {t.seed}
- Trainable parameters: {params['trainable']:,} ({params['trainable_percent']:.3f}% of {params['total']:,})

| | loss |
|---|---|
| training (mean over the run) | {fmt(summary['train_loss'])} |
| last logged training loss | {fmt(summary['final_logged_loss'])} |
| held-out, base model | {fmt(summary['heldout_loss_base'])} |
| held-out, with this adapter | {fmt(summary['heldout_loss_tuned'])} |

Held-out: {heldout}.
Load with `PeftModel.from_pretrained(base, "<this folder>")`; the full resolved configuration is in
`qlora_config.json`.
"""
