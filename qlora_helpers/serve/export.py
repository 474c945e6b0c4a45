"""Export: de-quantize the 4-bit base, merge the adapter, check the merge, write what vLLM and TGI load.

peft's own `merge_and_unload` on a 4-bit model re-quantizes the merged weights (lossy); merging into
the de-quantized weights keeps exactly what base + adapter computes, which `merge_and_export`
checks on a few probe texts (relative to the logits' scale) before and after saving.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from ..errors import QLoraError
from ..models import load_model, load_tokenizer, load_tuned_model, resolve_model
from ..paths import atomic_dir, read_json, sha256_file, write_json_atomic, write_text_atomic
from ..runs import Run
from .run import adapter_dir, context_length, model_name, say

# The merged model must compute what base + adapter computes, in the run's compute dtype. In fp32 the
# reordered sums move logits by ~1e-6 of their scale, a wrong merge by ~1e-1: the bound sits between.
# In 16-bit compute the merged weights (de-quantized base + B@A) are themselves rounded to 8 (bf16) or
# 11 (fp16) mantissa bits, which the adapter path never does: 1.15e-2 of the scale on an H100 for a
# LLaMA-2-7B shape in bf16 (BENCHMARKS.md), so bf16 gets 3e-2, fp16 (8x finer) 1e-2.
MERGE_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}  # max |merged - adapter| / max |adapter logit|
# Saved in 16 bits, each weight is rounded to 8 (bf16) or 11 (fp16) mantissa bits: ~1e-2 of the scale.
EXPORT_TOLERANCE = 5e-2

PROBE_TEXTS = ["Below is an instruction that describes a task. Write a short poem about the sea.",
               "The capital of France is", "def add(a, b):\n    return"]


# --- merge and export ---------------------------------------------------------------------------


def merge_adapter(run: Run):
    """(merged model in the compute dtype, tokenizer): notebook 06's de-quantize-then-merge, for the CLI.

    peft's own `merge_and_unload` on a 4-bit model re-quantizes the merged weights (lossy); merging
    into the de-quantized weights keeps exactly what base + adapter computes.
    """
    from peft import PeftModel

    adapter = adapter_dir(run)
    tokenizer = load_tokenizer(run.cfg.model)
    base = load_model(run.cfg.model, run.cfg.quant, run.compute_dtype, run.device)
    if run.cfg.quant.load_in_4bit:
        base = base.dequantize(dtype=run.compute_dtype)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    merged.eval()
    return merged, tokenizer


def probe_logits(model, tokenizer, texts: list[str] = PROBE_TEXTS):
    """Logits of a few texts (one by one, no padding), stacked into one float32 CPU tensor."""
    import torch

    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text, return_tensors="pt").to(device)
            out.append(model(**ids).logits[0].float().cpu())
    return torch.cat(out)


def logit_gap(a, b, bound: float) -> dict[str, float | bool]:
    """How far logits `a` are from the reference `b`, relative to the reference's scale, and
    whether that is within `bound`."""
    diff = (a - b).abs()
    scale = float(b.abs().max()) or 1.0
    relative = float(diff.max()) / scale
    return {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()), "logit_scale": scale,
            "max_relative": relative, "bound": bound, "within_bound": relative <= bound,
            "same_argmax": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def merge_tolerance(dtype) -> float:
    """The merge check's bound for a compute dtype (torch.dtype or its name)."""
    return MERGE_TOLERANCE[str(dtype).removeprefix("torch.")]


def merge_and_export(run: Run, merged=None) -> dict[str, Any]:
    """Check the merged model (`merged`: the one notebook 06 built; else `merge_adapter`) against base +
    adapter on probe texts, save 16-bit safetensors to `outputs/<run>/merged/`, reload it and check
    again; write `merge.json` and `serve_commands.md`."""
    import torch

    start = time.perf_counter()
    tuned, tokenizer = load_tuned_model(run)
    reference = probe_logits(tuned, tokenizer)
    del tuned
    if merged is None:
        merged, _ = merge_adapter(run)
    merged.eval()
    bound = merge_tolerance(run.compute_dtype)
    in_memory = logit_gap(probe_logits(merged, tokenizer), reference, bound)
    if not in_memory["within_bound"]:
        raise QLoraError(f"The merged model does not compute what base + adapter computes: logits "
                         f"differ by {in_memory['max_relative']:.2e} of their scale (bound {bound:g} in "
                         f"{run.runtime.compute_dtype}). Serve with serve.form=adapter and report this.")
    folder = run.merged_dir
    export_dtype = getattr(torch, run.cfg.serve.export_dtype)
    merged.to(export_dtype)
    with atomic_dir(folder) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    del merged
    gc.collect()
    reloaded = load_merged(run)
    exported = logit_gap(probe_logits(reloaded, tokenizer), reference, EXPORT_TOLERANCE)
    del reloaded
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    report = {"merged_dir": str(folder), "adapter_dir": str(adapter_dir(run)),
              "adapter_sha256": adapter_fingerprint(adapter_dir(run)),  # what merged_staleness compares
              "export_dtype": run.cfg.serve.export_dtype, "compute_dtype": str(run.compute_dtype),
              "probe_tokens": int(reference.shape[0]),
              "merged_vs_adapter_logits": in_memory, "exported_vs_adapter_logits": exported,
              "files": files, "merged_mib": round(sum(files.values()) / 2**20, 1),
              "seconds": round(time.perf_counter() - start, 1),
              "overrides": list(getattr(run, "stage_overrides", ()))}  # 06's own serve.* changes
    write_json_atomic(run.merge_report, report)
    write_text_atomic(run.serve_commands_file, export_commands(run))
    return report


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")  # peft's


