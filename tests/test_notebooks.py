"""The stage notebooks, executed for real by papermill on the smoke profile."""

import json

import pytest

from qlora_helpers.errors import ConfigError, QLoraError
from qlora_helpers.paths import PROJECT_ROOT
from qlora_helpers.runner import StageFailed, run_pipeline, select_stages
from qlora_helpers.runs import STAGES
from qlora_helpers.serve.gguf import gguf_available
from qlora_helpers.sources import DataUnavailable

SECRET = "hf_test_secret_must_not_leak_0123456789"
API_KEY = "serve_test_key_must_not_leak_9876543210"


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, tiny_dir):
    import os

    outputs = tmp_path_factory.mktemp("outputs")
    os.environ["HF_TOKEN"] = SECRET
    os.environ["QLORA_TEST_API_KEY"] = API_KEY  # 06's server asks for it (serve.api_key_env)
    try:
        path = run_pipeline("smoke", "smoke", ["serve.api_key_env=QLORA_TEST_API_KEY"],
                            stages="01,02,03,04,05,06", outputs_dir=str(outputs), progress=False)
    finally:
        del os.environ["HF_TOKEN"], os.environ["QLORA_TEST_API_KEY"]
    return path


def test_stages_01_to_06_write_their_reports(smoke_run):
    config = json.loads((smoke_run / "config.json").read_text())
    assert config["model"]["source"] == "random:tiny"
    env = json.loads((smoke_run / "env.json").read_text())
    assert env["runtime"]["device"] in ("cpu", "cuda") and env["hf_auth"]["token_found"] is True
    report = json.loads((smoke_run / "quantization.json").read_text())
    assert report["footprint"]["quantized_layers"] == 14
    assert report["layer_error_summary"]["nf4_mean"] < report["layer_error_summary"]["fp4_mean"]
    # recorded on the smoke profile (CPU, fp32 compute); update deliberately when a stage changes
    assert {k: v["loss"] for k, v in report["perplexity"].items()} == pytest.approx(
        {"full": 10.849954, "4bit": 10.851527}, abs=1e-3)
    assert report["perplexity_ratio_4bit_vs_full"] == pytest.approx(1.00157, abs=1e-3)
    assert (smoke_run / "quantization_footprint.png").stat().st_size > 10_000
    data = json.loads((smoke_run / "data" / "data_report.json").read_text())
    assert data["sources"]["instructions"]["rows"] == 96 and data["eval"] == 16  # tests/assets/data
    assert (smoke_run / "data" / "train").is_dir() and (smoke_run / "data_lengths.png").is_file()
    assert (smoke_run / "adapter" / "adapter_model.safetensors").is_file()
    assert (smoke_run / "training_curves.png").is_file()
    evaluation = json.loads((smoke_run / "eval.json").read_text())
    assert set(evaluation["summary"]) == {"held-out loss", "perplexity", "clean stop", "repetition", "length gap",
                                          "ROUGE-L F1", "GSM8K exact match", "IFEval prompt-level",
                                          "IFEval instruction-level"}  # no exact match: not the built-in data
    assert evaluation["samples"] == {"loss": 16, "answers": 4, "gsm8k": 4, "ifeval": 8}
    summary = evaluation["summary"]
    assert summary["held-out loss"] == pytest.approx({"base": 10.853419, "tuned": 10.851496}, abs=1e-3)
    assert summary["held-out loss"]["tuned"] < summary["held-out loss"]["base"]
    assert summary["ROUGE-L F1"] == summary["GSM8K exact match"] == {"base": 0.0, "tuned": 0.0}
    assert summary["IFEval prompt-level"] == {"base": 0.375, "tuned": 0.25}  # 3 and 2 of 8 prompts
    assert [d["metric"] for d in evaluation["differences"]] == list(summary)  # assembled in evaluate
    assert all(0 <= summary[m][side] <= 1 for m in ("clean stop", "repetition") for side in ("base", "tuned"))
    assert (smoke_run / "eval_answers.png").is_file() and "three_way" not in evaluation  # 04b did not run
    assert "<table" in (smoke_run / "generations.html").read_text()
    assert (smoke_run / "generations.md").read_text().startswith("| source | prompt | base | tuned |")
    for name in ("01_setup.ipynb", "02_quantize.ipynb", "03_data_prep.ipynb", "04_train.ipynb",
                 "05_evaluate.ipynb", "06_serve.ipynb"):
        nb = json.loads((smoke_run / "notebooks" / name).read_text())
        assert not nb["metadata"]["papermill"]["exception"], name


