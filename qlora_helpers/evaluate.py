"""Stage 05: how good is the tuned model against its base? Same prompts, same greedy decoding.

Held-out loss and perplexity (also used by stages 02 and 04), ROUGE-L on held-out Alpaca
examples, GSM8K exact match, IFEval verifiable instructions (`ifeval.py`), and a side-by-side table
of answers to AlpacaEval and MT-bench prompts; lm-evaluation-harness tasks on request.
Each task returns its result; `write_eval_report` assembles them into eval.json, the stage's report;
the notebook runs them one per cell.

Imports: torch, numpy, peft, rouge_score and lm_eval are imported inside the functions that use
them: heavy (seconds) or optional, and the unit tests of the scoring functions need none of them.
"""

from __future__ import annotations

import functools
import html
import math
import re
import time
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from . import ifeval
from .data import (HUB_DATASETS, DataUnavailable, collate, load_table, looks_like_file,
                   resolve_data_dir, tokenize_pair)
from .errors import DataError
from .generation import generate, render_prompt
from .models import four_bit_kernel, load_model, load_tokenizer
from .paths import write_json_atomic, write_text_atomic
from .runs import RunFolder


def heldout_loss(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int,
                 max_length: int, desc: str = "held-out loss") -> dict[str, Any]:
    """Token-weighted mean negative log-likelihood of the responses given their prompts.

    Examples longer than `max_length` are skipped and counted, never cut silently.
    """
    import torch

    if not pairs:
        raise DataError("No held-out examples to score: the eval split is empty or the *_samples "
                        "setting that chose them is 0. Raise data.eval_size or that setting.")
    examples = [tokenize_pair(tokenizer, p, r) for p, r in pairs]
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


# --- text metrics -------------------------------------------------------------------------------


def rouge_l(predictions: list[str], references: list[str]) -> dict[str, Any]:
    """Mean ROUGE-L F1 (rouge-score, Porter stemming) and the per-example scores."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return {"rougeL_f1": sum(scores) / len(scores) if scores else 0.0, "per_example": scores}


_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '$18' -> '18', '18.0' -> '18'; None when it is not a number."""
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return str(int(value)) if value == int(value) else repr(value)


def extract_final_number(text: str) -> str | None:
    """The answer a GSM8K solution ends with: after '####' if present, else the last number."""
    if "####" in text:
        tail = _NUMBER.findall(text.split("####")[-1])
        if tail:
            return normalize_number(tail[0])
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_exact_match(predictions: list[str], answers: list[str]) -> dict[str, Any]:
    """Share of predictions whose final number equals the reference's '#### N'."""
    hits = [extract_final_number(p) is not None and extract_final_number(p) == extract_final_number(a)
            for p, a in zip(predictions, answers)]
    return {"exact_match": sum(hits) / len(hits) if hits else 0.0, "per_example": hits}


# --- the stage ----------------------------------------------------------------------------------
# Base and tuned share one model: the adapter is switched off (peft's disable_adapter) for the
# base, so both see the same 4-bit weights, the same prompts and the same greedy decoding.


def load_tuned_model(run):
    """(model with the run's adapter, tokenizer): the 4-bit base as trained, plus the adapter."""
    from peft import PeftModel

    adapter = run.require_adapter()
    tokenizer = load_tokenizer(run.cfg.model)
    base = load_model(run.cfg.model, run.cfg.quant, run.compute_dtype, run.device)
    model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    return model, tokenizer


def for_both(model, fn):
    """{'base': fn() with the adapter off, 'tuned': fn() with it on}, with timings."""
    start = time.perf_counter()
    with model.disable_adapter():
        base = fn()
    middle = time.perf_counter()
    tuned = fn()
    return {"base": base, "tuned": tuned,
            "seconds": {"base": middle - start, "tuned": time.perf_counter() - middle}}


def _prompts(run, tokenizer, instructions: list[str]) -> list[str]:
    style = "chat" if run.cfg.data.template == "chat" else "alpaca"
    return [render_prompt(tokenizer, text, style) for text in instructions]


