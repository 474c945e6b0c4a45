"""The stage notebooks, executed for real by papermill on the smoke profile."""

import json

import pytest

from qlora_helpers.errors import ConfigError
from qlora_helpers.paths import PROJECT_ROOT
from qlora_helpers.runner import StageFailed, run_pipeline, select_stages

SECRET = "hf_test_secret_must_not_leak_0123456789"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, tiny_dir, data_dir_module):
    import os

    outputs = tmp_path_factory.mktemp("outputs")
    os.environ["HF_TOKEN"] = SECRET
    try:
        path = run_pipeline("smoke", "smoke", stages="01,02,03,04,05", outputs_dir=str(outputs), progress=False)
    finally:
        del os.environ["HF_TOKEN"]
    return path


@pytest.fixture(scope="module")
def data_dir_module():
    from tests.conftest import _data_dir

    if _data_dir() is None:
        pytest.skip("the offline data directory is not here")


def test_stages_01_to_05_write_their_reports(smoke_run):
    config = json.loads((smoke_run / "config.json").read_text())
    assert config["model"]["source"] == "random:tiny"
    env = json.loads((smoke_run / "env.json").read_text())
    assert env["runtime"]["device"] in ("cpu", "cuda") and env["hf_auth"]["token_found"] is True
    report = json.loads((smoke_run / "quantization.json").read_text())
    assert report["footprint"]["quantized_layers"] == 14
    assert report["layer_error_summary"]["nf4_mean"] < report["layer_error_summary"]["fp4_mean"]
    assert set(report["perplexity"]) == {"full", "4bit"}
    assert (smoke_run / "quantization_footprint.png").stat().st_size > 10_000
    data = json.loads((smoke_run / "data" / "data_report.json").read_text())
    assert data["sources"]["alpaca_5000"]["rows"] == 5000 and data["eval"] == 200
    assert (smoke_run / "data" / "train").is_dir() and (smoke_run / "data_lengths.png").is_file()
    assert (smoke_run / "adapter" / "adapter_model.safetensors").is_file()
    assert (smoke_run / "training_curves.png").is_file()
    evaluation = json.loads((smoke_run / "eval.json").read_text())
    assert set(evaluation["summary"]) == {"held-out loss", "perplexity", "ROUGE-L F1", "GSM8K exact match",
                                          "IFEval prompt-level", "IFEval instruction-level"}
    assert evaluation["samples"] == {"loss": 16, "rouge": 4, "gsm8k": 4, "ifeval": 8}
    assert "<table" in (smoke_run / "generations.html").read_text()
    assert (smoke_run / "generations.md").read_text().startswith("| source | prompt | base | tuned |")
    for name in ("01_setup.ipynb", "02_quantize.ipynb", "03_data_prep.ipynb", "04_train.ipynb",
                 "05_evaluate.ipynb"):
        nb = json.loads((smoke_run / "notebooks" / name).read_text())
        assert not nb["metadata"]["papermill"]["exception"], name


def test_the_token_never_reaches_outputs(smoke_run):
    for path in smoke_run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_bad_override_fails_before_any_notebook_runs(tmp_path):
    with pytest.raises(ConfigError, match="Unknown key 'train.nope'"):
        run_pipeline("smoke", "bad", ["train.nope=1"], outputs_dir=str(tmp_path))
    assert not (tmp_path / "bad" / "notebooks").exists()


def test_a_failing_stage_names_notebook_cell_error_and_copy(tmp_path, tiny_dir):
    # 02 without 01: the run was never set up, which the notebook reports as one paragraph
    with pytest.raises(StageFailed) as err:
        run_pipeline("smoke", "no-setup", stages="02", outputs_dir=str(tmp_path), progress=False)
    msg = str(err.value)
    assert "02_quantize.ipynb failed in cell" in msg and "has not been set up" in msg
    copy = tmp_path / "no-setup" / "notebooks" / "02_quantize.ipynb"
    assert str(copy) in msg and copy.is_file()
    outputs = [o for c in json.loads(copy.read_text())["cells"] for o in c.get("outputs", [])
               if o.get("output_type") == "error"]
    assert len(outputs) == 1 and len(outputs[0]["traceback"]) == 1  # one paragraph, no traceback wall


def test_unknown_stage():
    with pytest.raises(Exception, match="Unknown stage"):
        select_stages("01,09")


def test_source_notebooks_are_untouched_by_runs():
    for path in (PROJECT_ROOT / "notebooks").glob("*.ipynb"):
        nb = json.loads(path.read_text())
        assert all(not c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code")