def test_stage_06_merges_serves_and_stops(smoke_run):
    merge = json.loads((smoke_run / "merge.json").read_text())
    assert merge["merged_vs_adapter_logits"]["max_abs"] < 1e-4
    assert (smoke_run / "merged" / "model.safetensors").is_file()
    assert "--enable-lora" in (smoke_run / "serve_commands.md").read_text()
    smoke = json.loads((smoke_run / "serve_smoke.json").read_text())
    gguf = gguf_available()  # with the [gguf] extra, 06 on a CPU serves the GGUF through llama.cpp
    assert smoke["passed"] == smoke["total"] == 12 and smoke["form"] == ("gguf" if gguf else "merged")
    assert any(c["check"] == "wrong API key refused" for c in smoke["checks"])
    load = json.loads((smoke_run / "serve_load.json").read_text())
    assert load["ok"] == load["requests"] == 32 and load["streaming"] == 16 and not load["problems"]
    latency = json.loads((smoke_run / "latency.json").read_text())
    forms = ["adapter", "merged"] + (["gguf-q8_0", "gguf-f16", "gguf-q4_k_m"] if gguf else [])
    assert [(r["form"], r["batch"]) for r in latency["forms"]] == [(f, b) for f in forms for b in (1, 4)]
    gate = json.loads((smoke_run / "export.json").read_text())
    assert gate["passed"] and [f["form"] for f in gate["forms"]] == ["adapter", "merged"] + forms[2:]
    assert (smoke_run / "gguf" / "Modelfile").is_file() == gguf
    # every timed row generated exactly serve.bench_tokens (8 in smoke); the timings themselves belong to
    # benchmarks/, not to a test
    assert [(r["new_tokens"], r["rows_stopped_early"]) for r in latency["forms"]] == [(8, 0)] * len(forms) * 2
    # recorded: greedy on the smoke model never meets EOS, so all 32 requests give their 6 tokens
    assert [(r["completion_tokens"], r["finish_reason"]) for r in load["per_request"]] == [(6, "length")] * 32
    logs = list((smoke_run / "serve").glob("server-*.log"))
    assert len(logs) == 1 and "Finished server process" in logs[0].read_text()  # 06 stopped its server


def test_the_token_never_reaches_outputs(smoke_run):
    for path in smoke_run.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert SECRET.encode() not in data and API_KEY.encode() not in data, path


def test_bad_override_fails_before_any_notebook_runs(tmp_path):
    with pytest.raises(ConfigError, match="Unknown key 'train.nope'"):
        run_pipeline("smoke", "bad", ["train.nope=1"], outputs_dir=str(tmp_path))
    assert not (tmp_path / "bad" / "notebooks").exists()


def test_training_data_that_cannot_be_read_fails_before_any_notebook_runs(tmp_path, monkeypatch):
    # the default profile's Alpaca, with the hub out of reach, no offline copy, and the built-in data
    # refused (data.builtin_fallback=false; by default the run trains on it: tests/test_builtin_data.py)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("QLORA_DATA_DIR", raising=False)
    with pytest.raises(DataUnavailable) as err:
        run_pipeline("default", "no-data", ["data.builtin_fallback=false"], outputs_dir=str(tmp_path), progress=False)
    assert str(err.value).startswith("Nothing was run: 02_quantize.ipynb and 03_data_prep.ipynb read the "
                                     "training data (data.sources). Cannot load hub dataset 'tatsu-lab/alpaca' "
                                     "(HF_HUB_OFFLINE is set)")
    assert "set QLORA_DATA_DIR to a folder holding alpaca/alpaca_5000.json" in str(err.value)
    assert not (tmp_path / "no-data").exists()
    # a file source that is missing, named with the setting it came from
    with pytest.raises(DataUnavailable, match=r"Nothing was run: 03_data_prep.ipynb read .* Data file .*nope\.json "
                                              r"does not exist \(from 'nope\.json'\)"):
        run_pipeline("smoke", "no-file", ["data.sources=[{path: nope.json}]"], stages="03",
                     outputs_dir=str(tmp_path), progress=False)


