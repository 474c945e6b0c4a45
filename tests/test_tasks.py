"""The evaluation-task registry (qlora_helpers/tasks.py) and what iterates over it."""

import dataclasses

import pytest

from qlora_helpers import evaluate, tasks
from qlora_helpers.config import EvalConfig, load_config
from qlora_helpers.tasks import TASKS

SETTINGS = {f.name for f in dataclasses.fields(EvalConfig)}


@pytest.mark.parametrize("task", list(tasks.TASKS.values()), ids=list(tasks.TASKS))
def test_each_entry_names_real_settings_and_a_function(task):
    assert set(task.settings) <= SETTINGS, set(task.settings) - SETTINGS
    assert set(task.data) <= set(task.settings)
    assert evaluate._RUNNERS[task.name].__name__ == task.run
    assert task.enabled(EvalConfig()) in (True, False)


def test_metric_names_are_unique_and_directed():
    names = [m.name for _, m in tasks.metrics()]
    assert len(names) == len(set(names))
    assert [m.name for _, m in tasks.metrics() if m.lower_is_better] == ["held-out loss", "perplexity",
                                                                          "repetition", "length gap"]
    with pytest.raises(KeyError, match="known: held-out loss"):
        tasks.metric("BLEU")


RESULTS = {
    "loss": {"base": {"loss": 2.0, "perplexity": 7.39, "examples": 2, "per_example": [[4.0, 2], [2.0, 1]]},
             "tuned": {"loss": 1.5, "perplexity": 4.48, "examples": 2, "per_example": [[3.0, 2], [1.5, 1]]},
             "seconds": {"base": 1.0, "tuned": 1.0}},
    "answers": {"base": {"clean stop": 0.0, "repetition": 0.5, "length gap": 1.0, "ROUGE-L F1": 0.1,
                         "per_example": {"clean stop": [0, 0], "repetition": [0.5, 0.5], "length gap": [1.0, 1.0],
                                         "ROUGE-L F1": [0.1, 0.1]}},
                "tuned": {"clean stop": 1.0, "repetition": 0.0, "length gap": 0.5, "ROUGE-L F1": 0.2,
                          "per_example": {"clean stop": [1, 1], "repetition": [0.0, 0.0], "length gap": [0.5, 0.5],
                                          "ROUGE-L F1": [0.2, 0.2]}},
                "references": ["a", "b"], "seconds": {"base": 1.0, "tuned": 2.0}},  # not built-in: no exact match
    "gsm8k": {"skipped": "no data"},
    "ifeval": {"base": {"prompt_level_strict": 0.0, "instruction_level_strict": 0.0, "per_prompt": []},
               "tuned": {"prompt_level_strict": 0.0, "instruction_level_strict": 0.0, "per_prompt": []},
               "prompts": [], "seconds": {"base": 0.0, "tuned": 0.0}},
}


ANSWER_METRICS = ["clean stop", "repetition", "length gap", "ROUGE-L F1"]


def test_summary_counts_differences_and_table_follow_the_registry():
    assert evaluate.sample_counts(RESULTS) == {"loss": 2, "answers": 2, "gsm8k": 0, "ifeval": 0}
    summary = evaluate.summarize(RESULTS)
    assert list(summary) == ["held-out loss", "perplexity", *ANSWER_METRICS]  # ifeval 0 examples, gsm8k none
    assert [d["metric"] for d in evaluate.compare_paired(RESULTS)] == list(summary)
    table = evaluate.task_table(RESULTS)
    assert [(r["task"], r["metric"]) for r in table] == [
        ("Held-out loss", "held-out loss"), ("Held-out loss", "perplexity"),
        *[("Answers", m) for m in ANSWER_METRICS], ("GSM8K", "skipped: no data"),
        ("IFEval", "no examples: eval.ifeval_path held none; point it at data that holds some")]
    assert table[0]["better"] == "lower" and table[2]["better"] == "higher" and table[2]["seconds"] == 3.0
    assert [r["better"] for r in table[2:6]] == ["higher", "lower", "lower", "higher"]


def test_the_task_frame_reads_as_counts_and_scores_with_blanks_not_nan():
    import re

    page = evaluate.task_frame({**RESULTS, "choice": {"off": "eval.choice_path is null"}}).to_html()
    cells = [re.findall(r">([^<>]*)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", page, re.S)[2:]]
    assert cells[0] == ["2", "2.0", "2", "1.5", "lower"]  # examples a count, seconds to 0.1, scores as given
    assert cells[1][2:4] == ["7.39", "4.48"]  # perplexity exp(2), exp(1.5): four significant digits
    assert cells[-1] == ["", "0.0", "", "", ""]  # a task turned off: no numbers, and no NaN
    assert not re.search(r"NaN|nan|<NA>|\d\.0000", page)


def test_exact_match_is_reported_only_when_the_answers_hold_it():
    answers = {side: {**RESULTS["answers"][side], "exact match": value,
                      "per_example": {**RESULTS["answers"][side]["per_example"], "exact match": [value, value]}}
               for side, value in (("base", 0.0), ("tuned", 1.0))}
    results = {"answers": {**RESULTS["answers"], **answers}}
    assert list(evaluate.summarize(results)) == [*ANSWER_METRICS, "exact match"]
    differences = {d["metric"]: d for d in evaluate.compare_paired(results)}
    assert differences["exact match"]["difference"] == 1.0 and differences["clean stop"]["distinguishable"]
    assert differences["repetition"]["difference"] == -0.5


