"""The evaluation tasks of stage 05, one registry entry each (like lm-eval's task registry).

Everything that lists tasks iterates over `TASKS`, in its order: stage 05 runs them
(`evaluate.run_tasks`, notebook 05's one task cell), eval.json's summary, sample counts and paired
bootstrap differences (`evaluate.summarize`, `sample_counts`, `compare_paired`), the metrics figure
(`plots.plot_metrics`) and the sweep table (`sweep.collect_results`). Adding a task is one entry here
plus its function in evaluate.py (and its settings in config.EvalConfig, and a test). A metric a
result does not hold (exact match: only on the built-in data) is left out of the summary and table.

A task's function takes (run, model, tokenizer, data: the eval split 03 saved) and returns
{'base': ..., 'tuned': ..., 'seconds': ...} (`evaluate.for_both`), or {'skipped': why} when its data
is nowhere to be found (`evaluate.needs_data`). A task the configuration turns off (`Task.switches`:
eval.gsm8k_samples: 0) is not run at all: {'off': why} (`evaluate.run_task`); the task table says
what turns it on (`Task.turn_on`). One that ran on data holding no examples (an empty file) has
numbers from none: the table says so (`Task.no_examples`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

Reader = Callable[[dict[str, Any]], tuple[list[float], list[float] | None]]


@dataclass(frozen=True)
class Metric:
    name: str                 # its name in eval.json's summary, the figure and the sweep table
    key: str                  # where each side's result holds its value
    per_example: Reader       # one side's result -> (per-example values, weights or None): the paired bootstrap
    lower_is_better: bool = False
    transform: Callable[[float], float] | None = None  # applied to each side's mean (exp: perplexity from loss)
    # sweep table columns (tuned, base, examples) where 04's train_log measured it first and 05 replaces it
    sweep_columns: tuple[str, str, str] | None = None


@dataclass(frozen=True)
class Task:
    name: str                 # its key in eval.json's results, samples and seconds
    title: str
    about: str                # what it measures, in a line (the notebook's task table)
    settings: tuple[str, ...]  # the eval.* settings it reads
    data: tuple[str, ...]     # the eval.* settings naming its data: a hub id (read from the hub, else its
    #                           offline copy in the data directory, data.HUB_DATASETS) or a file; ():
    #                           the run's own eval split (stage 03)
    run: str                  # its function in evaluate.py
    metrics: tuple[Metric, ...] = ()
    examples: Callable[[dict[str, Any]], int | None] | None = None  # examples behind its numbers
    switches: tuple[str, ...] = ()  # the eval.* settings that turn it off when 0, null or empty
    section: str = "eval"     # the config section of its settings

    def off(self, eval_cfg: Any) -> str | None:
        """Why the configuration turns this task off ('eval.gsm8k_samples is 0'), or None when it runs.
        A task that is off is not run and its data is not read: it is off, not short of data."""
        for name in self.switches:
            value = getattr(eval_cfg, name)
            if not value:
                return f"{self.section}.{name} is {json.dumps(value)}"
        return None

    def enabled(self, eval_cfg: Any) -> bool:
        return self.off(eval_cfg) is None

    def turn_on(self, why: str) -> str:
        """What runs the task again, for Task.off's reason: 'eval.gsm8k_samples is 0' -> 'set
        eval.gsm8k_samples above 0'."""
        setting, _, value = why.partition(" is ")
        return TURN_ON.get(value, "change {setting}").format(setting=setting)

    def no_examples(self) -> str:
        """Why a task that ran has no numbers, and what to change: its data held no examples (an empty
        file). The configuration cannot give a task 0 examples: a 0 in its switch turns it off."""
        if self.data:
            settings = " or ".join(f"{self.section}.{name}" for name in self.data)
            return f"no examples: {settings} held none; point it at data that holds some"
        return "no examples: the eval split stage 03 made gave none to score"


# What runs a task again, by the value of the switch that turned it off (Task.off: 0, null or empty)
TURN_ON = {"0": "set {setting} above 0", "null": "set {setting} to a file or hub id",
           "[]": "name one or more in {setting}"}


def _nll_per_token(side: dict[str, Any]) -> tuple[list[float], list[float]]:
    return [n / k for n, k in side["per_example"]], [k for _, k in side["per_example"]]


