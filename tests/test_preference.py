"""Stage 04b: preference pairs (three hub layouts, bad rows, own-data pairs) and DPO on the tiny model."""

import json
import math
import os
import time
from pathlib import Path

import pytest

from qlora_helpers.config import PreferenceConfig, PreferenceSourceConfig, load_config
from qlora_helpers.errors import ConfigError, DataError
from qlora_helpers.formats import RowProblem
from qlora_helpers.opening import setup_run
from qlora_helpers.paths import PROJECT_ROOT
from qlora_helpers.preference_data import detect_layout, normalize_pair, parse_transcript
from qlora_helpers.runner import select_stages
from qlora_helpers.runs import STAGES, RunFolder, stage
from qlora_helpers.sources import DataUnavailable, read_records

ASSETS = PROJECT_ROOT / "tests" / "assets" / "data" / "preference"
QUIET = ["train.wandb=disabled", "train.eval_samples=0", "preference.enabled=true"]


def _rows(name: str) -> list[dict]:
    return read_records(ASSETS / f"{name}.jsonl")


def _reasons(rows: list[dict], layout: str) -> list[str | None]:
    out = []
    for row in rows:
        try:
            normalize_pair(row, layout)
            out.append(None)
        except RowProblem as problem:
            out.append(problem.reason)
    return out


# --- layouts and bad rows (no model) ---------------------------------------------------------------


@pytest.mark.parametrize("name, layout", [("pairs", "prompt_chosen_rejected"),
                                          ("messages", "chosen_rejected_messages"),
                                          ("transcripts", "chosen_rejected_transcripts")])
def test_each_hub_layout_is_detected_from_its_columns(name, layout):
    assert detect_layout(_rows(name), PreferenceSourceConfig(path=f"preference/{name}.jsonl"), name) == layout


def test_prompt_chosen_rejected_rows_and_their_bad_rows():
    rows = _rows("pairs")
    assert normalize_pair(rows[0], "prompt_chosen_rejected") == {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "chosen": "The capital of France is Paris.", "rejected": "The capital of France is Atlantis."}
    assert _reasons(rows, "prompt_chosen_rejected")[-3:] == ["missing_chosen", "identical", "empty_prompt"]
    assert _reasons(rows, "prompt_chosen_rejected")[:-3] == [None] * 24


def test_message_list_rows_share_their_prompt_or_are_dropped():
    rows = _rows("messages")
    pair = normalize_pair(rows[0], "chosen_rejected_messages")
    assert pair["messages"] == [{"role": "system", "content": "Answer briefly."},
                                {"role": "user", "content": "Which city is the capital of France?"}]
    assert pair["chosen"] == "Paris." and pair["rejected"].startswith("Well, that is a question.")
    assert _reasons(rows, "chosen_rejected_messages") == [None] * 8 + ["prompts_differ", "identical"]
    # TRL's conversational form: a prompt message list and one-message answers
    explicit = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "5"}]}
    assert normalize_pair(explicit, "chosen_rejected_messages")["messages"] == explicit["prompt"]


def test_transcripts_split_at_the_shared_prefix_like_hh_rlhf():
    rows = _rows("transcripts")
    pair = normalize_pair(rows[0], "chosen_rejected_transcripts")
    assert [m["role"] for m in pair["messages"]] == ["user", "assistant", "user"]
    assert pair["messages"][-1]["content"] == "What is its capital?"
    assert pair["chosen"] == "The capital of France is Paris."
    assert _reasons(rows, "chosen_rejected_transcripts") == [None] * 8 + ["missing_rejected", "bad_transcript"]
    assert parse_transcript("Human: hi\n\nAssistant: hello") == [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "hello"}]


def test_an_unknown_layout_names_the_file_and_the_columns():
    with pytest.raises(DataError, match=r"prefs\.jsonl: cannot tell the preference layout from the columns "
                                        r"\['answer', 'question'\].*preference\.sources\[\]\.columns"):
        detect_layout([{"question": "q", "answer": "a"}], PreferenceSourceConfig(path="prefs.jsonl"), "prefs.jsonl")


# --- config and the stage table ------------------------------------------------------------------


