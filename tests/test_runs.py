"""runs.py: the run folder's layout, the stage table and the typed runtime; this file checks the layout
itself, so it is the one test module that spells run-folder file names."""

import ast
import importlib
import json
import re
from pathlib import Path

import pytest

from qlora_helpers.errors import ConfigError, QLoraError
from qlora_helpers.opening import open_run_folder
from qlora_helpers.paths import PROJECT_ROOT
from qlora_helpers.runs import STAGES, MissingArtifact, RunFolder, Runtime, stage

# Every file a stage writes into a run folder (found inside any string literal of the code), and the
# folders (found as whole string literals).
LAYOUT_FILES = ("config.json", "env.json", "sweep_run.json", "quantization.json", "data_report.json",
                "preference.json", "preference_pairs.json", "preference_margins.png", "stages.json",
                "train_log.json", "eval.json", "merge.json", "latency.json", "serve_smoke.json",
                "serve_load.json", "serve_commands.md", "generations.html", "generations.md",
                "quantization_footprint.png", "training_curves.png", "eval_metrics.png", "eval_answers.png",
                "latency.png")
LAYOUT_FOLDERS = ("adapter", "merged", "checkpoints", "data", "notebooks", "lm_eval_tasks", "adapter_preference",
                  "checkpoints_preference")
# Where the same words mean something else: a transformers model folder's config.json (models.py,
# plan.py's model-shape lookup), and of the merged export (serve_commands.md's text, export.py, gguf.py's
# freshness check), serve.form's values "adapter"/"merged" (config, plan, serve, plots, the export
# gate's form names, notebook 06), the OpenAI list's and nbformat's "data" keys, tarfile's "data"
# extraction filter (gguf.py).
ELSEWHERE = {("models.py", "config.json"), ("export.py", "config.json"), ("config.py", "adapter"),
             ("config.py", "merged"), ("checks.py", "adapter"), ("checks.py", "merged"),
             ("export.py", "adapter"), ("export.py", "merged"), ("plots.py", "adapter"),
             ("06_serve.ipynb", "merged"), ("api.py", "data"), ("docs.py", "data"),
             ("gguf.py", "config.json"), ("gguf.py", "data"), ("gate.py", "adapter"), ("gate.py", "merged"),
             ("forms.py", "adapter"), ("forms.py", "merged"), ("tasks.py", "lm_eval_tasks"),
             ("plan.py", "config.json"), ("plan.py", "adapter"), ("plan.py", "merged")}


