"""Scoring shared by the stages: held-out loss (02, 04, 05), ROUGE-L (05, the sweep) and the paired bootstrap that says
whether a base -> tuned difference is real (05, the sweep).

Imports: torch, numpy and rouge_score are imported inside the functions that use them (heavy; the unit tests of
the rest need neither).
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from tqdm.auto import tqdm

from .errors import DataError
from .prompts import encode_pairs


def collate(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, Any]:
    """Right-pad a batch; padding is marked by attention_mask = 0 and labels = -100."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    batch: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in examples:
        pad = width - len(e["input_ids"])
        batch["input_ids"].append(list(e["input_ids"]) + [pad_token_id] * pad)
        batch["attention_mask"].append([1] * len(e["input_ids"]) + [0] * pad)
        batch["labels"].append(list(e["labels"]) + [-100] * pad)
    return {k: torch.tensor(v) for k, v in batch.items()}


def heldout_loss(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int, max_length: int,
                 desc: str = "held-out loss", *, template: Any) -> dict[str, Any]:
    """Token-weighted mean negative log-likelihood of the responses given their prompts, the pairs
    tokenized as training tokenized them (`prompts.encode_pairs` with the run's `template`).

    Examples longer than `max_length` are skipped and counted, never cut silently.
    """
    import torch

    if not pairs:
        raise DataError("No held-out examples to score: the eval split is empty or the *_samples "
                        "setting that chose them is 0. Raise data.eval_size or that setting.")
    examples = encode_pairs(template, tokenizer, pairs)
    kept = [e for e in examples if len(e["input_ids"]) <= max_length]
    if not kept:
        raise DataError(f"All {len(examples)} held-out examples are longer than model.max_seq_length="
                        f"{max_length}; raise model.max_seq_length or check the data.")
    device = next(model.parameters()).device
    per_example: list[list[float]] = []
    was_training = model.training
    model.eval()  # no dropout while measuring
    with torch.no_grad():
        for start in tqdm(range(0, len(kept), batch_size), desc=desc, leave=False):
            batch = collate(kept[start:start + batch_size], tokenizer.pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=-100, reduction="none").view(labels.shape).sum(1)
            per_example += [[n, t] for n, t in zip(nll.tolist(), (labels != -100).sum(1).tolist())]
    model.train(was_training)
    total_nll, total_tokens = sum(n for n, _ in per_example), sum(t for _, t in per_example)
    loss = total_nll / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "examples": len(kept),
            "skipped_too_long": len(examples) - len(kept), "tokens": total_tokens,
            "per_example": per_example}  # [summed NLL, response tokens] of each scored example


# --- text overlap ----------------------------------------------------------------------------------


def rouge_l(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """Mean ROUGE-L F1 (rouge-score, Porter stemming) and the per-example scores."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return {"rougeL_f1": sum(scores) / len(scores) if scores else 0.0, "per_example": scores}


# --- is the difference real? ------------------------------------------------------------------------


def paired_bootstrap(base, tuned, weights=None, transform=None, resamples: int = 2000, seed: int = 0,
                     level: float = 0.95) -> dict[str, Any]:
    """Difference tuned - base of a (weighted) mean over the same examples, with a percentile
    bootstrap interval: each resample draws example indices with replacement and uses the same
    indices for both sides, so what the two models share per example cancels. `transform` maps each
    side's mean before the difference (exp: perplexity from mean loss). Seeded: reproducible."""
    import numpy as np

    b, t = np.asarray(base, dtype=float), np.asarray(tuned, dtype=float)
    if b.shape != t.shape or b.ndim != 1 or len(b) == 0:
        raise ValueError(f"paired_bootstrap needs two equally long, non-empty lists (got {len(b)} and {len(t)}).")
    w = np.ones_like(b) if weights is None else np.asarray(weights, dtype=float)
    f = np.vectorize(transform) if transform else (lambda x: x)

    def difference(idx):
        ww = w[idx]
        return f((t[idx] * ww).sum(-1) / ww.sum(-1)) - f((b[idx] * ww).sum(-1) / ww.sum(-1))

    idx = np.random.default_rng(seed).integers(0, len(b), size=(resamples, len(b)))
    low, high = np.quantile(difference(idx), [(1 - level) / 2, (1 + level) / 2])
    return {"difference": float(difference(np.arange(len(b)))), "low": float(low), "high": float(high),
            "level": level, "n": len(b), "resamples": resamples, "seed": seed,
            "distinguishable": bool(low > 0 or high < 0)}


def detectable_from_interval(r: dict[str, Any], power: float = 0.8) -> float:
    """The minimum detectable difference (two-sided at the interval's level, detected with probability
    `power`) with the standard error the bootstrap interval shows: se = width / (2 z_(1+level)/2), as
    `answers.detectable_difference` with the spread of the per-example differences."""
    z = statistics.NormalDist()
    z_level = z.inv_cdf((1 + r["level"]) / 2)
    return (z_level + z.inv_cdf(power)) * (r["high"] - r["low"]) / (2 * z_level)


def describe_difference(metric: str, r: dict[str, Any], lower_is_better: bool = False,
                        detectable: float | None = None) -> str:
    """One sentence: the difference, its interval, and whether it is distinguishable from zero; if not,
    the minimum detectable difference (80% power, two-sided 5%): `detectable`, the number the tables
    show, else estimated from the interval (`detectable_from_interval`)."""
    span = f"{r['difference']:+.4g} (95% interval {r['low']:+.4g} to {r['high']:+.4g}, {r['n']} paired examples)"
    if not r["distinguishable"] and r["low"] == r["high"]:
        return f"{metric}: tuned - base = {span}: no difference; the two models score alike on every example."
    if not r["distinguishable"]:
        smallest = detectable if detectable is not None else detectable_from_interval(r)
        return (f"{metric}: tuned - base = {span}: not distinguishable from zero; with this many examples "
                f"the smallest difference detected 80% of the time (two-sided 5%, the `detectable` column) "
                f"is about ±{smallest:.3g}.")
    better = (r["difference"] < 0) == lower_is_better
    return f"{metric}: tuned - base = {span}: distinguishable from zero, tuned is {'better' if better else 'worse'}."
