"""What a learner sees in the answers, base against tuned, on the same held-out instructions.

Per answer: does it stop cleanly (EOS before the token budget), how much does it repeat itself (the
share of its word 3-grams that already occurred in it), how long is it against the reference, its
ROUGE-L against the reference, and, on the built-in data (builtin_data.py), whether its final answer
is exactly right. Each metric is a mean over examples, and each base -> tuned difference comes with a
paired bootstrap interval (the same examples on both sides) and the smallest difference that many
examples can detect (`detectable_difference`).

`run_answers` is the evaluation task: it generates once per model (adapter off, then on) with
`decoding.generate_answers` (finished rows leave the batch, de-quantized weights on the CPU) and
scores every metric from those two sets of answers. Decoding is greedy with no repetition penalty:
the metrics show the model, not a decoding trick.
"""

from __future__ import annotations

import math
import random
import re
import statistics
import time
from typing import Any

from .builtin_data import exact_match
from .decoding import Answer, generate_answers
from .prepared import load_prepared
from .prompts import encode_text
from .scoring import describe_difference, paired_bootstrap, rouge_l

_WORD = re.compile(r"\w+")

# metric: (what it means, lower is better); the order of the report's rows
METRICS = {
    "clean stop": ("share of answers that end with EOS before the token budget", False),
    "repetition": ("share of an answer's word 3-grams that repeat an earlier one in it", True),
    "length gap": ("|log2((answer words + 1) / (reference words + 1))|: 0 = the reference's length", True),
    "ROUGE-L F1": ("longest common subsequence with the reference (rouge-score, stemmed)", False),
    "exact match": ("final answer equals the reference's (built-in data only)", False),
}


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def repetition(text: str, n: int = 3) -> float:
    """Share of the word n-grams of `text` that repeat an n-gram seen earlier in it (0: none repeats;
    an answer of fewer than n words repeats nothing). "a b c a b c" has 4 3-grams, 1 repeated."""
    w = words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def length_gap(answer: str, reference: str) -> float:
    """How far an answer's length is from the reference's, in doublings: |log2((a + 1) / (r + 1))| words."""
    return abs(math.log2((len(words(answer)) + 1) / (len(words(reference)) + 1)))


def detectable_difference(n: int, sd: float = 1.0, level: float = 0.95, power: float = 0.8) -> float:
    """The smallest base -> tuned difference of a mean that `n` paired examples detect (interval
    excluding 0) with probability `power`, when the per-example differences have standard deviation
    `sd`: (z_(1+level)/2 + z_power) * sd / sqrt(n). For a share (clean stops, exact match) the
    differences are -1, 0 or 1, so sd <= 1: 64 examples detect 0.35 at worst; sd 0.5 (a quarter of the
    examples change) gives 0.175."""
    if n < 1:
        raise ValueError(f"detectable_difference needs n >= 1 (got {n}).")
    z = statistics.NormalDist()
    return (z.inv_cdf((1 + level) / 2) + z.inv_cdf(power)) * sd / math.sqrt(n)


def paired_detectable(base: list[float], tuned: list[float]) -> float | None:
    """`detectable_difference` for these pairs, with the observed spread of their differences (None
    when every pair differs alike): the one minimum detectable difference the tables and verdicts give."""
    spread = statistics.pstdev([y - x for x, y in zip(base, tuned)]) if len(base) > 1 else 0.0
    return detectable_difference(len(base), spread) if spread else None


def per_example(answers: list[Answer], references: list[str], checked: list[bool]) -> dict[str, list[float]]:
    """Each metric's value for each answer; exact match over the examples marked `checked` only."""
    values = {"clean stop": [float(a.stopped) for a in answers],
              "repetition": [repetition(a.text) for a in answers],
              "length gap": [length_gap(a.text, r) for a, r in zip(answers, references)],
              "ROUGE-L F1": rouge_l([a.text for a in answers], references)["per_example"]}
    picked = [(a.text, r) for a, r, c in zip(answers, references, checked) if c]
    if picked:
        values["exact match"] = [float(h) for h in exact_match(*map(list, zip(*picked)))["per_example"]]
    return values