def _code_strings(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string literal in Python source that is not a docstring."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [(n.lineno, n.value) for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings]


def test_no_module_or_notebook_but_runs_spells_a_run_folder_name():
    sources = [(p, p.read_text(encoding="utf-8")) for p in (PROJECT_ROOT / "qlora_helpers").rglob("*.py")
               if p.name != "runs.py"]
    for nb in (PROJECT_ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        sources += [(nb, "".join(c["source"])) for c in cells if c["cell_type"] == "code"]
    found = []
    for path, source in sources:
        for line, text in _code_strings(source):
            hits = ([n for n in LAYOUT_FILES if re.search(rf"(?<![\w-]){re.escape(n)}", text)]
                    + [n for n in LAYOUT_FOLDERS if n == text])
            found += [f"{path.relative_to(PROJECT_ROOT)}:{line}: {text!r}" for n in hits
                      if (path.name, n) not in ELSEWHERE]
    assert not found, "run-folder names belong in runs.py (a Run property):\n" + "\n".join(found)


def test_the_stage_table_matches_the_notebooks_and_the_layout():
    assert [s.number for s in STAGES] == ["01", "02", "03", "04", "04b", "05", "06"]
    assert sorted(p.name for p in (PROJECT_ROOT / "notebooks").glob("*.ipynb")) == [s.notebook for s in STAGES]
    folder = RunFolder(Path("/runs/x"))
    for s in STAGES:
        for artifact in (*s.reads, *s.writes):
            assert isinstance(getattr(folder, artifact), Path), (s.number, artifact)
        assert getattr(folder, s.report).suffix == ".json", s.number  # the report a stage writes last
        if s.entry:
            module, function = s.entry.split(":")
            assert callable(getattr(importlib.import_module(module), function)), s.entry
    assert STAGES[0].entry is None  # 01 is setup_run: it makes the Run the others take
    assert [s.report for s in STAGES] == ["env_file", "quantization_report", "data_report", "train_log",
                                          "preference_report", "eval_report", "serve_load_report"]
    assert folder.data_report == Path("/runs/x/data/data_report.json")
    assert folder.split_dir("eval") == Path("/runs/x/data/eval")


def test_stage_lookup_and_errors(tmp_path):
    assert stage(4) is stage("04") is stage("4") is STAGES[3]
    with pytest.raises(QLoraError, match=r"^Unknown stage '09'; stages: 01, 02, 03, 04, 04b, 05, 06\.$"):
        stage("09")
    folder = RunFolder(tmp_path)
    assert not stage("05").done(folder)
    folder.eval_report.write_text("{}")
    assert stage("05").done(folder)
    with pytest.raises(MissingArtifact, match=re.escape(f"{tmp_path / 'adapter'} is missing. Run 04_train.ipynb")):
        folder.require("adapter_dir")
    with pytest.raises(MissingArtifact, match="Run notebooks/04_train.ipynb for run"):
        folder.require_adapter()
    with pytest.raises(QLoraError, match="Unknown split 'test'"):
        folder.split_dir("test")


def test_runtime_is_typed_and_round_trips():
    saved = {"device": "cpu", "compute_dtype": "float32", "optimizer": "adamw_torch", "load_in_4bit": True,
             "notes": ["CPU: fp32 compute (bf16 4-bit matmuls are ~10x slower on CPU)."]}
    runtime = Runtime.from_dict(saved)
    assert runtime.device == "cpu" and runtime.optimizer == "adamw_torch" and runtime.notes == tuple(saved["notes"])
    assert runtime.to_dict() == saved
    assert str(runtime.torch_dtype) == "torch.float32"


def test_a_folder_without_setup_is_named(tmp_path):
    with pytest.raises(QLoraError, match=re.escape(f"({tmp_path / 'config.json'} is missing)")):
        open_run_folder(tmp_path)
    with pytest.raises(QLoraError, match="Only serve.. settings"):
        open_run_folder(tmp_path, ["train.learning_rate=1"])


@pytest.mark.parametrize("command", ["serve", "export"])
def test_serve_and_export_name_a_run_folder_that_is_missing_or_a_file(command, tmp_path, capsys):
    """--run is a path: the error says what is wrong with it, not to set up a run by that name (which
    would create outputs/<name>, elsewhere)."""
    from qlora_helpers.cli import main

    missing, a_file = tmp_path / "nope", tmp_path / "notes.txt"
    a_file.write_text("not a run")
    assert main([command, "--run", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"Run folder {missing} does not exist: give --run the folder of a trained run" in err
    assert "--run-name" not in err and "Traceback" not in err
    assert main([command, "--run", str(a_file)]) == 1
    assert f"Run folder {a_file} is a file, not a folder" in capsys.readouterr().err
    assert main([command, "--run", str(tmp_path)]) == 1  # a folder, but no run's
    err = capsys.readouterr().err
    assert f"{tmp_path} is not a run folder ({tmp_path / 'config.json'} is missing)" in err and "--run-name" not in err
    assert main([command, "--run", str(tmp_path), "--set", "train.max_steps=3"]) == 1
    assert "Only serve.* settings can change for a finished run (serve, export)" in capsys.readouterr().err
    assert not missing.exists()


@pytest.mark.parametrize("port", ["0", "65536", "-1", "http"])
def test_serve_refuses_a_port_outside_1_to_65535_as_a_usage_error(port, tmp_path, capsys):
    """--port 0 used to be read as 'not given' and served on serve.port (8000) without a word."""
    from qlora_helpers.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--run", str(tmp_path), "--port", port])
    assert exit_.value.code == 2
    assert f"argument --port: '{port}' is not a TCP port: give 1 .. 65535" in capsys.readouterr().err


# --- settings set once (01), later stages open the run by name ----------------------------------


@pytest.fixture
def by_name(tmp_path):
    from qlora_helpers.opening import setup_run

    setup_run("smoke", "byname", ["train.wandb=disabled", "train.learning_rate=0.001"], str(tmp_path))
    return str(tmp_path)


def test_later_stages_open_the_run_by_name_and_change_only_their_section(by_name):
    from qlora_helpers.errors import ConfigError
    from qlora_helpers.opening import describe_run, open_run
    from qlora_helpers.runs import NotSetUp

    run = open_run("byname", by_name)
    assert run.cfg.train.learning_rate == 0.001 and run.stage_overrides == ()
    assert "lr 0.001 for" in describe_run(run) and "byname/config.json" in describe_run(run)
    evaluated = open_run("byname", by_name, ["eval.answer_samples=3"], stage="05")
    assert evaluated.cfg.eval.answer_samples == 3 and evaluated.stage_overrides == ("eval.answer_samples=3",)
    assert evaluated.cfg.train == run.cfg.train
    assert "for this stage only: eval.answer_samples=3" in describe_run(evaluated)
    assert open_run("byname", by_name, ["serve.bench_tokens=3"], stage="06").cfg.serve.bench_tokens == 3
    with pytest.raises(ConfigError, match=r"train.learning_rate: now 0.002, run has 0.001.*Set them in 01_setup"):
        open_run("byname", by_name, ["train.learning_rate=0.002"], stage="04")
    with pytest.raises(ConfigError, match=r"Only eval\.\* settings can change in stage 05"):
        open_run("byname", by_name, ["serve.bench_tokens=3"], stage="05")
    with pytest.raises(NotSetUp, match="01_setup.ipynb with run_name='nope'"):
        open_run("nope", by_name)


def _parameters(notebook: Path) -> list[str]:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    cell = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    return [t.targets[0].id for t in ast.parse("".join(cell["source"])).body if isinstance(t, ast.Assign)]


def test_the_runner_passes_each_notebook_the_parameters_its_cell_has(by_name):
    from qlora_helpers.runner import notebook_parameters

    everything = {"config": "smoke", "run_name": "r", "overrides": ["x=1"], "outputs_dir": "o",
                  "eval_overrides": ["eval.answer_samples=3"], "serve_overrides": []}
    from papermill.inspection import _infer_parameters
    from papermill.iorw import load_notebook_node

    for s in STAGES:
        assert sorted(notebook_parameters(s, everything)) == sorted(_parameters(s.notebook_path)), s.notebook
        # papermill reads every line (its --help-notebook); a comment it cannot parse drops a parameter
        inferred = [p.name for p in _infer_parameters(load_notebook_node(str(s.notebook_path)))]
        assert inferred == _parameters(s.notebook_path), s.notebook
    assert _parameters(stage("04").notebook_path) == ["run_name", "outputs_dir"]  # the run name alone


def test_the_runner_without_01_passes_only_eval_and_serve_changes(by_name):
    from qlora_helpers.config import load_config
    from qlora_helpers.errors import ConfigError
    from qlora_helpers.runner import select_stages, stage_overrides

    folder = RunFolder(Path(by_name) / "byname")
    same = ["train.wandb=disabled", "train.learning_rate=0.001"]
    asked = load_config("smoke", [*same, "eval.answer_samples=3", "serve.bench_tokens=4"])
    assert stage_overrides(folder, "byname", asked, select_stages("05,06")) == {
        "eval_overrides": ["eval.answer_samples=3"], "serve_overrides": ["serve.bench_tokens=4"]}
    with pytest.raises(ConfigError, match=r"train.learning_rate: now 0.002, run has 0.001.*redo this run from 01"):
        stage_overrides(folder, "byname", load_config("smoke", ["train.learning_rate=0.002"]), select_stages("04"))


def test_a_later_stage_alone_starts_from_the_runs_own_settings_not_the_profiles(by_name):
    """`run --stages 05 --set eval.answer_samples=3` on a run set up with train.learning_rate=0.001
    (not the profile's): only the --set keys are compared, so the run's own settings need no restating."""
    from qlora_helpers.errors import ConfigError
    from qlora_helpers.runner import plan_pipeline

    selected, path, parameters = plan_pipeline("smoke", "byname", ["eval.answer_samples=3"], "05", by_name)
    assert [s.number for s in selected] == ["05"] and path == Path(by_name) / "byname"
    assert parameters["eval_overrides"] == ["eval.answer_samples=3"] and parameters["serve_overrides"] == []
    # a --set of a setting 01 fixed and 05 does not own is refused, naming it, with the --set that would work
    with pytest.raises(ConfigError) as refused:
        plan_pipeline("smoke", "byname", ["lora.r=4", "eval.answer_samples=3"], "05", by_name)
    message = str(refused.value)
    assert "(lora.r: now 4, run has 16)" in message and "--set may change only eval.* (stage 05)" in message
    # the run's own setting comes along in the suggestion, or redoing 01 from the profile would drop it
    assert ("--stages 01,02,03,04,05 --set 'train.learning_rate=0.001' --set 'train.wandb=\"disabled\"' "
            "--set 'lora.r=4'") in message
    with pytest.raises(ConfigError, match=r"Run 'byname''s settings with --set lora.r=0: 'lora.r' is 0"):
        plan_pipeline("smoke", "byname", ["lora.r=0"], "05", by_name)


def test_a_bad_set_on_an_existing_run_is_named_alone_among_the_others(by_name, capsys):
    """`run --stages 05 --set a --set b` on an existing run: the error for b's value listed every --set."""
    from qlora_helpers.cli import main

    assert main(["run", "--config", "smoke", "--run-name", "byname", "--outputs-dir", by_name, "--stages", "05",
                 "--set", "eval.answer_samples=3", "--set", "lora.r=0", "--set", "serve.bench_tokens=3"]) == 1
    err = capsys.readouterr().err
    assert "error: Run 'byname''s settings with --set lora.r=0: 'lora.r' is 0" in err
    assert "eval.answer_samples" not in err and "bench_tokens" not in err


def test_a_bad_value_of_05s_or_06s_overrides_or_of_a_set_to_serve_or_export_is_named_where_it_came_from(
        by_name, capsys):
    """open_run (05's eval_overrides, 06's serve_overrides) and `serve` / `export --set` reported a bad
    value with no origin at all."""
    from qlora_helpers.cli import main
    from qlora_helpers.opening import open_run

    with pytest.raises(ConfigError, match=r"^notebook parameter eval_overrides \(eval.answer_samples=0\): "
                                          r"'eval.answer_samples' is 0: it must be >= 1"):
        open_run("byname", by_name, ["eval.answer_samples=3", "eval.answer_samples=0"], stage="05")
    with pytest.raises(ConfigError, match=r"^notebook parameter serve_overrides \(serve.max_concurrent=x\): "
                                          r"serve.max_concurrent = 'x' is invalid"):
        open_run("byname", by_name, ["serve.bench_tokens=3", "serve.max_concurrent=x"], stage="06")
    folder = str(Path(by_name) / "byname")
    for command in ("serve", "export"):
        assert main([command, "--run", folder, "--set", "serve.bench_tokens=3", "--set", "serve.max_concurrent=0"]) == 1
        assert capsys.readouterr().err.startswith("error: --set serve.max_concurrent=0: 'serve.max_concurrent' is 0")
        assert main([command, "--run", folder, "--set", "lora.r=4"]) == 1
        assert "got --set lora.r=4. Other settings belong to the run" in capsys.readouterr().err


def test_a_bad_override_of_01_is_named_as_a_notebook_parameter_or_a_set(tmp_path, capsys):
    from qlora_helpers.cli import main
    from qlora_helpers.opening import setup_run

    # notebook 01's call: the value came from its `overrides` parameter, not from a --set
    with pytest.raises(ConfigError, match=r"^notebook parameter overrides \(lora.r=0\): 'lora.r' is 0"):
        setup_run("smoke", "nb", ["train.max_steps=2", "lora.r=0"], str(tmp_path))
    assert main(["train", "--config", "smoke", "--set", "lora.r=0", "--outputs-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("error: --set lora.r=0: 'lora.r' is 0")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("later", [["--stages", "02"], ["--stages", "05", "--set", "eval.answer_samples=3"]])
def test_a_later_stage_of_a_run_never_set_up_is_refused_without_creating_its_folder(later, tmp_path, capsys):
    """`run --stages 02 --run-name X` created outputs/X (and --outputs-dir) before saying X was never set up."""
    from qlora_helpers.cli import main

    outputs = tmp_path / "outputs"
    assert main(["run", "--config", "smoke", "--run-name", "never", "--outputs-dir", str(outputs), *later]) == 1
    err = capsys.readouterr().err
    assert f"error: Run 'never' has not been set up ({outputs / 'never' / 'config.json'} is missing)" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stages", [",", "", " , "])
def test_run_with_no_stage_named_is_a_usage_error_that_lists_the_stages(stages, tmp_path, capsys):
    from qlora_helpers.cli import main

    with pytest.raises(SystemExit) as exited:  # it crashed with an IndexError after creating the run folder
        main(["run", "--config", "smoke", "--run-name", "p", "--stages", stages, "--outputs-dir", str(tmp_path)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --stages: No stage named" in err and "01, 02, 03, 04, 04b, 05, 06" in err
    assert list(tmp_path.iterdir()) == []


def test_run_with_only_a_stage_the_config_switches_off_says_which_key(tmp_path):
    from qlora_helpers.runner import run_pipeline

    with pytest.raises(QLoraError, match=r"Nothing to run: stage 04b runs only when preference.enabled is true"):
        run_pipeline("smoke", "p", stages="04b", outputs_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["run", "train"])
def test_an_empty_run_name_is_a_usage_error_not_the_profile_name(command, tmp_path, capsys):
    from qlora_helpers.cli import main

    with pytest.raises(SystemExit) as exited:  # it became the profile's name, silently
        main([command, "--config", "smoke", "--run-name", "", "--outputs-dir", str(tmp_path)])
    assert exited.value.code == 2
    assert "argument --run-name: the run name is empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["run", "train"])
def test_outputs_dir_that_is_a_file_is_named(command, tmp_path, capsys):
    from qlora_helpers.cli import main

    afile = tmp_path / "outputs"
    afile.write_text("not a folder\n")
    argv = [command, "--config", "smoke", "--run-name", "p", "--outputs-dir", str(afile)]
    assert main(argv + (["--stages", "01"] if command == "run" else [])) == 1  # was NotADirectoryError
    err = capsys.readouterr().err
    assert f"error: {afile} is a file, not a folder" in err and "--outputs-dir" in err
    assert afile.read_text() == "not a folder\n"