def _gsm8k_tables(run, with_shots: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(test rows, train rows for few-shot). eval.gsm8k_path is a hub id (its test and train splits)
    or a test file with train.jsonl beside it."""
    ref = run.cfg.eval.gsm8k_path
    test, test_from = load_table(ref, run.cfg.data, split="test")
    if not with_shots:
        return test, []
    train_ref = str(Path(test_from).with_name("train.jsonl")) if looks_like_file(ref) else ref
    return test, load_table(train_ref, run.cfg.data, split="train")[0]


def _gsm8k_files(run) -> tuple[Path, Path]:
    """(test, train) files for lm-eval's gsm8k_local task: the configured file and train.jsonl beside
    it, or a hub id's offline copies in the data directory."""
    ref = run.cfg.eval.gsm8k_path
    if looks_like_file(ref):
        test = Path(load_table(ref, run.cfg.data, split="test")[1])
        return test, test.with_name("train.jsonl")
    copies = HUB_DATASETS[ref].offline if ref in HUB_DATASETS else {}
    folder = resolve_data_dir(run.cfg.data)
    if "test" not in copies or not (folder / copies["test"]).is_file():
        raise DataUnavailable(f"gsm8k_local reads files: {ref!r} has no offline copy in {folder}.")
    return folder / copies["test"], folder / copies["train"]


def _read(run, ref: str, split: str = "train") -> list[dict[str, Any]]:
    return load_table(ref, run.cfg.data, split=split)[0]


def needs_data(task):
    """A task of stage 05 whose data is neither on the hub nor in the data directory is skipped, with
    the reason, instead of failing the stage: {'skipped': why} takes the place of its results."""
    @functools.wraps(task)
    def run_task(run, *args, **kwargs):
        try:
            return task(run, *args, **kwargs)
        except DataUnavailable as exc:
            print(f"{task.__name__}: skipped, no data: {exc}")
            return {"skipped": str(exc)}
    return run_task


def headline(result: dict[str, Any], key: str) -> dict[str, Any] | str:
    """{'base': x, 'tuned': y} for one metric of a task, or why the task was skipped."""
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    return {side: result[side][key] for side in ("base", "tuned")}


def evaluate_loss(run, model, tokenizer, data) -> dict[str, Any]:
    """Held-out loss and perplexity, base vs tuned, on the eval split that 03 made."""
    pairs = data.eval_pairs()[:run.cfg.eval.loss_samples]
    cfg = run.cfg
    return for_both(model, lambda: heldout_loss(model, tokenizer, pairs, cfg.eval.batch_size,
                                                cfg.model.max_seq_length))


def evaluate_rouge(run, model, tokenizer, data) -> dict[str, Any]:
    """ROUGE-L of generated responses against the references of held-out Alpaca examples."""
    cfg = run.cfg.eval
    examples = data.eval[:cfg.rouge_samples]
    prompts = [e["prompt"] for e in examples]
    refs = [e["response"] for e in examples]
    out = for_both(model, lambda: generate(model, tokenizer, prompts, cfg.answer_tokens, cfg.batch_size))
    for side in ("base", "tuned"):
        out[side] = {"outputs": out[side], **rouge_l(out[side], refs)}
    out["prompts"], out["references"] = prompts, refs
    return out


def gsm8k_instruction(question: str, shots: list[dict[str, Any]]) -> str:
    solved = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return (f"{solved}Solve the math word problem step by step. End with the final answer as "
            f"'#### <number>'.\n\nQuestion: {question}")


@needs_data
def evaluate_gsm8k(run, model, tokenizer) -> dict[str, Any]:
    """Exact match of the final number on the first N GSM8K test problems."""
    cfg = run.cfg.eval
    test, train = _gsm8k_tables(run, with_shots=cfg.gsm8k_shots > 0)
    rows = test[:cfg.gsm8k_samples]
    shots = train[:cfg.gsm8k_shots]
    prompts = _prompts(run, tokenizer, [gsm8k_instruction(r["question"], shots) for r in rows])
    answers = [r["answer"] for r in rows]
    out = for_both(model, lambda: generate(model, tokenizer, prompts, cfg.gsm8k_tokens, cfg.batch_size))
    for side in ("base", "tuned"):
        out[side] = {"outputs": out[side], **gsm8k_exact_match(out[side], answers)}
    out["questions"], out["answers"] = [r["question"] for r in rows], answers
    return out


@needs_data
def evaluate_ifeval(run, model, tokenizer) -> dict[str, Any]:
    """IFEval verifiable instructions on the first N prompts (checks that need no downloads)."""
    cfg = run.cfg.eval
    rows = _read(run, cfg.ifeval_path)[:cfg.ifeval_samples]
    prompts = _prompts(run, tokenizer, [r["prompt"] for r in rows])
    out = for_both(model, lambda: generate(model, tokenizer, prompts, cfg.answer_tokens, cfg.batch_size))
    for side in ("base", "tuned"):
        out[side] = {"outputs": out[side], **ifeval.score(rows, out[side])}
    out["prompts"] = [r["prompt"] for r in rows]
    return out


@needs_data
def evaluate_showcase(run, model, tokenizer) -> dict[str, Any]:
    """Side-by-side answers to AlpacaEval instructions and MT-bench first turns."""
    cfg = run.cfg.eval
    alpaca = [r["instruction"] for r in _read(run, cfg.alpaca_eval_path, split="eval")[:cfg.showcase_samples]]
    mt = _read(run, cfg.mt_bench_path)[:cfg.showcase_samples]
    items = ([{"source": "AlpacaEval", "prompt": p} for p in alpaca]  # hub rows: prompt; the file's: turns
             + [{"source": f"MT-bench ({q['category']})", "prompt": (q.get("turns") or q["prompt"])[0]} for q in mt])
    prompts = _prompts(run, tokenizer, [i["prompt"] for i in items])
    out = for_both(model, lambda: generate(model, tokenizer, prompts, cfg.answer_tokens, cfg.batch_size))
    for item, base, tuned in zip(items, out["base"], out["tuned"]):
        item.update(base=base, tuned=tuned)
    return {"items": items, "seconds": out["seconds"]}


def write_side_by_side(folder: RunFolder, items: list[dict[str, Any]]) -> dict[str, str]:
    """generations.html and generations.md: prompt | base | tuned."""
    cell = lambda t: html.escape(t).replace("\n", "<br>")  # noqa: E731
    rows = "".join(f"<tr><td><b>{html.escape(i['source'])}</b><br>{cell(i['prompt'])}</td>"
                   f"<td>{cell(i['base'])}</td><td>{cell(i['tuned'])}</td></tr>" for i in items)
    page = ("<table style='border-collapse:collapse' border='1' cellpadding='6'>"
            "<tr><th>prompt</th><th>base</th><th>tuned</th></tr>" + rows + "</table>")
    md_cell = lambda t: t.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    md = "| source | prompt | base | tuned |\n|---|---|---|---|\n" + "".join(
        f"| {i['source']} | {md_cell(i['prompt'])} | {md_cell(i['base'])} | {md_cell(i['tuned'])} |\n" for i in items)
    return {"html": str(write_text_atomic(folder.generations_html, page)),
            "markdown": str(write_text_atomic(folder.generations_markdown, md))}


def sample_counts(results: dict[str, Any]) -> dict[str, int | None]:
    """Examples behind each task's numbers (0: the task was configured away, e.g. gsm8k_samples: 0)."""
    return {"loss": results.get("loss", {}).get("tuned", {}).get("examples"),
            "rouge": len(results.get("rouge", {}).get("references", [])),
            "gsm8k": len(results.get("gsm8k", {}).get("answers", [])),
            "ifeval": len(results.get("ifeval", {}).get("prompts", []))}


def summarize(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{metric: {'base': x, 'tuned': y}} for the headline numbers of the tasks that had examples."""
    pick = {"held-out loss": ("loss", "loss"), "perplexity": ("loss", "perplexity"),
            "ROUGE-L F1": ("rouge", "rougeL_f1"), "GSM8K exact match": ("gsm8k", "exact_match"),
            "IFEval prompt-level": ("ifeval", "prompt_level_strict"),
            "IFEval instruction-level": ("ifeval", "instruction_level_strict")}
    counts = sample_counts(results)
    return {name: {side: results[task][side][key] for side in ("base", "tuned")}
            for name, (task, key) in pick.items() if task in results and counts[task] != 0}


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


# metric: (task, how each side's per-example values are read: values, weights; transform, lower is better)
_PAIRED = {
    "held-out loss": ("loss", lambda r: ([n / k for n, k in r["per_example"]], [k for _, k in r["per_example"]]), None, True),
    "perplexity": ("loss", lambda r: ([n / k for n, k in r["per_example"]], [k for _, k in r["per_example"]]), math.exp, True),
    "ROUGE-L F1": ("rouge", lambda r: (r["per_example"], None), None, False),
    "GSM8K exact match": ("gsm8k", lambda r: ([float(h) for h in r["per_example"]], None), None, False),
    "IFEval prompt-level": ("ifeval", lambda r: ([p[0] for p in r["per_prompt"]], None), None, False),
    "IFEval instruction-level": ("ifeval", lambda r: ([p[1] / p[2] for p in r["per_prompt"]],
                                                      [p[2] for p in r["per_prompt"]]), None, False),
}


def compare_paired(results: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """Every base -> tuned difference of the headline metrics with its paired bootstrap 95% interval,
    and a sentence saying whether it can be told from zero."""
    rows = []
    for metric, (task, read, transform, lower_better) in _PAIRED.items():
        if task not in results or not results[task].get("tuned"):
            continue
        (base, weights), (tuned, _) = read(results[task]["base"]), read(results[task]["tuned"])
        if not base:
            continue
        r = paired_bootstrap(base, tuned, weights, transform, seed=seed)
        rows.append({"metric": metric, **r, "verdict": describe_difference(metric, r, lower_better)})
    return rows


def describe_difference(metric: str, r: dict[str, Any], lower_is_better: bool = False) -> str:
    """One sentence: the difference, its interval, and whether it is distinguishable from zero."""
    span = f"{r['difference']:+.4g} (95% interval {r['low']:+.4g} to {r['high']:+.4g}, {r['n']} paired examples)"
    if not r["distinguishable"] and r["low"] == r["high"]:
        return f"{metric}: tuned - base = {span}: no difference; the two models score alike on every example."
    if not r["distinguishable"]:
        half = (r["high"] - r["low"]) / 2
        return (f"{metric}: tuned - base = {span}: not distinguishable from zero; with this many examples "
                f"only differences beyond about ±{half:.3g} would show.")
    better = (r["difference"] < 0) == lower_is_better
    return f"{metric}: tuned - base = {span}: distinguishable from zero, tuned is {'better' if better else 'worse'}."


def write_eval_report(run, model=None, extra: dict[str, Any] | None = None, **tasks: Any) -> dict[str, Any]:
    """eval.json, the report stage 05 writes last, assembled from each task's result (`loss=...,
    rouge=..., gsm8k=..., ifeval=..., showcase=..., lm_eval=...`; a task left out, None or {} is not
    in it): every number, with the config, seeds, sample counts, timings, the headline summary, the
    paired bootstrap differences, the 4-bit kernel that ran (`model`) and the tasks skipped for want
    of data, with the reason. Returns the report."""
    results = {task: r for task, r in tasks.items() if r}
    cfg = run.cfg
    skipped = {task: r["skipped"] for task, r in results.items() if isinstance(r, dict) and "skipped" in r}
    report = {"run": run.name, "summary": summarize(results), "config": cfg.to_dict(), "skipped": skipped,
              "four_bit_kernel": four_bit_kernel(model) if model is not None else None,
              "seed": cfg.data.seed, "device": run.device, "compute_dtype": run.runtime.compute_dtype,
              "decoding": "greedy", "samples": sample_counts(results),
              "seconds": {task: r.get("seconds") for task, r in results.items()},
              "differences": compare_paired(results), "results": results, **(extra or {})}
    write_json_atomic(run.eval_report, report)
    return report


def lm_eval_local_tasks(run, folder) -> list[str]:
    """Write lm-eval task files that read the data directory (offline): gsm8k_local = lm-eval's
    own gsm8k task (prompt, few-shot, answer extraction) on gsm8k/{train,test}.jsonl."""
    import lm_eval

    test, train = _gsm8k_files(run)
    spec = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    spec.pop("tag", None)
    spec.pop("dataset_name", None)
    spec["generation_kwargs"]["max_gen_toks"] = run.cfg.eval.gsm8k_tokens
    spec.update(task="gsm8k_local", dataset_path="json", num_fewshot=run.cfg.eval.gsm8k_shots,
                dataset_kwargs={"data_files": {"train": str(train), "test": str(test)}})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "gsm8k_local.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return ["gsm8k_local"]


def evaluate_lm_eval(run, model, tokenizer) -> dict[str, Any]:
    """eval.lm_eval_tasks through lm-evaluation-harness on the in-memory model, base and tuned.
    Hub tasks need the network for their data; `gsm8k_local` reads the data directory."""
    cfg = run.cfg.eval
    if not cfg.lm_eval_tasks:
        return {}
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks_dir = run.lm_eval_tasks_dir
    lm_eval_local_tasks(run, tasks_dir)
    manager = TaskManager(include_path=str(tasks_dir))
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size,
              max_length=run.cfg.model.max_seq_length)

    def run_tasks():
        results = simple_evaluate(model=lm, tasks=list(cfg.lm_eval_tasks), limit=cfg.lm_eval_limit,
                                  task_manager=manager, log_samples=False, random_seed=run.cfg.data.seed,
                                  numpy_random_seed=run.cfg.data.seed, torch_random_seed=run.cfg.data.seed)
        return {task: {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
                for task, metrics in results["results"].items()}

    return for_both(model, run_tasks)