def test_the_preference_section_is_off_by_default_and_validated():
    assert load_config("default").preference.enabled is False
    cfg = load_config("default", ["preference.enabled=true"])
    assert cfg.preference.enabled and cfg.preference.method == "dpo" and cfg.preference.sources == []
    with pytest.raises(ConfigError, match=r"'preference\.beta' is 0\.0: it must be > 0"):
        load_config("default", ["preference.beta=0"])
    with pytest.raises(ConfigError, match=r"'preference\.sft_weight' is -1\.0: it must be >= 0"):
        load_config("default", ["preference.sft_weight=-1"])
    with pytest.raises(ConfigError, match=r"preference\.method = 'ppo' is invalid: expected one of 'dpo'"):
        load_config("default", ["preference.method=ppo"])
    with pytest.raises(ConfigError, match=r"Unknown key 'preference\.sources\[0\]\.colums'.*Did you mean 'columns'"):
        load_config("default", ["preference.sources=[{path: a.jsonl, colums: {}}]"])


def test_sft_weight_adds_trls_sft_loss_to_the_sigmoid_loss(tmp_path):
    from trl import DPOConfig

    from qlora_helpers.preference import dpo_settings

    plain = setup_run("smoke", "plain", QUIET, str(tmp_path))
    assert DPOConfig(**dpo_settings(plain)).loss_type == ["sigmoid"]  # smoke: plain DPO, TRL's default
    mixed = DPOConfig(**dpo_settings(setup_run("smoke", "rpo", [*QUIET, "preference.sft_weight=0.5"], str(tmp_path))))
    assert mixed.loss_type == ["sigmoid", "sft"] and mixed.loss_weights == [1.0, 0.5]
    assert load_config("default").preference.sft_weight == 1.0  # what the default profile measured (its comment)


def test_stage_04b_runs_between_04_and_05_only_when_enabled():
    assert [s.number for s in STAGES] == ["01", "02", "03", "04", "04b", "05", "06"]
    assert stage("4b") is stage("04b")
    assert [s.number for s in select_stages("4b,05")] == ["04b", "05"]
    assert not stage("04b").applies(load_config("default"))
    assert stage("04b").applies(load_config("default", ["preference.enabled=true"]))
    assert all(s.applies(load_config("default")) for s in STAGES if s.number != "04b")


