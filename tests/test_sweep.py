"""Sweeps: grid parsing and validation, resume, failures, and a real two-run sweep on the smoke profile."""

import contextlib
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time

import pandas as pd
import pytest

from qlora_helpers.cli import main
from qlora_helpers.config import load_config
from qlora_helpers.errors import ConfigError, QLoraError
from qlora_helpers.paths import write_json_atomic
from qlora_helpers.sweep import (
    expand_grid,
    latest_sweep,
    parse_grid,
    plan_sweep,
    remaining_stages,
    run_sweep,
    run_tags,
    sweeps_dir,
)

# Stage 05 made light: held-out loss and two ROUGE examples; the other tasks turned off.
LIGHT = ["train.eval_samples=4", "eval.loss_samples=8", "eval.answer_samples=2", "eval.answer_tokens=8",
         "eval.gsm8k_samples=0", "eval.ifeval_samples=0", "eval.showcase_samples=0"]


def test_grid_values_are_read_like_set_values():
    assert parse_grid("lora.r=8,16") == ("lora.r", [8, 16])
    assert parse_grid("lora.target_modules=[q_proj,v_proj],all-linear") == (
        "lora.target_modules", [["q_proj", "v_proj"], "all-linear"])
    assert parse_grid('data.template=chat, "a,b"') == ("data.template", ["chat", "a,b"])
    assert parse_grid("train.gradient_checkpointing=true,false")[1] == [True, False]
    for bad in ("lora.r", "lora.r=", "=8,16", "lora.r=[8,16"):
        with pytest.raises(ConfigError, match="Grid"):
            parse_grid(bad)


def test_expansion_is_the_cartesian_product_with_readable_unique_tags():
    combos = expand_grid({"lora.target_modules": [["q_proj", "v_proj"], "all-linear"], "lora.r": [8, 16]})
    assert combos == [{"lora.target_modules": ["q_proj", "v_proj"], "lora.r": 8},
                      {"lora.target_modules": ["q_proj", "v_proj"], "lora.r": 16},
                      {"lora.target_modules": "all-linear", "lora.r": 8},
                      {"lora.target_modules": "all-linear", "lora.r": 16}]
    assert run_tags(combos)[:3] == ["target_modules-q_proj.v_proj__r-8", "target_modules-q_proj.v_proj__r-16",
                                    "target_modules-all-linear__r-8"]
    # keys sharing a last part keep their section; values that clean up alike still get distinct tags
    tags = run_tags([{"train.seed": 1, "data.seed": 2}, {"data.template": "a b"}, {"data.template": "a.b"}])
    assert tags[0] == "train.seed-1__data.seed-2" and len(set(tags)) == 3


def test_the_shipped_sweep_validates_every_run(tmp_path):
    plan = plan_sweep("lora-targets", outputs_dir=str(tmp_path))
    assert plan.name == "lora-targets" and plan.stages == ["01", "03", "04", "05"] and len(plan.runs) == 4
    assert plan.folder == tmp_path / "sweeps" / "lora-targets" and not plan.folder.exists()
    cfg = load_config(plan.config, plan.runs[2].overrides)
    assert cfg.lora.target_modules == "all-linear" and cfg.lora.r == 8 and cfg.train.max_steps == 12
    assert cfg.train.wandb_group == "lora-targets" and cfg.eval.gsm8k_samples == 0
    assert len(plan_sweep("lora-targets", max_runs=3, outputs_dir=str(tmp_path)).runs) == 3


