"""Stages 04, 04b and 05 read the sets 03 saved only when 03 prepared them for the run's data settings
as they resolve now (`prepared.load_prepared`): rerunning 01 with other data settings, or a 03 that
failed on new data, left config.json naming one data set while 04 silently trained on another."""

import json
import shutil

import pytest

from qlora_helpers.errors import DataError
from qlora_helpers.opening import setup_run
from qlora_helpers.paths import PROJECT_ROOT
from qlora_helpers.prepared import load_prepared
from qlora_helpers.runs import stage

ASSETS = PROJECT_ROOT / "tests" / "assets" / "data"
QUIET = ["train.wandb=disabled"]


def test_sets_prepared_for_other_data_settings_are_refused_until_03_reruns(tmp_path, tiny_dir):
    run = setup_run("smoke", "s", QUIET, str(tmp_path))
    stage("03").run(run)
    assert len(load_prepared(run).eval) == 16
    run = setup_run("smoke", "s", [*QUIET, "data.eval_size=10"], str(tmp_path))  # 01 again, 03 not (yet)
    for load in (lambda: load_prepared(run), lambda: stage("04").run(run)):
        with pytest.raises(DataError, match=rf"(?s)The sets in {run.data_dir} were prepared for other data "
                                            r"settings.*data.eval_size: now 10, the sets have 16.*Rerun stage 03.*"
                                            r"run_name='s'"):
            load()
    assert not run.adapter_dir.exists()  # 04 stopped before training
    stage("03").run(run)
    assert len(load_prepared(run).eval) == 10


def test_an_edited_file_or_a_trained_run_say_so(tmp_path, tiny_dir):
    data = tmp_path / "data"
    data.mkdir()
    rows = json.loads((ASSETS / "instructions.json").read_text())
    (data / "mine.json").write_text(json.dumps(rows))
    settings = [*QUIET, f"data.data_dir={data}", "data.sources=[{path: mine.json}]"]
    run = setup_run("smoke", "e", settings, str(tmp_path / "out"))
    stage("03").run(run)
    (data / "mine.json").write_text(json.dumps(rows[:80]))  # edited after 03
    with pytest.raises(DataError, match=rf"(?s){data / 'mine.json'} changed since.*Rerun stage 03"):
        load_prepared(run)
    stage("03").run(run)
    load_prepared(run)
    run.checkpoints_dir.mkdir()  # 04 has trained on these sets: 03 would refuse to replace them, and so this says
    run = setup_run("smoke", "e", [*settings, "data.eval_size=12"], str(tmp_path / "out"))
    with pytest.raises(DataError, match=r"(?s)holds the sets this run's adapter was trained on.*data.eval_size: "
                                        r"now 12, the sets have 16.*start a new run"):
        load_prepared(run)


def test_the_check_gives_the_answer_03_gave_where_the_hub_is_out_of_reach(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("QLORA_DATA_DIR", raising=False)
    hub = [*QUIET, "data.data_dir=null", "data.sources=[{path: tatsu-lab/alpaca}]", "data.eval_size=16"]
    run = setup_run("smoke", "h", hub, str(tmp_path / "out"))
    stage("03").run(run)  # no offline copy: the built-in data stands in
    assert load_prepared(run).report["builtin_fallback"]  # the same environment: the same answer, reuse
    copy = tmp_path / "copy"
    (copy / "alpaca").mkdir(parents=True)
    shutil.copy(ASSETS / "instructions.json", copy / "alpaca" / "alpaca_5000.json")
    monkeypatch.setenv("QLORA_DATA_DIR", str(copy))  # now 03 would read the offline copy instead
    with pytest.raises(DataError, match=r"(?s)prepared for other data settings.*data.sources: now .*tatsu-lab/alpaca"
                                        r".*the sets have .*builtin"):
        load_prepared(run)


def test_a_stage_that_fails_is_recorded_as_failed_not_as_its_earlier_success(tmp_path, tiny_dir):
    from qlora_helpers.runner import StageFailed, run_pipeline

    data = tmp_path / "data"
    data.mkdir()
    (data / "empty.json").write_text(json.dumps([{"instruction": "", "output": ""}] * 4))
    out = str(tmp_path / "out")
    path = run_pipeline("smoke", "f", QUIET, stages="01,03", outputs_dir=out, progress=False)
    bad = [*QUIET, f"data.data_dir={data}", "data.sources=[{path: empty.json}]"]
    with pytest.raises(StageFailed, match="No usable training examples"):
        run_pipeline("smoke", "f", bad, stages="01,03", outputs_dir=out, progress=False)
    recorded = json.loads((path / "stages.json").read_text())["stages"]
    assert "finished" in recorded["01"] and "finished" not in recorded["03"]
    assert recorded["03"]["error"].startswith("DataError: No usable training examples")
    run = setup_run("smoke", "f", QUIET, out)
    stage("03").run(run)  # without notebooks (the train command) the same
    assert "finished" in json.loads(run.stages_file.read_text())["stages"]["03"]
    run = setup_run("smoke", "f", bad, out)
    with pytest.raises(DataError):
        stage("03").run(run)
    assert json.loads(run.stages_file.read_text())["stages"]["03"]["error"].startswith("DataError: No usable")