def _values(side: dict[str, Any]) -> tuple[list[float], None]:
    return [float(v) for v in side["per_example"]], None


def _prompt_level(side: dict[str, Any]) -> tuple[list[float], None]:
    return [p[0] for p in side["per_prompt"]], None


def _instruction_level(side: dict[str, Any]) -> tuple[list[float], list[float]]:
    return [p[1] / p[2] for p in side["per_prompt"]], [p[2] for p in side["per_prompt"]]


def _answer_metric(name: str) -> Reader:
    return lambda side: ([float(v) for v in side["per_example"][name]], None)


def _answer(name: str, lower_is_better: bool = False) -> Metric:
    """One metric of the answer task (answers.METRICS: each side holds its mean and per-example values)."""
    return Metric(name, name, _answer_metric(name), lower_is_better=lower_is_better)


def _count(key: str) -> Callable[[dict[str, Any]], int]:
    return lambda result: len(result.get(key, []))


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("loss", "Held-out loss", "token-weighted NLL of the held-out responses given their prompts",
         ("loss_samples", "batch_size"), (), "evaluate_loss",
         (Metric("held-out loss", "loss", _nll_per_token, lower_is_better=True,
                 sweep_columns=("heldout_loss", "heldout_loss_base", "heldout_examples")),
          Metric("perplexity", "perplexity", _nll_per_token, lower_is_better=True, transform=math.exp)),
         examples=lambda result: result.get("tuned", {}).get("examples")),
    Task("answers", "Answers", "greedy answers to held-out instructions: clean stops, repetition, length "
         "against the reference, ROUGE-L, exact match (built-in data)",
         ("answer_samples", "answer_tokens", "answer_batch_size"), (), "evaluate_answers",
         (_answer("clean stop"), _answer("repetition", lower_is_better=True),
          _answer("length gap", lower_is_better=True), _answer("ROUGE-L F1"), _answer("exact match")),
         examples=_count("references")),
    Task("gsm8k", "GSM8K", "the final number of the answer (after ####, else the last) against the reference",
         ("gsm8k_path", "gsm8k_samples", "gsm8k_shots", "gsm8k_tokens", "batch_size"), ("gsm8k_path",),
         "evaluate_gsm8k", (Metric("GSM8K exact match", "exact_match", _values),), examples=_count("answers"),
         switches=("gsm8k_samples",)),
    Task("ifeval", "IFEval", "verifiable instructions followed: every one of a prompt (prompt level), or each",
         ("ifeval_path", "ifeval_samples", "answer_tokens", "batch_size"), ("ifeval_path",), "evaluate_ifeval",
         (Metric("IFEval prompt-level", "prompt_level_strict", _prompt_level),
          Metric("IFEval instruction-level", "instruction_level_strict", _instruction_level)),
         examples=_count("prompts"), switches=("ifeval_samples",)),
    Task("choice", "Multiple choice", "the likeliest of the given answers (log-likelihood) against the gold one",
         ("choice_path", "choice_samples", "batch_size"), ("choice_path",), "evaluate_choice",
         (Metric("multiple-choice accuracy", "accuracy", _values),), examples=_count("questions"),
         switches=("choice_path", "choice_samples")),
    Task("showcase", "Side by side", "base and tuned answers to AlpacaEval and MT-bench prompts, to read",
         ("alpaca_eval_path", "mt_bench_path", "showcase_samples", "answer_tokens"),
         ("alpaca_eval_path", "mt_bench_path"), "evaluate_showcase", switches=("showcase_samples",)),
    Task("lm_eval", "lm-evaluation-harness", "the tasks of eval.lm_eval_tasks through lm-eval, on the model in memory",
         ("lm_eval_tasks", "lm_eval_limit", "gsm8k_path", "gsm8k_shots", "gsm8k_tokens"), (), "evaluate_lm_eval",
         switches=("lm_eval_tasks",)),
)}


def metrics() -> Iterator[tuple[Task, Metric]]:
    """Every (task, metric), in registry order."""
    for task in TASKS.values():
        for metric in task.metrics:
            yield task, metric


def metric(name: str) -> Metric:
    """The metric of that summary name; KeyError naming the known ones."""
    for _, m in metrics():
        if m.name == name:
            return m
    raise KeyError(f"No metric {name!r}; known: {', '.join(m.name for _, m in metrics())}.")
