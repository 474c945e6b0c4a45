"""Stage 02: what 4-bit quantization costs and saves, measured on the configured model.

Loads the model twice (full precision and 4-bit), then compares memory, per-layer weight error
(NF4 against FP4 on the same weights), one generation each, and held-out perplexity.
"""

from __future__ import annotations

import math
import statistics
import time
from statistics import NormalDist
from typing import Any

from tqdm.auto import tqdm

from .generation import generate
from .models import bnb_config, load_full_model, load_quantized_model, load_tokenizer, resolve_model
from .paths import write_json_atomic
from .prepared import heldout_pairs
from .prompts import encode_prompt, native_template
from .runs import Run
from .scoring import heldout_loss

SAMPLE_INSTRUCTION = "Give three tips for staying healthy."
# NF4 puts its outermost levels at the normal quantile 0.9677 (bitsandbytes' create_normal_map) and
# divides by it: in units of a block's absmax, normal weights then have this standard deviation.
NF4_SIGMA = 1 / NormalDist().inv_cdf(0.9677083)


def load_full_and_quantized(run: Run, quantization_config=None) -> dict[str, Any]:
    """The tokenizer, the full-precision model and the 4-bit model (loaded with `quantization_config`,
    the BitsAndBytesConfig notebook 02 builds in sight; `bnb_config` for the run when None), with
    their load times."""
    cfg = run.cfg
    resolved = resolve_model(cfg.model)
    tokenizer = load_tokenizer(cfg.model, resolved)
    quantization_config = quantization_config or bnb_config(cfg.quant, run.compute_dtype)
    t0 = time.perf_counter()
    full = load_full_model(cfg.model, run.compute_dtype, run.device, resolved)
    t1 = time.perf_counter()
    quant = load_quantized_model(cfg.model, quantization_config, run.device, resolved)
    t2 = time.perf_counter()
    return {"tokenizer": tokenizer, "full": full, "quantized": quant, "source": resolved.description,
            "load_seconds": {"full": t1 - t0, "quantized": t2 - t1}}


def _quant_state_bytes(state) -> int:
    size = state.absmax.numel() * state.absmax.element_size() + state.code.numel() * state.code.element_size()
    if getattr(state, "nested", False) and state.state2 is not None:
        size += _quant_state_bytes(state.state2)
    return size


def _linear_4bit_modules(model):
    import bitsandbytes as bnb

    return [(name, m) for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]


def memory_footprint(full, quantized) -> dict[str, Any]:
    """Whole-model and linear-weight bytes: 16-bit reference, the loaded full model, 4-bit."""
    full_modules = dict(full.named_modules())
    linear_full = linear_4bit = linear_params = 0
    for name, module in _linear_4bit_modules(quantized):
        weight = full_modules[name].weight
        linear_params += weight.numel()
        linear_full += weight.numel() * weight.element_size()
        linear_4bit += module.weight.numel() * module.weight.element_size()
        linear_4bit += _quant_state_bytes(module.weight.quant_state)
    n_params = sum(p.numel() for p in full.parameters())
    return {
        "parameters": n_params,
        "full_dtype": str(next(full.parameters()).dtype).replace("torch.", ""),
        "model_bytes": {"fp16_reference": n_params * 2, "full": full.get_memory_footprint(),
                        "4bit": quantized.get_memory_footprint()},
        "linear_weight_bytes": {"fp16_reference": linear_params * 2, "full": linear_full, "4bit": linear_4bit},
        "linear_bits_per_param": 8 * linear_4bit / linear_params,
        "linear_4bit_vs_full": linear_4bit / linear_full,
        "linear_4bit_vs_fp16": linear_4bit / (linear_params * 2),
        "quantized_layers": len(_linear_4bit_modules(quantized)),
    }


def layer_errors(full, quantized, double_quant: bool, blocksize: int = 64) -> list[dict[str, Any]]:
    """Relative Frobenius error ||W - deq(q(W))|| / ||W|| per quantized layer, for NF4 and FP4."""
    import bitsandbytes.functional as F
    import torch

    full_modules = dict(full.named_modules())
    rows = []
    for name, module in tqdm(_linear_4bit_modules(quantized), desc="per-layer error", leave=False):
        w = full_modules[name].weight.data.float()
        norm = w.norm().item()
        row = {"layer": name, "shape": list(w.shape)}
        loaded = F.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
        row[f"{module.weight.quant_type}_loaded"] = (loaded - w).norm().item() / norm
        for qt in ("nf4", "fp4"):
            packed, state = F.quantize_4bit(w.to(module.weight.data.device), blocksize=blocksize,
                                            quant_type=qt, compress_statistics=double_quant)
            deq = F.dequantize_4bit(packed, state).float()
            row[qt] = (deq - w).norm().item() / norm
        rows.append(row)
        del w
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


def quantization_levels() -> dict[str, list[float]]:
    """The 16 values each 4-bit code stands for, in units of its block's absmax, as bitsandbytes
    defines NF4 and FP4."""
    from bitsandbytes.functional import get_4bit_type

    return {qt: sorted(get_4bit_type(qt, device="cpu").tolist()) for qt in ("nf4", "fp4")}


def normal_mass_per_level(levels: list[float], sigma: float = NF4_SIGMA) -> list[float]:
    """Share of normally distributed (scaled) weights that round to each level: nearest level wins,
    so each level owns the interval between the midpoints to its neighbours."""
    cdf = NormalDist(0, sigma).cdf
    edges = [-math.inf, *((a + b) / 2 for a, b in zip(levels[:-1], levels[1:])), math.inf]
    return [cdf(b) - cdf(a) for a, b in zip(edges[:-1], edges[1:])]


def compare_generations(tokenizer, models: dict[str, Any], max_new_tokens: int,
                        instruction: str = SAMPLE_INSTRUCTION) -> dict[str, str]:
    """One greedy answer per model to the same instruction (chat template when the tokenizer has one)."""
    ids = encode_prompt(native_template(tokenizer), tokenizer, instruction)
    return {name: generate(model, tokenizer, [ids], max_new_tokens)[0] for name, model in models.items()}


def compare_perplexity(run: Run, tokenizer, models: dict[str, Any]) -> dict[str, Any]:
    """Held-out loss/perplexity of each model on the same examples from the eval split."""
    cfg = run.cfg
    pairs = heldout_pairs(run, cfg.eval.perplexity_samples, tokenizer)
    return {name: heldout_loss(model, tokenizer, pairs, cfg.eval.batch_size, cfg.model.max_seq_length,
                               desc=f"perplexity ({name})", template=run)
            for name, model in models.items()}


def summarize_errors(errors: list[dict[str, Any]]) -> dict[str, float]:
    return {f"{qt}_{stat}": fn([r[qt] for r in errors])
            for qt in ("nf4", "fp4") for stat, fn in (("mean", statistics.fmean), ("max", max))}


def write_quantization_report(run: Run, **sections: Any) -> dict[str, Any]:
    """Write `quantization.json` (the report 02 writes last): the given sections plus the error
    summary and the key ratio. Returns the report."""
    report = dict(sections)
    if "layer_errors" in report:
        report["layer_error_summary"] = summarize_errors(report["layer_errors"])
    if "perplexity" in report:
        ppl = report["perplexity"]
        report["perplexity_ratio_4bit_vs_full"] = ppl["4bit"]["perplexity"] / ppl["full"]["perplexity"]
    write_json_atomic(run.quantization_report, report)
    return report