def compare(base: dict[str, list[float]], tuned: dict[str, list[float]], seed: int = 0) -> list[dict[str, Any]]:
    """Per metric: base and tuned means, the paired bootstrap difference and interval, the smallest
    difference these examples detect (from the observed spread of the paired differences), a verdict."""
    rows = []
    for metric, (meaning, lower_better) in METRICS.items():
        if metric not in base:
            continue
        b, t = base[metric], tuned[metric]
        r = paired_bootstrap(b, t, seed=seed)
        detectable = paired_detectable(b, t)
        rows.append({"metric": metric, "meaning": meaning, "base": statistics.fmean(b),
                     "tuned": statistics.fmean(t), **r, "lower_is_better": lower_better,
                     "detectable": detectable,
                     "detectable_worst_case": detectable_difference(len(b)) if metric in ("clean stop", "exact match")
                     else None,
                     "verdict": describe_difference(metric, r, lower_better, detectable)})
    return rows


def score_answers(base: list[Answer], tuned: list[Answer], references: list[str], checked: list[bool] | None = None,
                  seed: int = 0) -> dict[str, Any]:
    """Both sides' answers scored on every metric and compared pair by pair."""
    if not len(base) == len(tuned) == len(references):
        raise ValueError(f"score_answers: {len(base)} base and {len(tuned)} tuned answers for "
                         f"{len(references)} references.")
    checked = checked if checked is not None else [False] * len(references)
    sides = {"base": per_example(base, references, checked), "tuned": per_example(tuned, references, checked)}
    result: dict[str, Any] = {
        side: {"outputs": [a.text for a in answers], "stopped": [a.stopped for a in answers],
               "tokens": [a.tokens for a in answers],
               **{m: statistics.fmean(v) for m, v in sides[side].items()}, "per_example": sides[side]}
        for side, answers in (("base", base), ("tuned", tuned))}
    result["differences"] = compare(sides["base"], sides["tuned"], seed)
    return result


def builtin_source_names(report: dict[str, Any]) -> set[str]:
    """The data report's sources that are the built-in data (their answers can be checked)."""
    return {name for name, s in report["sources"].items() if s["origin"].startswith("built-in")}


def run_answers(run, model, tokenizer, n: int, batch_size: int = 32, max_new_tokens: int | None = None,
                data=None) -> dict[str, Any]:
    """The answer task of stage 05: the first `n` held-out examples of the run (03's eval split, drawn
    by data.seed), answered once by the base (adapter off) and once tuned, every answer metric scored,
    each difference with its interval. `max_new_tokens`: eval.answer_tokens unless given. Batch 32:
    64 examples, both sides, in ~60 CPU seconds on the 2-core CPU (benchmarks/BENCHMARKS.md)."""
    data = data if data is not None else load_prepared(run, tokenizer)
    examples = data.eval[:n]
    if not examples:
        raise ValueError("run_answers: the eval split is empty; raise data.eval_size.")
    budget = max_new_tokens or run.cfg.eval.answer_tokens
    prompts, refs = [e["prompt"] for e in examples], [e["response"] for e in examples]
    builtin = builtin_source_names(data.report)
    ids = [encode_text(run, tokenizer, p) for p in prompts]  # 03 rendered them in the template
    start = time.perf_counter()
    with model.disable_adapter():
        base = generate_answers(model, tokenizer, ids, budget, batch_size)
    middle = time.perf_counter()
    tuned = generate_answers(model, tokenizer, ids, budget, batch_size)
    seconds = {"base": middle - start, "tuned": time.perf_counter() - middle}
    result = score_answers(base, tuned, refs, [e["source"] in builtin for e in examples], seed=run.cfg.data.seed)
    return {**result, "prompts": prompts, "references": refs, "sources": [e["source"] for e in examples],
            "seconds": seconds, "settings": {"examples": len(examples), "max_new_tokens": budget,
                                             "batch_size": batch_size, "decoding": "greedy, no repetition penalty"}}


def showcase(result: dict[str, Any], k: int, seed: int) -> list[dict[str, str]]:
    """`k` examples of a run_answers result, drawn by `seed` (never picked by how they scored):
    prompt, reference, base and tuned answers."""
    n = len(result["prompts"])
    picked = sorted(random.Random(seed).sample(range(n), min(k, n)))
    return [{"prompt": result["prompts"][i], "reference": result["references"][i],
             "base": result["base"]["outputs"][i], "tuned": result["tuned"]["outputs"][i]} for i in picked]