def adapter_fingerprint(folder: Path) -> dict[str, str]:
    """sha256 of each of peft's adapter files in `folder` (a copied run keeps it; mtimes it does not)."""
    out = {}
    for name in ADAPTER_FILES:
        if (folder / name).is_file():
            out[name] = sha256_file(folder / name)
    return out


def merged_staleness(run: Run) -> str | None:
    """Why merged/ no longer holds the adapter the run serves (None: it does, or there is no merged/).
    merge.json names the adapter folder it was made from and, since it records them, its files' sha256;
    an older merge.json without them is compared by modification time."""
    if not run.has_merged:
        return None
    served = adapter_dir(run)
    if not run.merge_report.is_file():
        return f"{run.merge_report.name} is missing, so nothing says which adapter merged/ was made from"
    report = read_json(run.merge_report)
    made_from = Path(str(report.get("adapter_dir", ""))).name  # by name: a copied run moves the paths
    if made_from != served.name:
        why = " (04b wrote it after the SFT adapter)" if served == run.preference_adapter_dir else ""
        return f"merged/ was made from {made_from or 'an unnamed adapter'}/, but the run serves {served.name}/{why}"
    if report.get("export_dtype", run.cfg.serve.export_dtype) != run.cfg.serve.export_dtype:
        return (f"merged/ was saved in {report['export_dtype']}, and serve.export_dtype is now "
                f"{run.cfg.serve.export_dtype}")
    if "adapter_sha256" in report:
        if report["adapter_sha256"] != adapter_fingerprint(served):
            return f"{served.name}/ changed since merged/ was made from it (retrained)"
        return None
    newest = max((served / n).stat().st_mtime for n in ADAPTER_FILES if (served / n).is_file())
    if newest > (run.merged_dir / "config.json").stat().st_mtime:
        return f"{served.name}/ is newer than merged/ (retrained after the merge)"
    return None


def ensure_merged(run: Run) -> dict[str, Any] | None:
    """merged/ for the adapter the run serves: merged when missing or stale (saying why, as 06 merges
    anyway), else reused (saying so). Returns merge_and_export's report when it merged."""
    stale = merged_staleness(run)  # None also when there is no merged/
    if run.has_merged and stale is None:
        say(f"reusing {run.merged_dir} (merged from {adapter_dir(run).name}/, which has not changed since)")
        return None
    why = f"merged/ is stale: {stale}" if stale else f"no merged model in {run.merged_dir}"
    say(f"merging {adapter_dir(run).name}/ into the de-quantized base ({why}); this loads the model twice "
        f"and checks the merge")
    report = merge_and_export(run)
    say(f"merged in {report['seconds']:.0f} s: {run.merged_dir} ({report['merged_mib']:,.0f} MiB)")
    return report


def load_merged(run: Run):
    """The exported 16-bit model, loaded in the compute dtype on the run's device."""
    from transformers import AutoModelForCausalLM

    folder = run.merged_dir
    if not run.has_merged:
        raise QLoraError(f"No merged model in {folder}: run merge_and_export (06_serve) first.")
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=run.compute_dtype, device_map={"": run.device},
        attn_implementation=run.cfg.model.attn_implementation)
    model.eval()
    return model


def base_location(run: Run) -> str:
    """The full-precision base a LoRA-serving engine needs next to the adapter (folder or hub id)."""
    return resolve_model(run.cfg.model).location


def export_commands(run: Run) -> str:
    """Markdown with the exact vLLM and TGI commands for the merged folder and the adapter folder."""
    name, ctx = model_name(run), context_length(run)
    merged, adapter = run.merged_dir, run.adapter_dir
    rank = max(8, run.cfg.lora.r)
    return f"""# Serving run {run.name} at scale

Merged 16-bit model (`{merged}`): an ordinary transformers folder (config.json, model.safetensors,
tokenizer). Adapter (`{adapter}`): peft's layout (adapter_config.json, adapter_model.safetensors).

## vLLM (OpenAI-compatible server on port 8000)

```bash
# merged weights
vllm serve {merged} --served-model-name {name} --max-model-len {ctx} --dtype {run.cfg.serve.export_dtype}
# full-precision base + the LoRA adapter (switchable per request with "model": "{name}")
vllm serve {base_location(run)} --enable-lora --lora-modules {name}={adapter} \\
    --max-lora-rank {rank} --max-model-len {ctx}
```

## Text Generation Inference (Docker, port 8080)

```bash
docker run --gpus all --shm-size 1g -p 8080:80 -v {run.path}:/data \\
    ghcr.io/huggingface/text-generation-inference:latest --model-id /data/merged
```

The adapter was trained against the 4-bit base; served on the 16-bit base its outputs differ
slightly from `python -m qlora_helpers serve` with serve.form=adapter (the QLoRA paper's caveat).
"""


# --- choosing and loading what to serve -----------------------------------------------------------


def estimate_merged_bytes(run: Run) -> int:
    """Bytes the merged model needs in the compute dtype (counted on empty weights, nothing loaded)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_model(run.cfg.model).location)
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in empty.parameters())
    return n * run.compute_dtype.itemsize


def free_memory_bytes(device: str) -> int:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available
