"""Stage 05: how good is the tuned model against its base? Same prompts, same greedy decoding.

The tasks are the entries of `tasks.TASKS` (held-out loss and perplexity, the answer metrics of
answers.py on held-out examples (clean stops, repetition, length, ROUGE-L, exact match), GSM8K exact
match, IFEval verifiable instructions (`ifeval.py`), a side-by-side table of
answers to AlpacaEval and MT-bench prompts, lm-evaluation-harness tasks on request); their functions
live here. `run_tasks` runs them in the registry's order (notebook 05's task cell), and
`write_eval_report` assembles their results into eval.json, the stage's report.

Imports: torch, numpy, peft and lm_eval are imported inside the functions that use
them: heavy (seconds) or optional, and the unit tests of the scoring functions need none of them.
"""

from __future__ import annotations

import functools
import html
import re
import time
from pathlib import Path
from typing import Any

import yaml

from . import ifeval
from .answers import paired_detectable, run_answers
from .errors import DataError
from .generation import generate
from .models import four_bit_kernel
from .paths import write_json_atomic, write_text_atomic
from .prompts import encode_prompts, render_instruction
from .runs import RunFolder
from .scoring import (  # noqa: F401 (rouge_l: its old home)
    describe_difference,
    detectable_from_interval,
    heldout_loss,
    paired_bootstrap,
    rouge_l,
)
from .sources import HUB_DATASETS, DataUnavailable, load_table, looks_like_file, resolve_data_dir
from .tasks import TASKS, metrics

# --- text metrics (ROUGE-L: scoring.rouge_l) ------------------------------------------------------


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


def for_both(model, fn):
    """{'base': fn() with the adapter off, 'tuned': fn() with it on}, with timings."""
    start = time.perf_counter()
    with model.disable_adapter():
        base = fn()
    middle = time.perf_counter()
    tuned = fn()
    return {"base": base, "tuned": tuned,
            "seconds": {"base": middle - start, "tuned": time.perf_counter() - middle}}


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
    if "off" in result:
        return f"off: {result['off']}"
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    return {side: result[side][key] for side in ("base", "tuned")}


def evaluate_loss(run, model, tokenizer, data) -> dict[str, Any]:
    """Held-out loss and perplexity, base vs tuned, on the eval split that 03 made."""
    pairs = data.eval_pairs()[:run.cfg.eval.loss_samples]
    cfg = run.cfg
    return for_both(model, lambda: heldout_loss(model, tokenizer, pairs, cfg.eval.batch_size,
                                                cfg.model.max_seq_length, template=run))


def evaluate_answers(run, model, tokenizer, data) -> dict[str, Any]:
    """What a learner sees in the answers (answers.py): clean stops, repetition, length against the
    reference, ROUGE-L and (built-in data) exact match, base vs tuned on the same held-out examples."""
    cfg = run.cfg.eval
    return run_answers(run, model, tokenizer, cfg.answer_samples, cfg.answer_batch_size, cfg.answer_tokens, data)


def gsm8k_instruction(question: str, shots: list[dict[str, Any]]) -> str:
    solved = "".join(f"Question: {s['question']}\nAnswer: {s['answer']}\n\n" for s in shots)
    return (f"{solved}Solve the math word problem step by step. End with the final answer as "
            f"'#### <number>'.\n\nQuestion: {question}")


@needs_data
def evaluate_gsm8k(run, model, tokenizer, data=None) -> dict[str, Any]:
    """Exact match of the final number on the first N GSM8K test problems."""
    cfg = run.cfg.eval
    test, train = _gsm8k_tables(run, with_shots=cfg.gsm8k_shots > 0)
    rows = test[:cfg.gsm8k_samples]
    shots = train[:cfg.gsm8k_shots]
    prompts = encode_prompts(run, tokenizer, [gsm8k_instruction(r["question"], shots) for r in rows])
    answers = [r["answer"] for r in rows]
    out = for_both(model, lambda: generate(model, tokenizer, prompts, cfg.gsm8k_tokens, cfg.batch_size))
    for side in ("base", "tuned"):
        out[side] = {"outputs": out[side], **gsm8k_exact_match(out[side], answers)}
    out["questions"], out["answers"] = [r["question"] for r in rows], answers
    return out