def test_a_bad_key_or_value_fails_before_any_run_starts(tmp_path):
    with pytest.raises(ConfigError, match=r"run 1 \(lora.nope=1\).*Unknown key 'lora.nope'"):
        plan_sweep("smoke", ["lora.nope=1,2"], outputs_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"run 2 \(lora.r=abc\).*lora.r = 'abc' is invalid"):
        plan_sweep("smoke", ["lora.r=8,abc"], outputs_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"run 2 \(lora.r=0\).*'lora.r' is 0: it must be >= 1"):
        plan_sweep("smoke", ["lora.r=8,0"], outputs_dir=str(tmp_path))
    assert not (tmp_path / "sweeps").exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="both fixed"):
        plan_sweep("smoke", ["lora.r=8,16"], ["lora.r=4"], outputs_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="lists 8 twice"):
        plan_sweep("smoke", ["lora.r=8,8"], outputs_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="Nothing to sweep"):
        plan_sweep("smoke", outputs_dir=str(tmp_path))
    assert main(["sweep", "--config", "smoke", "--grid", "lora.nope=1", "--outputs-dir", str(tmp_path)]) == 1
    assert not (tmp_path / "sweeps").exists()



def test_a_grid_key_given_twice_is_refused_not_overwritten(tmp_path):
    with pytest.raises(ConfigError, match=r"Grid key 'data.eval_size' is given twice \(--grid\)"):
        plan_sweep("smoke", ["data.eval_size=20,40", "data.eval_size=20,40,60,80"], outputs_dir=str(tmp_path))
    spec = tmp_path / "sizes.yaml"
    spec.write_text("config: smoke\ngrid:\n  data.eval_size: [20, 40]\n")
    with pytest.raises(ConfigError, match=r"in sizes.yaml's grid: and again with --grid"):
        plan_sweep(str(spec), ["data.eval_size=60,80"], outputs_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"lora.r is swept twice \(grid lora.r and grid lora\)"):
        plan_sweep("smoke", ["lora.r=8,16", "lora={r: 4},{r: 2}"], outputs_dir=str(tmp_path))