def test_the_answer_task_reads_its_settings():
    task = tasks.TASKS["answers"]
    cfg = EvalConfig()
    assert task.settings == ("answer_samples", "answer_tokens", "answer_batch_size")
    assert (cfg.answer_samples, cfg.answer_batch_size) == (64, 32) and task.enabled(cfg)
    assert "rouge" not in tasks.TASKS  # ROUGE-L is measured once, by the answer task


def test_plot_and_sweep_read_direction_and_columns_from_the_registry():
    import matplotlib.pyplot as plt

    from qlora_helpers.plots import plot_metrics
    from qlora_helpers.sweep import _eval_columns

    fig = plot_metrics(evaluate.summarize(RESULTS))
    assert [ax.get_title() for ax in fig.axes] == [
        "held-out loss\n(lower is better)", "perplexity\n(lower is better)", "clean stop\n(higher is better)",
        "repetition\n(lower is better)", "length gap\n(lower is better)", "ROUGE-L F1\n(higher is better)"]
    plt.close(fig)
    report = {"summary": evaluate.summarize(RESULTS), "samples": evaluate.sample_counts(RESULTS)}
    assert _eval_columns(report) == {"heldout_loss": 1.5, "heldout_loss_base": 2.0, "heldout_examples": 2,
                                     "perplexity": 4.48, "clean stop": 1.0, "repetition": 0.0, "length gap": 0.5,
                                     "ROUGE-L F1": 0.2}  # 05's loss replaces 04's columns


def test_a_task_the_configuration_turns_off_is_off_not_short_of_data(tmp_path, monkeypatch, capsys):
    """gsm8k_samples: 0 and no data directory: GSM8K is off (not 'skipped, no data') and its data is never read."""
    from qlora_helpers.opening import setup_run

    monkeypatch.delenv("QLORA_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = setup_run("smoke", "off", ["train.wandb=disabled", "data.data_dir=null", "eval.gsm8k_samples=0",
                                     "eval.ifeval_samples=0", "eval.showcase_samples=0", "eval.choice_path=qa.jsonl",
                                     "eval.choice_samples=0", "eval.ifeval_path=no/such-dataset"], str(tmp_path))
    results = {name: evaluate.run_task(name, run, None, None, None)  # no model: nothing of theirs runs
               for name in ("gsm8k", "ifeval", "choice", "showcase", "lm_eval")}
    assert results == {"gsm8k": {"off": "eval.gsm8k_samples is 0"}, "ifeval": {"off": "eval.ifeval_samples is 0"},
                       "choice": {"off": "eval.choice_samples is 0"}, "showcase": {"off": "eval.showcase_samples is 0"},
                       "lm_eval": {"off": "eval.lm_eval_tasks is []"}}
    assert "skipped" not in capsys.readouterr().out
    assert TASKS["choice"].off(load_config("smoke").eval) == "eval.choice_path is null"
    assert evaluate.headline(results["gsm8k"], "exact_match") == "off: eval.gsm8k_samples is 0"
    table = evaluate.task_table(results)
    assert [r["metric"] for r in table] == [
        "off: eval.gsm8k_samples is 0; to run it, set eval.gsm8k_samples above 0",
        "off: eval.ifeval_samples is 0; to run it, set eval.ifeval_samples above 0",
        "off: eval.choice_samples is 0; to run it, set eval.choice_samples above 0",
        "off: eval.showcase_samples is 0; to run it, set eval.showcase_samples above 0",
        "off: eval.lm_eval_tasks is []; to run it, name one or more in eval.lm_eval_tasks"]
    report = evaluate.write_eval_report(run, **results)
    assert report["skipped"] == {} and report["off"]["gsm8k"] == "eval.gsm8k_samples is 0" and report["summary"] == {}
    assert report["samples"] == {}  # an off task has no examples to count (it had 0 listed for choice)


def test_a_task_whose_data_holds_no_examples_says_so_not_configured_away(tmp_path, monkeypatch):
    """The task table called a task with 0 examples 'configured away', a third word beside `off` and
    `skipped` for something the configuration cannot do: a setting that gives a task 0 examples turns
    it off. A task that ran on an empty file says its data held none and what to change; one the
    configuration turns off (choice_path null, the smoke default) says which setting turns it on."""
    from qlora_helpers.opening import setup_run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    empty = tmp_path / "no-questions.jsonl"
    empty.write_text("")
    run = setup_run("smoke", "empty", ["train.wandb=disabled", f"eval.choice_path={empty}"], str(tmp_path))
    result = evaluate.run_task("choice", run, None, None, None)  # no pairs to score: no model is asked
    assert result["questions"] == [] and evaluate.sample_counts({"choice": result}) == {"choice": 0}
    off = {"choice": {"off": TASKS["choice"].off(load_config("smoke").eval)}}
    rows = evaluate.task_table({"choice": result}) + evaluate.task_table(off)
    assert [r["metric"] for r in rows] == [
        "no examples: eval.choice_path held none; point it at data that holds some",
        "off: eval.choice_path is null; to run it, set eval.choice_path to a file or hub id"]
    report = evaluate.write_eval_report(run, choice=result)
    assert report["samples"] == {"choice": 0} and report["off"] == report["skipped"] == {}