@needs_data
def evaluate_ifeval(run, model, tokenizer, data=None) -> dict[str, Any]:
    """IFEval verifiable instructions on the first N prompts (checks that need no downloads)."""
    cfg = run.cfg.eval
    rows = _read(run, cfg.ifeval_path)[:cfg.ifeval_samples]
    prompts = encode_prompts(run, tokenizer, [r["prompt"] for r in rows])
    out = for_both(model, lambda: generate(model, tokenizer, prompts, cfg.answer_tokens, cfg.batch_size))
    for side in ("base", "tuned"):
        out[side] = {"outputs": out[side], **ifeval.score(rows, out[side])}
    out["prompts"] = [r["prompt"] for r in rows]
    return out


@needs_data
def evaluate_choice(run, model, tokenizer, data=None) -> dict[str, Any]:
    """Multiple choice: the answer the model finds likeliest after the question (the summed
    log-likelihood of the choice and EOS, as held-out loss scores a response) against the gold one."""
    cfg = run.cfg.eval
    rows = _read(run, cfg.choice_path)[:cfg.choice_samples]
    pairs = [(render_instruction(run, tokenizer, r["question"]), c) for r in rows for c in r["choices"]]
    if not pairs:  # a file with no questions (choice_samples: 0 turns the task off before it runs)
        empty = {"accuracy": 0.0, "per_example": [], "chosen": []}
        return {"base": empty, "tuned": dict(empty), "seconds": {"base": 0.0, "tuned": 0.0}, "questions": []}

    def picks():
        scored = heldout_loss(model, tokenizer, pairs, cfg.batch_size, run.cfg.model.max_seq_length,
                              desc="choices", template=run)
        if scored["skipped_too_long"]:
            raise DataError(f"{scored['skipped_too_long']} question + choice pairs of {cfg.choice_path} are "
                            f"longer than model.max_seq_length; raise it or shorten them.")
        nll = iter(n for n, _ in scored["per_example"])
        chosen = [min(range(len(r["choices"])), key=[next(nll) for _ in r["choices"]].__getitem__) for r in rows]
        hits = [c == int(r["gold"]) for c, r in zip(chosen, rows)]
        return {"accuracy": sum(hits) / len(hits) if hits else 0.0, "per_example": hits, "chosen": chosen}

    out = for_both(model, picks)
    out["questions"] = [r["question"] for r in rows]
    return out


@needs_data
def evaluate_showcase(run, model, tokenizer, data=None) -> dict[str, Any]:
    """Side-by-side answers to AlpacaEval instructions and MT-bench first turns."""
    cfg = run.cfg.eval
    alpaca = [r["instruction"] for r in _read(run, cfg.alpaca_eval_path, split="eval")[:cfg.showcase_samples]]
    mt = _read(run, cfg.mt_bench_path)[:cfg.showcase_samples]
    items = ([{"source": "AlpacaEval", "prompt": p} for p in alpaca]  # hub rows: prompt; the file's: turns
             + [{"source": f"MT-bench ({q['category']})", "prompt": (q.get("turns") or q["prompt"])[0]} for q in mt])
    prompts = encode_prompts(run, tokenizer, [i["prompt"] for i in items])
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
    """Examples behind each task's numbers; a task the configuration turned off has none to count."""
    return {task.name: task.examples(results[task.name]) for task in TASKS.values()
            if task.name in results and "off" not in results[task.name] and task.examples is not None}