def _adapter(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")


def test_the_final_adapter_is_the_newest_complete_one(tmp_path):
    run = RunFolder(tmp_path)
    _adapter(run.adapter_dir)
    assert run.final_adapter_stage == "04" and run.require_adapter() == run.adapter_dir
    _adapter(run.preference_adapter_dir)
    assert run.final_adapter_stage == "04b" and run.require_adapter() == run.preference_adapter_dir
    assert run.require_adapter(final=False) == run.adapter_dir
    later = time.time_ns() + 10**9  # stage 04 retrained after 04b: the preference adapter is stale
    os.utime(run.adapter_dir / "adapter_config.json", ns=(later, later))
    assert run.final_adapter_stage == "04"


# --- sources and own-data pairs on the tiny model's tokenizer ----------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def _load(tokenizer, *sources, **settings):
    from qlora_helpers.config import DataConfig
    from qlora_helpers.preference_data import load_preference_sources

    pref = PreferenceConfig(sources=list(sources), **settings)
    return load_preference_sources(pref, DataConfig(data_dir="tests/assets/data"), tokenizer)


def test_the_three_files_load_with_a_report_of_kept_and_dropped_rows(tokenizer):
    pairs, report = _load(tokenizer, *(PreferenceSourceConfig(path=f"preference/{n}.jsonl")
                                       for n in ("pairs", "messages", "transcripts")))
    assert len(pairs) == report["kept"] == 40
    assert {n: (s["format"], s["rows"], s["kept"]) for n, s in report["sources"].items()} == {
        "pairs": ("prompt_chosen_rejected", 27, 24), "messages": ("chosen_rejected_messages", 10, 8),
        "transcripts": ("chosen_rejected_transcripts", 10, 8)}
    assert report["dropped"] == {"missing_chosen": 1, "identical": 2, "empty_prompt": 1, "prompts_differ": 1,
                                 "missing_rejected": 1, "bad_transcript": 1}
    assert report["dropped_examples"]["missing_chosen"] == [{"source": "pairs", "row": 25, "detail": "no 'chosen'"}]
    # prompts are rendered with the run's template (Alpaca here), as stage 03 renders its own
    assert pairs[0]["prompt"].endswith("### Instruction:\nWhat is the capital of France?\n\n### Response:\n")


def test_pairs_longer_than_max_length_are_dropped_not_cut(tokenizer):
    from qlora_helpers.preference_data import pair_tokens

    src = PreferenceSourceConfig(path="preference/pairs.jsonl")
    pairs, _ = _load(tokenizer, src)
    lengths = sorted(pair_tokens(tokenizer, p["prompt"], p["chosen"], "alpaca") for p in pairs)
    limit = lengths[len(lengths) // 2]
    kept, report = _load(tokenizer, src, max_length=limit)
    assert report["dropped"]["too_long"] == sum(n > limit for n in lengths) == 24 - len(kept) > 0
    assert all(p["chosen"] in {q["chosen"] for q in pairs} for p in kept)  # whole answers, never cut


def test_an_unreachable_hub_source_falls_back_only_when_allowed(tokenizer):
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"  # conftest: no test reaches a hub
    hub = PreferenceSourceConfig(path="Anthropic/hh-rlhf")
    assert _load(tokenizer, hub) is None  # prepare_pairs then builds pairs from the run's own data
    with pytest.raises(DataUnavailable, match="Anthropic/hh-rlhf"):
        _load(tokenizer, hub, fallback=False)
    with pytest.raises(DataUnavailable, match="missing.jsonl does not exist"):
        _load(tokenizer, PreferenceSourceConfig(path="preference/missing.jsonl"))


# --- DPO on the tiny model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_dir):
    """A smoke run with an SFT adapter (stages 01, 03, 04)."""
    outputs = tmp_path_factory.mktemp("preference-outputs")
    run = setup_run("smoke", "dpo", [*QUIET, "train.max_steps=2", "preference.sources=[{path: preference/pairs.jsonl}]",
                                     "preference.max_steps=8", "preference.learning_rate=5e-3",
                                     "preference.eval_pairs=8", "preference.micro_batch_size=2"], str(outputs))
    for number in ("03", "04"):
        stage(number).run(run)
    return run


def test_own_data_pairs_are_the_reference_against_the_models_greedy_answer(sft_run):
    from qlora_helpers.decoding import generate_answers
    from qlora_helpers.preference import load_policy_model
    from qlora_helpers.preference_data import _Report, build_own_pairs, own_candidates
    from qlora_helpers.prepared import load_prepared
    from qlora_helpers.prompts import encode_text

    model, tokenizer = load_policy_model(sft_run)
    pref = PreferenceConfig(answer_tokens=12)
    examples = own_candidates(load_prepared(sft_run).train, 4, pref.answer_tokens, seed=0)
    assert len(examples) == 4
    prompt_ids = encode_text("alpaca", tokenizer, examples[0]["prompt"])
    greedy = generate_answers(model, tokenizer, [prompt_ids], pref.answer_tokens)[0].text
    examples[0] = {**examples[0], "response": greedy}  # an example the model already answers as the reference
    report = _Report()
    pairs = build_own_pairs(model, tokenizer, examples, pref, 4, report, "own", "alpaca")
    assert [p["row"] for p in pairs] == [e["row"] for e in examples[1:]]
    assert all(p["chosen"] == e["response"] and p["rejected"] != e["response"] for p, e in zip(pairs, examples[1:]))
    source = report.to_dict()["sources"]["own"]
    assert source["rejected_is"] == "the SFT model's greedy answer" and source["dropped"] == {"identical": 1}


@pytest.fixture(scope="module")
def preferred(sft_run):
    return stage("04b").run(sft_run)


def test_dpo_moves_the_preference_and_saves_the_final_adapter(sft_run, preferred):
    rows = preferred["training"]
    assert len(rows) == 8 and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in rows)
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy == reference at the start
    assert rows[-1]["rewards/margins"] > 0 and rows[-1]["loss"] < rows[0]["loss"]
    acc = preferred["accuracy"]
    assert acc["after"] > acc["before"] and acc["difference"]["n"] == 8
    per_token = preferred["accuracy_per_token"]  # the length-blind margin, reported beside the summed one
    assert per_token["difference"]["n"] == 8 and 0 <= per_token["before"] <= 1 and 0 <= per_token["after"] <= 1
    assert preferred["pairs"] == {"train": 16, "eval": 8, "origin": "preference.sources"}
    saved = sorted(p.name for p in sft_run.preference_adapter_dir.iterdir())
    assert "adapter_model.safetensors" in saved and "ref" not in saved  # the policy alone, not the reference
    assert sft_run.final_adapter_stage == "04b"
    recorded = json.loads(sft_run.stages_file.read_text())
    assert list(recorded["stages"]) == ["03", "04", "04b"] and recorded["final_adapter"] == "04b"


def test_three_way_comparison_scores_base_sft_and_dpo_on_the_same_pairs(sft_run, preferred):
    from qlora_helpers.preference import answers_three_way, compare_three_way, load_three_way_model

    model, tokenizer = load_three_way_model(sft_run)
    pairs = json.loads(sft_run.preference_pairs.read_text())["eval"]
    result = compare_three_way(sft_run, model, tokenizer, pairs)  # given pairs: all three scored here
    assert result["pairs"] == 8 and set(result["accuracy"]) == {"base", "sft", "sft+dpo"}
    assert result["accuracy"]["sft"] == pytest.approx(preferred["accuracy"]["before"])
    assert result["accuracy"]["sft+dpo"] == pytest.approx(preferred["accuracy"]["after"])
    assert result["differences"]["sft -> sft+dpo"]["difference"] == pytest.approx(
        preferred["accuracy"]["difference"]["difference"])
    reused = compare_three_way(sft_run, model, tokenizer)  # 04b's pairs: its SFT and SFT+DPO margins are reused
    assert reused["accuracy"] == pytest.approx(result["accuracy"]) and reused["pairs"] == 8
    answers = answers_three_way(sft_run, model, tokenizer, pairs, n=2, seed=0)
    assert len(answers) == 2 and set(answers[0]) == {"prompt", "chosen", "base", "sft", "sft+dpo"}


def test_05_compares_the_three_on_preference_accuracy_and_the_answer_metrics(sft_run, preferred):
    from qlora_helpers.answers import run_answers
    from qlora_helpers.preference import (
        answer_metrics_three_way,
        evaluate_three_way,
        load_three_way_model,
        reusable_answers,
    )

    model, tokenizer = load_three_way_model(sft_run)
    result = evaluate_three_way(sft_run, model, tokenizer)
    steps = result["preference"]["differences"]
    assert [r["step"] for r in steps] == ["sft -> sft+dpo", "base -> sft", "base -> sft+dpo"]
    assert steps[0]["before"] == pytest.approx(preferred["accuracy"]["before"])
    assert steps[0]["after"] == pytest.approx(preferred["accuracy"]["after"])
    assert steps[0]["n"] == 8 and steps[0]["low"] <= steps[0]["difference"] <= steps[0]["high"]
    answers, cfg = result["answers"], sft_run.cfg.eval
    assert answers["examples"] == cfg.answer_samples and set(answers["means"]) == {"base", "sft", "sft+dpo"}
    assert [r["metric"] for r in answers["differences"] if r["step"] == "sft -> sft+dpo"] == [
        "clean stop", "repetition", "length gap", "ROUGE-L F1"]  # not the built-in data: no exact match
    # the same examples and decoding as 05's answer task: its base and tuned are this base and SFT+DPO
    single = run_answers(sft_run, model, tokenizer, cfg.answer_samples, cfg.answer_batch_size, cfg.answer_tokens)
    assert single["base"]["outputs"] == answers["outputs"]["base"]
    assert single["tuned"]["outputs"] == answers["outputs"]["sft+dpo"]
    # so 05 passes that result in and only the SFT adapter answers again: the same metrics, less time
    again = answer_metrics_three_way(sft_run, model, tokenizer, known=single)
    assert again["outputs"] == answers["outputs"] and again["means"] == answers["means"]
    marked = {**single, "base": {**single["base"], "outputs": ["reused"] + single["base"]["outputs"][1:]}}
    assert answer_metrics_three_way(sft_run, model, tokenizer, known=marked)["outputs"]["base"][0] == "reused"
    prompts = single["prompts"]  # answered otherwise: generated again, never mixed in
    assert reusable_answers(single, prompts, cfg.answer_tokens + 1, cfg.answer_batch_size) == {}
    assert reusable_answers(single, prompts[1:], cfg.answer_tokens, cfg.answer_batch_size) == {}
    assert reusable_answers(None, prompts, cfg.answer_tokens, cfg.answer_batch_size) == {}


def _copy_sft_run(run, dest: Path, **preference) -> Path:
    """A copy of `run` up to its SFT adapter (settings, data, adapter), with preference.* changed."""
    import shutil

    dest.mkdir(parents=True)
    for part in ("env.json", "data", "adapter"):
        (shutil.copytree if (run.path / part).is_dir() else shutil.copy2)(run.path / part, dest / part)
    config = json.loads(run.config_file.read_text())
    config["preference"].update(preference)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_an_interrupted_04b_resumes_from_its_checkpoint_to_the_same_adapter(sft_run, tmp_path, capsys):
    from safetensors.torch import load_file
    from torch.testing import assert_close
    from transformers import TrainerCallback

    from qlora_helpers.errors import QLoraError
    from qlora_helpers.opening import open_run
    from qlora_helpers.preference import (
        build_dpo_trainer,
        check_reference,
        load_policy_model,
        prepare_run_pairs,
        resolve_preference_resume,
        run_preference,
    )

    class CtrlCAfterStep5(TrainerCallback):  # once step 5 is logged (a Ctrl-C before that loses its log line)
        def on_log(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise KeyboardInterrupt

    for name in ("straight", "cut"):
        _copy_sft_run(sft_run, tmp_path / name, save_steps=4, sft_weight=1.0)  # the default profile's loss
    straight = stage("04b").run(open_run("straight", str(tmp_path)))
    assert straight["resumed_from"] is None and straight["steps"] == 8
    assert straight["training"][0]["loss"] > math.log(2) + 0.1  # DPO's log 2 plus the chosen answers' NLL

    run = open_run("cut", str(tmp_path))
    model, tokenizer = load_policy_model(run)
    pairs = prepare_run_pairs(run, model, tokenizer)
    trainer = build_dpo_trainer(run, model, tokenizer, pairs["train"])
    check_reference(trainer)
    trainer.add_callback(CtrlCAfterStep5())
    with pytest.raises(QLoraError, match=r"^Preference tuning interrupted at step 5; a checkpoint was saved\."):
        run_preference(run, trainer, tokenizer, pairs)
    assert not run.has_preference_adapter and resolve_preference_resume(run).endswith("checkpoint-5")
    del trainer, model

    resumed = stage("04b").run(run)
    assert resumed["resumed_from"].endswith("checkpoint-5") and resumed["steps"] == 8
    assert [r["step"] for r in resumed["training"]] == list(range(1, 9))  # the log of steps 1-5 came back too
    a = load_file(tmp_path / "straight" / "adapter_preference" / "adapter_model.safetensors")
    b = load_file(run.preference_adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    out = capsys.readouterr().out
    assert f"Preference tuning resumes from {resumed['resumed_from']} at step 5 of 8" in out
    # run again on the finished run: it resumes from checkpoint-8, and says that nothing was trained
    again = stage("04b").run(run)
    assert again["resumed_from"].endswith("checkpoint-8") and again["training"] == resumed["training"]
    assert ("which already reached step 8 of 8: nothing is left to train, and the adapter saved is that "
            "checkpoint's. To train again from the start, set preference.resume=never") in capsys.readouterr().out
    # a checkpoint older than the SFT adapter belongs to another SFT adapter: never resumed from
    os.utime(run.adapter_dir / "adapter_config.json", ns=(time.time_ns() + 10**9,) * 2)
    assert resolve_preference_resume(run) is None


@pytest.mark.integration
def test_the_notebook_runs_under_papermill_when_the_profile_enables_it(tmp_path, tiny_dir):
    from qlora_helpers.runner import run_pipeline

    overrides = [*QUIET, "preference.sources=[{path: preference/pairs.jsonl}]", "preference.learning_rate=5e-3"]
    path = run_pipeline("smoke", "nb", overrides, stages="01,03,04,04b", outputs_dir=str(tmp_path),
                        progress=False)
    report = json.loads((path / "preference.json").read_text())
    assert report["steps"] == 4 and report["pairs"]["origin"] == "preference.sources"
    assert (path / "preference_margins.png").stat().st_size > 10_000
    executed = json.loads((path / "notebooks" / "04b_preference.ipynb").read_text())
    assert all(c.get("outputs") for c in executed["cells"] if c["cell_type"] == "code" and
               "parameters" not in c["metadata"].get("tags", []) and "injected-parameters" not in
               c["metadata"].get("tags", []))
    stages = json.loads((path / "stages.json").read_text())
    assert list(stages["stages"]) == ["01", "03", "04", "04b"] and stages["final_adapter"] == "04b"
    assert RunFolder(path).require_adapter() == path / "adapter_preference"  # what 05 and 06 load
    # without the setting the runner leaves 04b out
    plain = run_pipeline("smoke", "plain", [*QUIET[:2]], stages="01,04b", outputs_dir=str(tmp_path), progress=False)
    assert list(json.loads((plain / "stages.json").read_text())["stages"]) == ["01"]