def test_a_failing_stage_names_notebook_cell_error_and_copy(tmp_path, tiny_dir):
    # 02 without 01: the run was never set up, which the runner says before any notebook starts
    with pytest.raises(QLoraError, match="has not been set up.*include stage 01"):
        run_pipeline("smoke", "no-setup", stages="02", outputs_dir=str(tmp_path), progress=False)
    assert not (tmp_path / "no-setup" / "notebooks").exists()
    # 05 on a run without an adapter: the notebook reports it as one paragraph
    run_pipeline("smoke", "no-adapter", stages="01", outputs_dir=str(tmp_path), progress=False)
    with pytest.raises(StageFailed) as err:
        run_pipeline("smoke", "no-adapter", stages="05", outputs_dir=str(tmp_path), progress=False)
    msg = str(err.value)
    assert "05_evaluate.ipynb failed in cell" in msg and "adapter" in msg
    copy = tmp_path / "no-adapter" / "notebooks" / "05_evaluate.ipynb"
    assert str(copy) in msg and copy.is_file()
    outputs = [o for c in json.loads(copy.read_text())["cells"] for o in c.get("outputs", [])
               if o.get("output_type") == "error"]
    assert len(outputs) == 1 and len(outputs[0]["traceback"]) == 1  # one paragraph, no traceback wall


def test_unknown_stage():
    with pytest.raises(QLoraError, match=r"^Unknown stage\(s\) 09; available: 01, 02, 03, 04, 04b, 05, 06\.$"):
        select_stages("01,09")
    assert [s.number for s in select_stages("4,01")] == ["01", "04"]


def test_source_notebooks_are_untouched_by_runs(smoke_run):
    """After the smoke run (the fixture) executed all six, their executed copies hold outputs and the
    sources still hold none (04b, off in the smoke profile, is checked by tests/test_preference.py)."""
    sources = sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb"))
    assert [p.name for p in sources] == [s.notebook for s in STAGES]
    for path in sources:
        if path.name == "04b_preference.ipynb":
            continue
        executed = json.loads((smoke_run / "notebooks" / path.name).read_text())
        assert any(c.get("outputs") for c in executed["cells"] if c["cell_type"] == "code"), path.name
        nb = json.loads(path.read_text())
        assert all(not c.get("outputs") and c.get("execution_count") is None
                   for c in nb["cells"] if c["cell_type"] == "code"), path.name


def _cell_text(nb: dict) -> str:
    return "".join(o.get("text", "") if isinstance(o.get("text"), str) else "".join(o.get("text", []))
                   for c in nb["cells"] for o in c.get("outputs", []))


def test_papermill_run_directly_never_waits_for_a_login(tmp_path, tiny_dir, monkeypatch):
    """`papermill` without our runner (no QLORA_HEADLESS), no token, a gated hub model, and a hub
    that accepts connections but never answers: 01 must finish and say what to do in one line."""
    import socket

    import papermill

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "QLORA_HEADLESS", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no cached login
    silent_hub = socket.create_server(("127.0.0.1", 0))  # connects, never replies: a login would hang
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent_hub.getsockname()[1]}")
    out = tmp_path / "01_setup.ipynb"
    try:
        papermill.execute_notebook(str(PROJECT_ROOT / "notebooks" / "01_setup.ipynb"), str(out),
                                   parameters={"config": "smoke", "run_name": "direct",
                                               "overrides": ["model.source=meta-llama/Llama-2-7b-hf"],
                                               "outputs_dir": str(tmp_path)},
                                   cwd=str(PROJECT_ROOT / "notebooks"), kernel_name="python3",
                                   progress_bar=False, execution_timeout=300)
    finally:
        silent_hub.close()
    text = _cell_text(json.loads(out.read_text()))
    line = next(row for row in text.splitlines() if "Hugging Face token" in row)
    assert line.startswith("No Hugging Face token (batch run, so no login box): set HF_TOKEN")
    assert (tmp_path / "direct" / "env.json").is_file()


def test_papermill_runs_01_on_the_smoke_profile_as_it_is(tmp_path, tiny_dir, monkeypatch):
    """The notebook's own defaults but the profile, run by plain papermill: no login question."""
    import papermill

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "QLORA_HEADLESS"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "01_setup.ipynb"
    papermill.execute_notebook(str(PROJECT_ROOT / "notebooks" / "01_setup.ipynb"), str(out),
                               parameters={"config": "smoke", "outputs_dir": str(tmp_path)},
                               cwd=str(PROJECT_ROOT / "notebooks"), kernel_name="python3",
                               progress_bar=False, execution_timeout=300)
    text = _cell_text(json.loads(out.read_text()))
    assert "model.source=random:tiny loads without a Hugging Face token." in text
    assert "(not Colab: nothing to install)" in text