def summarize(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{metric: {'base': x, 'tuned': y}} for the headline numbers of the tasks that had examples."""
    counts = sample_counts(results)
    return {metric.name: {side: results[task.name][side][metric.key] for side in ("base", "tuned")}
            for task, metric in metrics() if counts.get(task.name, 0) != 0 and _holds(results[task.name], metric)}


def _holds(result: dict[str, Any], metric) -> bool:
    """Does a task's result carry this metric? (exact match of the answer task: built-in data only)"""
    try:
        metric.per_example(result.get("base") or {})
    except KeyError:
        return False
    return True


def compare_paired(results: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """Every base -> tuned difference of the headline metrics with its paired bootstrap 95% interval,
    and a sentence saying whether it can be told from zero."""
    rows = []
    for task, metric in metrics():
        if task.name not in results or not results[task.name].get("tuned") or not _holds(results[task.name], metric):
            continue
        (base, weights), (tuned, _) = (metric.per_example(results[task.name][side]) for side in ("base", "tuned"))
        if not base:
            continue
        r = paired_bootstrap(base, tuned, weights, metric.transform, seed=seed)
        # the minimum detectable difference (80% power, two-sided 5%): for a plain mean the answer
        # table's own number; for a weighted or transformed one (loss, perplexity) from the interval
        plain = weights is None and metric.transform is None
        detectable = paired_detectable(base, tuned) if plain else detectable_from_interval(r)
        verdict = describe_difference(metric.name, r, metric.lower_is_better, detectable)
        rows.append({"metric": metric.name, **r, "detectable": detectable, "verdict": verdict})
    return rows


def run_tasks(run, model, tokenizer, data) -> dict[str, Any]:
    """Every task of `tasks.TASKS`, in its order: {task name: result, or {'off': why}}."""
    return {name: run_task(name, run, model, tokenizer, data) for name in TASKS}


def run_task(name: str, run, model, tokenizer, data) -> dict[str, Any]:
    """One task's result; {'off': 'eval.gsm8k_samples is 0'} for a task the configuration turns off,
    without running it or reading its data."""
    off = TASKS[name].off(run.cfg.eval)
    return {"off": off} if off else _RUNNERS[name](run, model, tokenizer, data)


def task_table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """What each task run measured: a row per metric (base, tuned, which way is better), or why it
    has no numbers (off, and what turns it on; skipped for want of data; no examples in its data);
    with its examples and seconds (base + tuned)."""
    counts, rows = sample_counts(results), []
    for name, result in results.items():
        task = TASKS[name]
        row = {"task": task.title, "examples": counts.get(name),
               "seconds": round(sum((result.get("seconds") or {}).values()), 1)}
        if "off" in result:
            rows.append({**row, "metric": f"off: {result['off']}; to run it, {task.turn_on(result['off'])}"})
        elif "skipped" in result:
            rows.append({**row, "metric": f"skipped: {result['skipped']}"})
        elif counts.get(name) == 0:
            rows.append({**row, "metric": task.no_examples()})
        elif not task.metrics:
            rows.append({**row, "metric": f"(no score: {task.about})"})
        for metric in task.metrics if not {"skipped", "off"} & set(result) and counts.get(name) != 0 else ():
            if not _holds(result, metric):
                continue
            rows.append({**row, "metric": metric.name, "base": result["base"][metric.key], "tuned":
                         result["tuned"][metric.key], "better": "lower" if metric.lower_is_better else "higher"})
    return rows


def task_frame(results: dict[str, Any]):
    """`task_table` as a table to read: examples as counts, seconds to a tenth, scores to four
    significant digits, and blank cells where a task has no number (off, skipped)."""
    import pandas as pd

    frame = pd.DataFrame(task_table(results)).set_index(["task", "metric"]).astype({"examples": "Int64"})
    scores = [c for c in ("base", "tuned") if c in frame.columns]
    return (frame.style.format(na_rep="").format("{:.1f}", subset=["seconds"])
            .format(lambda v: f"{v:.4g}", subset=scores, na_rep=""))


def write_eval_report(run, model=None, extra: dict[str, Any] | None = None, **tasks: Any) -> dict[str, Any]:
    """eval.json, the report stage 05 writes last, assembled from each task's result (`loss=...,
    answers=..., gsm8k=..., ifeval=..., showcase=..., lm_eval=...`; a task left out, None or {} is not
    in it): every number, with the config, seeds, sample counts, timings, the headline summary, the
    paired bootstrap differences, the 4-bit kernel that ran (`model`), the tasks skipped for want
    of data (`skipped`) and those the configuration turned off (`off`), each with the reason.
    Returns the report."""
    results = {task: r for task, r in tasks.items() if r}
    cfg = run.cfg
    skipped = {task: r["skipped"] for task, r in results.items() if isinstance(r, dict) and "skipped" in r}
    off = {task: r["off"] for task, r in results.items() if isinstance(r, dict) and "off" in r}
    report = {"run": run.name, "summary": summarize(results), "config": cfg.to_dict(),
              "overrides": list(run.stage_overrides),  # this evaluation's own eval.* changes (05's eval_overrides)
              "skipped": skipped, "off": off,  # no data found / turned off by the configuration
              "four_bit_kernel": four_bit_kernel(model) if model is not None else None,
              "seed": cfg.data.seed, "device": run.device, "compute_dtype": run.runtime.compute_dtype,
              "decoding": "greedy", "samples": sample_counts(results),
              "seconds": {task: r.get("seconds") for task, r in results.items()},
              "differences": compare_paired(results, cfg.data.seed), "results": results, **(extra or {})}
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


def evaluate_lm_eval(run, model, tokenizer, data=None) -> dict[str, Any]:
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


# Each task's function, by the name its registry entry gives (a KeyError here names an entry without one).
_RUNNERS = {task.name: globals()[task.run] for task in TASKS.values()}