def test_a_key_given_twice_in_a_sweep_file_or_a_grid_value_is_refused_not_the_last_one_kept(tmp_path, capsys):
    """A sweep file's `grid:` given twice swept only the second one's values, silently."""
    spec = tmp_path / "twice.yaml"
    spec.write_text("config: smoke\ngrid:\n  lora.r: [4, 8]\nstages: 01\ngrid:\n  lora.alpha: [8, 16]\n")
    assert main(["sweep", "--config", str(spec), "--outputs-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {spec}: key 'grid' is given twice at line 2 and again at "
                                              f"line 5; YAML would silently keep the last one.")
    spec.write_text("config: smoke\nruns:\n  - {lora.r: 4}\n  - lora.r: 8\n    lora.alpha: 8\n    lora.r: 16\n")
    with pytest.raises(ConfigError, match=re.escape(f"{spec}: key 'runs[1].lora.r' is given twice at line 4 and "
                                                    f"again at line 6")):
        plan_sweep(str(spec), outputs_dir=str(tmp_path))
    # a key twice in one --grid value is said by which value of which --grid, not by its place (`lora[1].r`)
    assert main(["sweep", "--config", "smoke", "--grid", "lora.alpha=8,16", "--grid", "lora={r: 4},{r: 8, r: 16}",
                 "--outputs-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("error: Grid 'lora={r: 4},{r: 8, r: 16}': --grid lora's 2nd value "
                                              "sets r twice; YAML would silently keep the last one.")
    with pytest.raises(ConfigError, match=re.escape("--grid lora's 3rd value sets dropout.x twice;")):
        plan_sweep("smoke", ["lora={r: 4},{r: 8},{dropout: {x: 1, x: 2}}"], outputs_dir=str(tmp_path))
    spec.write_text("config: smoke\ngrid: [\n")  # read by the same reader: not YAML is no traceback either
    assert main(["sweep", "--config", str(spec), "--outputs-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith(f"error: {spec} is not valid YAML: while parsing a flow node")
    assert not (tmp_path / "sweeps").exists()


def test_values_that_load_alike_are_one_run_not_two(tmp_path):
    # a lone layer name becomes a list at load: the two runs would be the same run
    with pytest.raises(ConfigError, match=r'run 1 \(lora.target_modules="q_proj"\) and run 2 '
                                          r'\(lora.target_modules=\["q_proj"\]\) load the same settings'):
        plan_sweep("smoke", ["lora.target_modules=q_proj,[q_proj]"], outputs_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="load the same settings"):  # YAML reads 1e-4 as a string, then a float
        plan_sweep("smoke", ["train.learning_rate=1e-4,0.0001"], outputs_dir=str(tmp_path))


def test_a_key_fixed_by_a_section_mapping_cannot_be_swept(tmp_path):
    with pytest.raises(ConfigError, match=r"lora.r is both fixed \(--set lora=\{r: 8\}\) and swept \(grid lora.r\)"):
        plan_sweep("smoke", ["lora.r=8,16"], ["lora={r: 8}"], outputs_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"lora.r is both fixed \(--set lora.r=8\) and swept \(grid lora\)"):
        plan_sweep("smoke", ["lora={r: 4},{r: 16}"], ["lora.r=8"], outputs_dir=str(tmp_path))
    plan = plan_sweep("smoke", ["lora.r=8,16"], ["lora={alpha: 8}"], outputs_dir=str(tmp_path))  # other keys: fine
    assert [load_config(plan.config, r.overrides).lora.alpha for r in plan.runs] == [8, 8]
    plan = plan_sweep("smoke", ["lora.r=8,16"], ["train={wandb_group: mine}"], outputs_dir=str(tmp_path))
    assert load_config(plan.config, plan.runs[0].overrides).train.wandb_group == "mine"  # kept, not the sweep's


def test_a_profile_that_is_not_utf8_is_named_before_the_sweep_reads_it(tmp_path):
    profile = tmp_path / "latin.yaml"
    profile.write_bytes(b"extends: smoke\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin.yaml is not UTF-8 text \(line 2, byte 20"):
        plan_sweep(str(profile), ["lora.r=4,8"], outputs_dir=str(tmp_path))


def test_an_outputs_dir_that_is_a_file_is_named_before_the_sweep_starts(tmp_path):
    afile = tmp_path / "outputs"
    afile.write_text("")
    with pytest.raises(QLoraError, match=f"{afile} is a file, not a folder"):  # was NotADirectoryError
        plan_sweep("smoke", ["lora.r=4,8"], outputs_dir=str(afile))


def test_a_sweep_file_may_list_its_runs(tmp_path):
    spec = tmp_path / "pairs.yaml"
    spec.write_text("config: smoke\nstages: 01\nruns:\n  - {lora.r: 4, lora.alpha: 8}\n  - lora: {r: 8, alpha: 16}\n")
    plan = plan_sweep(str(spec), outputs_dir=str(tmp_path))
    assert [r.values for r in plan.runs] == [{"lora.r": 4, "lora.alpha": 8}, {"lora.r": 8, "lora.alpha": 16}]
    assert plan.name == "pairs" and plan.stages == ["01"]
    with pytest.raises(ConfigError, match="cannot take a grid"):
        plan_sweep(str(spec), ["lora.dropout=0,0.1"], outputs_dir=str(tmp_path))


def test_resume_skips_finished_stages_and_refuses_a_changed_run(tmp_path):
    plan = plan_sweep("smoke", ["lora.r=4,8"], stages="01,03,04,05", outputs_dir=str(tmp_path))
    run = plan.runs[0]
    folder = plan.runs_dir / run.tag
    assert remaining_stages(plan, run) == ["01", "03", "04", "05"]  # nothing there yet
    write_json_atomic(folder / "config.json", load_config(plan.config, run.overrides).to_dict())
    for name in ("env.json", "data/data_report.json", "train_log.json"):
        write_json_atomic(folder / name, {})
    assert remaining_stages(plan, run) == ["05"]  # killed during 05: only 05 runs again
    write_json_atomic(folder / "eval.json", {})
    assert remaining_stages(plan, run) == []  # finished: skipped
    (folder / "data" / "data_report.json").unlink()
    assert remaining_stages(plan, run) == ["03", "04", "05"]  # a hole: everything after it reruns
    write_json_atomic(folder / "config.json", load_config(plan.config, [*run.overrides, "lora.dropout=0.2"]).to_dict())
    with pytest.raises(ConfigError, match=r"made with other settings \(lora.dropout"):
        plan_sweep("smoke", ["lora.r=4,8"], stages="01,03,04,05", outputs_dir=str(tmp_path))


def test_a_bad_value_is_blamed_on_the_sweep_setting_it_came_from_not_on_set(tmp_path, capsys):
    # every override reached the config as a string and was called `--set TEXT` in the error
    with pytest.raises(ConfigError, match=r"run 2 \(lora.r=0\): sweep grid key lora.r \(lora.r=0\): 'lora.r' is 0"):
        plan_sweep("smoke", ["lora.r=8,0"], outputs_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r": --set lora.alpha=-1: 'lora.alpha' is -1"):  # a --set stays one
        plan_sweep("smoke", ["lora.r=8,16"], ["lora.alpha=-1"], outputs_dir=str(tmp_path))
    spec = tmp_path / "pairs.yaml"
    spec.write_text("config: smoke\nruns:\n  - {lora.r: 4}\n  - lora: {r: -1}\n")
    with pytest.raises(ConfigError, match=r"run 2 \(lora.r=-1\): sweep file pairs.yaml runs\[1\] \(lora.r=-1\): "):
        plan_sweep(str(spec), outputs_dir=str(tmp_path))
    spec.write_text("config: smoke\nset: {lora: {alpha: 0}}\ngrid: {lora.r: [4, 8]}\n")
    with pytest.raises(ConfigError, match=r"sweep file pairs.yaml set: \(lora.alpha=0\): 'lora.alpha' is 0"):
        plan_sweep(str(spec), outputs_dir=str(tmp_path))
    assert main(["sweep", "--config", "smoke", "--grid", "lora={r: 0},{r: 4}", "--outputs-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "sweep grid key lora (lora={\"r\": 0}): 'lora.r' is 0" in err and "--set" not in err
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("stages", ["", ",", "99", "01,4c"])
def test_sweep_stages_are_checked_up_front_as_run_checks_them(stages, tmp_path, capsys):
    said = {}
    for command in ("run", "sweep"):  # "" ran every stage of every run; the others failed with exit 1
        grid = ["--grid", "lora.r=4,8"] if command == "sweep" else []
        with pytest.raises(SystemExit) as exited:
            main([command, "--config", "smoke", *grid, "--stages", stages, "--outputs-dir", str(tmp_path)])
        assert exited.value.code == 2
        said[command] = capsys.readouterr().err.splitlines()[-1].split(" error: ")[1]
    assert said["sweep"] == said["run"] and said["run"].startswith("argument --stages: ")
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_of_stages_a_run_switches_off_is_refused_before_any_run_folder(tmp_path, capsys):
    with pytest.raises(QLoraError, match=r"^Sweep 'smoke-r', run 1 \(lora.r=4\): Nothing to run: stage 04b runs "
                                         r"only when preference.enabled is true"):
        plan_sweep("smoke", ["lora.r=4,8"], stages="04b", outputs_dir=str(tmp_path))
    with pytest.raises(QLoraError, match="No stage named in ''"):  # "" in Python too, not "every stage"
        plan_sweep("smoke", ["lora.r=4,8"], stages="", outputs_dir=str(tmp_path))
    args = ["sweep", "--config", "smoke", "--grid", "preference.enabled=true,false", "--stages", "04b"]
    assert main([*args, "--outputs-dir", str(tmp_path)]) == 1  # the run that turns 04b off: refused too
    assert "run 2 (preference.enabled=False): Nothing to run" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("entry, both", [("{lora.r: 8, lora: {r: 16}}", "lora.r and r in lora: {...}"),
                                         ("{lora: {r: 16, alpha: 8}, lora.r: 8}", "r in lora: {...} and lora.r"),
                                         ("{lora: 8, lora.r: 16}", "lora and lora.r")])
def test_a_runs_entry_that_sets_a_key_twice_is_refused_not_one_value_kept(entry, both, tmp_path, capsys):
    spec = tmp_path / "twice.yaml"
    spec.write_text(f"config: smoke\nstages: 01\nruns:\n  - {{lora.r: 4}}\n  - {entry}\n")
    with pytest.raises(ConfigError, match=re.escape(f"twice.yaml: runs[1] sets lora.r twice ({both}); give it once.")):
        plan_sweep(str(spec), outputs_dir=str(tmp_path))
    assert main(["sweep", "--config", str(spec), "--outputs-dir", str(tmp_path)]) == 1
    assert "error: twice.yaml: runs[1] sets lora.r twice" in capsys.readouterr().err
    assert not (tmp_path / "sweeps").exists()
    spec.write_text(f"config: smoke\nset: {entry}\ngrid: {{lora.alpha: [8, 16]}}\n")  # and in set:
    with pytest.raises(ConfigError, match=r"^twice.yaml: set sets lora.r twice"):
        plan_sweep(str(spec), outputs_dir=str(tmp_path))


@pytest.mark.integration  # starts notebook kernels
def test_failed_runs_are_recorded_the_sweep_goes_on_and_a_rerun_retries(tmp_path, capsys):
    # stage 02 of a sweep whose runs are set up, with a training file that is not there: each run
    # fails before its notebook starts (the runner checks the data 02 reads), quickly and for real
    missing = "data.sources=[{path: missing.jsonl}]"
    plan = plan_sweep("smoke", ["lora.r=4,8"], [missing], stages="01,02", outputs_dir=str(tmp_path))
    for run in plan.runs:
        write_json_atomic(plan.run_folder(run.tag).config_file, load_config(plan.config, run.overrides).to_dict())
    args = ["sweep", "--config", "smoke", "--grid", "lora.r=4,8", "--set", missing, "--stages", "02",
            "--outputs-dir", str(tmp_path)]
    assert main(args) == 1
    state = json.loads((tmp_path / "sweeps" / "smoke-r" / "sweep.json").read_text())
    assert [r["status"] for r in state["runs"]] == ["failed", "failed"]  # the second ran after the first failed
    for record in state["runs"]:
        assert "missing.jsonl does not exist" in record["error"] and record["attempts"] == 1
        assert record["notebook"] is None  # no notebook ran
    assert "failed: r-4, r-8 (rerun to retry)" in capsys.readouterr().out
    assert main(args) == 1
    state = json.loads((tmp_path / "sweeps" / "smoke-r" / "sweep.json").read_text())
    assert [r["attempts"] for r in state["runs"]] == [2, 2]
    table = pd.read_csv(tmp_path / "sweeps" / "smoke-r" / "comparison.csv")
    assert list(table["status"]) == ["failed", "failed"] and table["note"].str.contains("DataUnavailable").all()


def test_a_sweep_without_01_whose_runs_were_never_set_up_is_refused_before_anything_is_made(tmp_path, capsys):
    """`sweep --stages 02` on a new sweep made its folder and failed each run late ("has not been set up")."""
    args = ["sweep", "--config", "smoke", "--grid", "lora.r=4,8", "--stages", "02,03", "--outputs-dir", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m qlora_helpers sweep: error: The sweep's stages (02,03) leave out 01, and none "
                          "of sweep 'smoke-r''s 2 runs has been set up")
    assert "(--stages 01,02,03)" in err and list(tmp_path.iterdir()) == []
    # a sweep with a run set up goes on from its later stages (resume)
    plan = plan_sweep("smoke", ["lora.r=4,8"], stages="01,05", outputs_dir=str(tmp_path))
    write_json_atomic(plan.run_folder(plan.runs[1].tag).config_file,
                      load_config(plan.config, plan.runs[1].overrides).to_dict())
    assert plan_sweep("smoke", ["lora.r=4,8"], stages="05", outputs_dir=str(tmp_path)).stages == ["05"]



def test_a_partly_set_up_sweep_without_01_skips_the_runs_never_set_up_and_says_so(tmp_path, capsys):
    """Resuming with stages that leave out 01, a run 01 never set up started a kernel for each stage
    only to fail in it; it is skipped with the reason, and the sweep does not end as finished."""
    import pandas as pd

    from qlora_helpers.runs import RunFolder

    plan = plan_sweep("smoke", ["lora.r=4,8"], stages="01,05", outputs_dir=str(tmp_path))
    done = plan.run_folder(plan.runs[1].tag)
    write_json_atomic(done.config_file, load_config(plan.config, plan.runs[1].overrides).to_dict())
    write_json_atomic(RunFolder(done.path).eval_report, {"summary": {}, "samples": {}})  # 05 done
    args = ["sweep", "--config", "smoke", "--grid", "lora.r=4,8", "--stages", "05", "--outputs-dir", str(tmp_path)]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert ("run 1/2 r-4 (lora.r=4): skipped, never set up, and the stages (05) leave out 01, which sets a run up "
            "(--stages 01,05 runs it)") in out
    assert "run 2/2 r-8 (lora.r=8): finished earlier, skipped" in out
    assert "1 of 2 runs finished" in out and "not set up: r-4 (rerun with 01 in --stages)" in out
    assert not plan.run_folder("r-4").path.exists()
    table = pd.read_csv(plan.folder / "comparison.csv")
    assert list(table["status"]) == ["not set up", "finished"] and "leave out 01" in table["note"][0]


@pytest.mark.integration  # starts a notebook kernel
def test_ctrl_c_records_the_run_as_interrupted_and_rewrites_the_comparison(tmp_path):
    folder = tmp_path / "sweeps" / "smoke-r"
    folder.mkdir(parents=True)
    (folder / "comparison.md").write_text("| run | status |\n| old-run | finished |\n")  # an earlier sweep's
    args = [sys.executable, "-m", "qlora_helpers", "sweep", "--config", "smoke", "--grid", "lora.r=4,8",
            "--stages", "01", "--outputs-dir", str(tmp_path)]
    # SIGINT's default disposition, as a terminal's Ctrl-C finds it: a suite started in the background by a
    # non-interactive shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    notebook = folder / "runs" / "r-4" / "notebooks" / "01_setup.ipynb"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not notebook.exists():  # 01 has started
        time.sleep(0.1)
    assert proc.poll() is None, f"the sweep ended (exit {proc.returncode}) before Ctrl-C"
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Sweep smoke-r interrupted; run the same command again" in out
    state = json.loads((folder / "sweep.json").read_text())
    assert [r["status"] for r in state["runs"]] == ["interrupted", "pending"]
    table = (folder / "comparison.md").read_text()
    assert "old-run" not in table and "interrupted" in table and "pending" in table
    assert list(pd.read_csv(folder / "comparison.csv")["status"]) == ["interrupted", "pending"]


def _wandb_records(path):
    """The records of an offline W&B run file (W&B's leveldb-style log of protobuf records).

    By hand because wandb 0.31 offers no reader: its Python `sdk.internal.datastore` is gone (the log
    is written by the Go wandb-core), `wandb.Api()` reads only synced runs, and an offline run folder
    holds no config.yaml. `wandb.beta.LocalApi` (wandb/wandb pull request #12745, open) would replace
    this. The records themselves are parsed with wandb's own protobuf classes."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk, block = path.read_bytes(), 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = chunk + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(chunk)
            chunk = b""
            yield record


def test_the_loss_plot_shows_each_runs_gap_to_the_first_on_the_same_batches():
    import numpy as np

    from qlora_helpers.plots import plot_loss_curves

    histories = {"r=4": [{"step": 2, "loss": 2.5}, {"step": 4, "loss": 2.1}, {"step": 4, "heldout_loss": 2.0}],
                 "r=8": [{"step": 2, "loss": 2.4}, {"step": 4, "loss": 2.3}]}
    fig = plot_loss_curves(histories)
    curves, gaps = fig.axes
    (gap,) = [line for line in gaps.get_lines() if line.get_label() == "r=8"]
    assert list(gap.get_xdata()) == [2, 4] and np.allclose(gap.get_ydata(), [-0.1, 0.2])
    assert {line.get_label() for line in curves.get_lines()} == {"r=4", "r=8"}
    assert len(plot_loss_curves(histories, same_batches=False).axes) == 1  # other batches: no gap panel
    assert len(plot_loss_curves({"r=4": histories["r=4"]}).axes) == 1


@pytest.fixture(scope="module")
def smoke_sweep(tmp_path_factory, tiny_dir):
    outputs = tmp_path_factory.mktemp("sweep-outputs")
    plan = plan_sweep("smoke", ["lora.r=4,8"], LIGHT, stages="01,03,04,05", name="tiny-r",
                      outputs_dir=str(outputs))
    # The command a user types, killed (SIGKILL, no chance to clean up) once the second run is past
    # its first stage; then the same sweep again, which must do only what is missing.
    args = [sys.executable, "-m", "qlora_helpers", "sweep", "--config", "smoke", "--grid", "lora.r=4,8",
            *[a for o in LIGHT for a in ("--set", o)], "--stages", "01,03,04,05", "--name", "tiny-r",
            "--outputs-dir", str(outputs)]
    proc = subprocess.Popen(args, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = plan.runs_dir / plan.runs[1].tag / "notebooks"
    deadline = time.monotonic() + 900
    while proc.poll() is None and time.monotonic() < deadline and not (second / "03_data_prep.ipynb").exists():
        time.sleep(0.2)
    assert proc.poll() is None, f"the sweep ended (exit {proc.returncode}) before it could be killed mid-way"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = {p.name: p.stat().st_mtime_ns for p in second.glob("*.ipynb")}
    before = json.loads((plan.folder / "sweep.json").read_text())
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        state = run_sweep(plan, progress=False)
    return plan, state, {"state_at_kill": before, "notebooks_at_kill": killed, "log": log.getvalue()}


def test_a_killed_sweep_finishes_only_the_missing_runs_when_rerun(smoke_sweep):
    plan, state, kill = smoke_sweep
    first, second = plan.runs
    assert [r["status"] for r in kill["state_at_kill"]["runs"]] == ["finished", "running"]
    assert f"run 1/2 {first.tag} (lora.r=4): finished earlier, skipped" in kill["log"]
    resumed = next(line for line in kill["log"].splitlines() if f"run 2/2 {second.tag}" in line)
    assert "resuming" in resumed and "01" not in resumed.split("stages ")[1]  # 01 had finished: not rerun
    notebooks = plan.runs_dir / second.tag / "notebooks"
    assert (notebooks / "01_setup.ipynb").stat().st_mtime_ns == kill["notebooks_at_kill"]["01_setup.ipynb"]
    assert [r["attempts"] for r in state["runs"]] == [1, 2]


def test_a_real_sweep_compares_its_runs(smoke_sweep):
    plan, state, _ = smoke_sweep
    assert [r["status"] for r in state["runs"]] == ["finished", "finished"]
    table = pd.read_csv(plan.folder / "comparison.csv")
    assert list(table["run"]) == ["r-4", "r-8"] and list(table["lora.r"]) == [4, 8]
    assert (table["train_seconds"] > 0).all() and (table["train_cpu_seconds"] > 0).all() and (table["steps"] == 4).all()
    assert (table["peak_memory_mib"] > 100).all() and set(table["memory_kind"]) <= {"process_max_rss",
                                                                                  "cuda_max_allocated"}
    assert table["trainable_params"][1] == 2 * table["trainable_params"][0]  # rank 8 has twice rank 4's
    assert table["final_train_loss"].notna().all() and (table["heldout_examples"] == 8).all()
    # recorded on the smoke profile (CPU, fp32 compute); update deliberately when training changes
    assert list(table["heldout_loss_base"]) == pytest.approx([10.851527, 10.851527], abs=1e-3)
    assert list(table["heldout_loss"]) == pytest.approx([10.849117, 10.849236], abs=1e-3)
    assert (table["heldout_loss"] < table["heldout_loss_base"]).all()  # 4 steps lower it, a little
    assert list(table["ROUGE-L F1"]) == [0.0, 0.0]  # random weights write no reference word
    assert "GSM8K exact match" not in table and "IFEval prompt-level" not in table  # 0 samples: not a score
    for r in plan.runs:  # the table's numbers are the runs' own reports
        report = json.loads((plan.runs_dir / r.tag / "eval.json").read_text())
        tuned = report["summary"]["held-out loss"]["tuned"]
        assert table.set_index("run").loc[r.tag, "heldout_loss"] == pytest.approx(tuned)
    assert (plan.folder / "comparison.md").read_text().startswith("| run ")
    for name in ("heldout_loss.png", "loss_curves.png"):
        assert (plan.folder / name).stat().st_size > 10_000


def test_every_run_of_a_sweep_is_in_one_wandb_group_with_its_values(smoke_sweep):
    plan, *_ = smoke_sweep
    for r in plan.runs:
        assert json.loads((plan.runs_dir / r.tag / "config.json").read_text())["train"]["wandb_group"] == "tiny-r"
        (run_file,) = (plan.runs_dir / r.tag / "wandb").glob("offline-run-*/run-*.wandb")
        records = list(_wandb_records(run_file))
        assert {x.run.run_group for x in records if x.WhichOneof("record_type") == "run"} == {"tiny-r"}
        logged = {u.key: json.loads(u.value_json) for x in records if x.WhichOneof("record_type") == "config"
                  for u in x.config.update}
        assert logged["sweep"] == {"sweep": "tiny-r", "tag": r.tag, "values": r.values}


def test_rerunning_a_finished_sweep_runs_nothing(smoke_sweep, capsys):
    plan, *_ = smoke_sweep
    executed = sorted(plan.runs_dir.glob("*/notebooks/*.ipynb"))
    before = {p: p.stat().st_mtime_ns for p in executed}
    state = run_sweep(plan_sweep("smoke", ["lora.r=4,8"], LIGHT, stages="01,03,04,05", name="tiny-r",
                                 outputs_dir=str(plan.folder.parent.parent)), progress=False)
    assert [r["status"] for r in state["runs"]] == ["finished", "finished"]
    assert capsys.readouterr().out.count("finished earlier, skipped") == 2
    assert {p: p.stat().st_mtime_ns for p in executed} == before and len(executed) == 8


def test_the_latest_sweep_is_found_for_notebook_05(smoke_sweep, tmp_path):
    plan, *_ = smoke_sweep
    outputs = plan.folder.parent.parent
    assert sweeps_dir(str(outputs)) == outputs / "sweeps"
    assert sweeps_dir(str(plan.runs_dir)) == outputs / "sweeps"  # a sweep's own run looks at its sweep
    latest = latest_sweep(str(outputs))
    assert latest["summary"].startswith("sweep tiny-r") and "2 finished" in latest["summary"]
    assert len(latest["table"]) == 2 and [p.name for p in latest["figures"]] == ["heldout_loss.png", "loss_curves.png"]
    empty = latest_sweep(str(tmp_path))
    assert empty["table"] is None and "No sweep" in empty["summary"]