@pytest.mark.integration  # starts a notebook kernel
def test_a_bad_override_in_01s_parameters_is_named_as_that_parameter(tmp_path):
    """Run directly (Jupyter, plain papermill), 01's bad `overrides` value was blamed on a --set."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    with pytest.raises(PapermillExecutionError) as err:
        papermill.execute_notebook(str(PROJECT_ROOT / "notebooks" / "01_setup.ipynb"), str(tmp_path / "01.ipynb"),
                                   parameters={"config": "smoke", "run_name": "bad", "overrides": ["lora.r=0"],
                                               "outputs_dir": str(tmp_path)},
                                   cwd=str(PROJECT_ROOT / "notebooks"), kernel_name="python3",
                                   progress_bar=False, execution_timeout=300)
    assert err.value.ename == "ConfigError"
    assert err.value.evalue.startswith("notebook parameter overrides (lora.r=0): 'lora.r' is 0: it must be >= 1")
    assert not (tmp_path / "bad").exists()


@pytest.mark.integration  # starts a notebook kernel
@pytest.mark.parametrize("notebook, parameter, override", [("05_evaluate", "eval_overrides", "eval.answer_samples=0"),
                                                           ("06_serve", "serve_overrides", "serve.max_concurrent=0")])
def test_a_bad_value_in_05s_or_06s_own_overrides_is_named_as_that_parameter(notebook, parameter, override, tmp_path):
    """05's eval_overrides and 06's serve_overrides, run directly (plain papermill): a bad value's error
    said nothing of where it came from."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from qlora_helpers.opening import setup_run

    setup_run("smoke", "set-up", outputs_dir=str(tmp_path))
    with pytest.raises(PapermillExecutionError) as err:
        papermill.execute_notebook(str(PROJECT_ROOT / "notebooks" / f"{notebook}.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"run_name": "set-up", "outputs_dir": str(tmp_path),
                                               parameter: [override]},
                                   cwd=str(PROJECT_ROOT / "notebooks"), kernel_name="python3",
                                   progress_bar=False, execution_timeout=300)
    key = override.partition("=")[0]
    assert err.value.ename == "ConfigError"
    assert err.value.evalue.startswith(f"notebook parameter {parameter} ({override}): '{key}' is 0: it must be >= 1")


@pytest.mark.integration  # starts a notebook kernel
@pytest.mark.parametrize("notebook", ["04_train", "04b_preference"])
def test_a_run_without_03s_sets_is_told_before_the_model_loads(notebook, tmp_path):
    """04 (and 04b) loaded the base, minutes on a 7B model, before finding that 03 never ran."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from qlora_helpers.opening import setup_run

    run = setup_run("smoke", "no-data", ["preference.enabled=true"], outputs_dir=str(tmp_path))
    with pytest.raises(PapermillExecutionError) as err:
        papermill.execute_notebook(str(PROJECT_ROOT / "notebooks" / f"{notebook}.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"run_name": "no-data", "outputs_dir": str(tmp_path)},
                                   cwd=str(PROJECT_ROOT / "notebooks"), kernel_name="python3",
                                   progress_bar=False, execution_timeout=300)
    assert err.value.ename == "MissingArtifact"
    assert err.value.evalue == (f"{run.data_report} is missing. Run 03_data_prep.ipynb for this run first "
                                f"(python -m qlora_helpers run --stages 03).")
    assert "open_run(" in err.value.source and "load_" not in err.value.source  # the run's first cell


@pytest.mark.integration
def test_the_runners_kernels_talk_over_encrypted_channels(tmp_path, capfd):
    """The runner's kernel manager provisions CurveZMQ keys (ipykernel 7 declares support): the kernel
    reads them from its connection file, and ipykernel's plain-TCP warning is gone from the output."""
    import nbformat
    import papermill

    from qlora_helpers.runner import _kernel_manager_class

    source = tmp_path / "probe.ipynb"
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(
        "import json\nfrom ipykernel.connect import get_connection_file\n"
        "print(sorted(k for k in json.load(open(get_connection_file())) if k.startswith('curve')))")]
    nbformat.write(notebook, source)
    papermill.execute_notebook(str(source), str(tmp_path / "out.ipynb"), kernel_name="python3",
                               progress_bar=False, kernel_manager_class=_kernel_manager_class())
    printed = nbformat.read(tmp_path / "out.ipynb", 4).cells[0].outputs[0]["text"]
    assert printed.strip() == "['curve_publickey', 'curve_secretkey']"
    captured = capfd.readouterr()
    assert "without encryption" not in captured.out + captured.err
