import dataclasses
import re
from collections import Counter
from pathlib import Path

import pytest

from qlora_helpers.cli import main
from qlora_helpers.config import CONFIG_DIR, Config, config_from_dict, describe_config, load_config
from qlora_helpers.errors import ConfigError

PROFILES = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_the_four_profiles_exist():
    assert {"default", "llama2-7b", "qlora-paper", "smoke"} <= set(PROFILES)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_loads_and_round_trips(profile):
    cfg = load_config(profile)
    assert isinstance(cfg, Config)
    assert config_from_dict(cfg.to_dict()) == cfg
    assert cfg.model.trust_remote_code is False


def test_seed_and_paper_recipes():
    seed = load_config("llama2-7b")
    assert seed.model.source == "meta-llama/Llama-2-7b-hf"
    assert (seed.quant.quant_type, seed.quant.double_quant, seed.quant.compute_dtype) == ("nf4", True, "bfloat16")
    assert seed.lora.target_modules == ["q_proj", "v_proj"]
    paper = load_config("qlora-paper")
    assert paper.lora.target_modules == "all-linear"
    assert (paper.lora.r, paper.lora.alpha, paper.lora.dropout) == (64, 16, 0.1)
    assert (paper.train.lr_scheduler, paper.train.warmup_ratio, paper.train.max_grad_norm) == ("constant", 0.03, 0.3)
    assert paper.train.optimizer == "paged_adamw_32bit" and paper.train.group_by_length


def test_overrides_are_typed():
    cfg = load_config("default", ["train.learning_rate=1e-4", "lora.target_modules=all-linear",
                                  "train.max_steps=7", "model.revision=main"])
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert isinstance(cfg.train.learning_rate, float)
    assert cfg.lora.target_modules == "all-linear"
    assert cfg.train.max_steps == 7
    assert cfg.model.revision == "main"



def test_a_section_mapping_override_merges_into_the_section_key_by_key():
    profile = load_config("default")
    cfg = load_config("default", ["lora={r: 8, alpha: 8}"])
    assert (cfg.lora.r, cfg.lora.alpha) == (8, 8)
    assert cfg.lora.target_modules == profile.lora.target_modules == "all-linear"  # not the code's default
    assert cfg.lora.dropout == profile.lora.dropout
    assert load_config("default", ["lora={r: 8}", "lora={alpha: 4}"]).lora.r == 8  # a later one merges too
    with pytest.raises(ConfigError, match=r"^--set lora=\{r: 0\}: 'lora\.r' is 0"):
        load_config("default", ["lora={r: 0}"])
    with pytest.raises(ConfigError, match=r"^--set lora\.alpha=-1: "):  # not blamed on the later mapping
        load_config("default", ["lora.alpha=-1", "lora={r: 8}"])


def test_unknown_key_names_key_suggestion_and_valid_keys():
    with pytest.raises(ConfigError) as err:
        load_config("default", ["train.learning_rat=1e-4"])
    msg = str(err.value)
    assert "train.learning_rat" in msg and "Did you mean 'learning_rate'" in msg and "max_steps" in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match="Unknown key 'trainer'.*Valid keys: model, quant"):
        load_config("default", ["trainer.x=1"])


def test_wrong_type_names_key_value_and_expected_type():
    with pytest.raises(ConfigError, match=r"train.max_steps = 'many' is invalid: expected int"):
        load_config("default", ["train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"quant.load_in_4bit = 3 is invalid: expected bool"):
        load_config("default", ["quant.load_in_4bit=3"])


@pytest.mark.parametrize("override, expected", [
    ("lora.r=0", "'lora.r' is 0: it must be >= 1 (adapter rank"),
    ("train.max_steps=0", "'train.max_steps' is 0: it must be >= -1 and not 0"),
    ("train.learning_rate=-1e-4", "'train.learning_rate' is -0.0001: it must be > 0"),
    ("lora.dropout=1.0", "'lora.dropout' is 1.0: it must be >= 0 and < 1"),
    ("eval.loss_samples=0", "'eval.loss_samples' is 0: it must be >= 1"),
    ("train.eval_samples=-4", "'train.eval_samples' is -4: it must be >= 0"),
    ("serve.port=65536", "'serve.port' is 65536: it must be >= 1 and < 65536"),
    ("serve.max_queue=0", "'serve.max_queue' is 0: it must be >= 1"),  # 0 would refuse every request
    ("data.sources=[{path: a.json, weight: 0}]", "'data.sources[0].weight' is 0.0: it must be > 0"),
])
def test_out_of_range_numbers_name_the_key_and_the_range(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config("default", [override])
    assert expected in str(err.value)


@pytest.mark.parametrize("override, expected", [
    ("train.learning_rate=nan", "'train.learning_rate' is nan: it must be a finite number > 0 (peak learning rate"),
    ("train.learning_rate=.inf", "'train.learning_rate' is inf: it must be a finite number > 0"),
    ("lora.dropout=.nan", "'lora.dropout' is nan: it must be a finite number >= 0 and < 1"),
    ("train.max_grad_norm=inf", "'train.max_grad_norm' is inf: it must be a finite number >= 0"),
    ("preference.beta=-.inf", "'preference.beta' is -inf: it must be a finite number > 0"),
    ("data.sources=[{path: a.json, weight: .nan}]", "'data.sources[0].weight' is nan: it must be a finite number"),
])
def test_nan_and_infinity_are_refused_where_a_number_has_a_range(override, expected):
    # NaN compares False with every bound, so a range check alone let it through
    with pytest.raises(ConfigError) as err:
        load_config("default", [override])
    assert expected in str(err.value)


@pytest.mark.parametrize("override, expected", [
    ("lora.target_modules=[]", "'lora.target_modules' is []: name the layers that get adapters, e.g. [q_proj, v_proj]"),
    ("lora.target_modules=", "'lora.target_modules' is '': name the layers"),
    ("lora.target_modules=[q_proj, '']", "'lora.target_modules' is ['q_proj', '']: name the layers"),
    ("data.sources=[]", "'data.sources' is []: list at least one source, e.g. [{path: tatsu-lab/alpaca}]"),
    ("model.source=random:huge", "'model.source' is 'random:huge': no such random shape; known: random:tiny, "
                                 "random:smollm2-135m, random:llama2-7b"),
    ("model.source=", "'model.source' is '': name a model"),
])
def test_empty_or_unknown_values_fail_the_config_check_not_a_later_stage(override, expected, capsys):
    # these passed `config` and failed in 03, in plan, or trained adapters on no layer at all
    assert main(["config", "--set", override]) == 1
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_range_edges_and_null_are_accepted():
    cfg = load_config("default", ["train.max_steps=-1", "train.eval_samples=0", "lora.dropout=0",
                                  "serve.context_length=null", "eval.gsm8k_samples=0", "serve.port=65535"])
    assert cfg.train.max_steps == -1 and cfg.train.eval_samples == 0 and cfg.serve.context_length is None


def test_bad_choice_lists_the_choices():
    with pytest.raises(ConfigError) as err:
        load_config("default", ["quant.quant_type=int8"])
    assert "quant.quant_type = 'int8'" in str(err.value) and "'nf4', 'fp4'" in str(err.value)


def test_malformed_override():
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config("default", ["train.max_steps"])


def test_missing_config_file_lists_profiles():
    with pytest.raises(ConfigError, match="Config file not found.*profiles: .*default.*smoke"):
        load_config("no/such/file.yaml")


def test_extends_loop_is_an_error(tmp_path: Path):
    (tmp_path / "a.yaml").write_text(f"extends: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"extends: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")


def test_yaml_that_is_not_a_mapping(tmp_path: Path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(path)


TWICE = "; YAML would silently keep the last one. Remove one of them (or merge the two)."


def test_a_key_given_twice_in_a_profile_is_refused_with_its_lines_not_the_last_one_kept(tmp_path: Path, capsys):
    """Two `lora:` sections (or `r:` twice) loaded as the last one, silently: the profile said r: 8."""
    path = tmp_path / "twice.yaml"
    path.write_text("extends: smoke\nlora:\n  r: 8\ntrain:\n  max_steps: 3\nlora:\n  alpha: 4\n")
    assert main(["config", "--config", str(path)]) == 1
    assert capsys.readouterr().err == f"error: {path}: key 'lora' is given twice at line 2 and again at line 6{TWICE}\n"
    path.write_text("extends: smoke\nlora:\n  r: 8\n  alpha: 16\n  r: 4\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: key 'lora.r' is given twice at line 3 and again at "
                                                    f"line 5{TWICE}")):
        load_config(path)
    parent = tmp_path / "parent.yaml"  # in a profile it extends, read the same way
    parent.write_text("extends: smoke\ntrain: {max_steps: 3, max_steps: 4}\n")
    path.write_text(f"extends: {parent}\nlora:\n  r: 8\n")
    with pytest.raises(ConfigError, match=re.escape(f"{parent}: key 'train.max_steps' is given twice at line 2, "
                                                    f"column 9 and again at column 23")):
        load_config(path)
    assert main(["config", "--config", "smoke", "--set", "lora={r: 8, r: 16}"]) == 1  # and in a --set value
    assert capsys.readouterr().err == f"error: Override 'lora={{r: 8, r: 16}}': key 'lora.r' is given twice{TWICE}\n"
    # the same key in two mappings, and an anchor's key set again beside its `<<:`, are no repeats
    path.write_text("extends: smoke\ndata:\n  sources:\n    - &s {path: a.json, weight: 1}\n    - <<: *s\n"
                    "      weight: 2\n")
    assert [s.weight for s in load_config(path).data.sources] == [1, 2]


def test_config_is_frozen():
    cfg = load_config("default")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.learning_rate = 1.0  # type: ignore[misc]


def test_describe_config_changed_only_lists_what_the_profile_sets():
    rows = describe_config(load_config("smoke", ["lora.r=8"]), changed_only=True)
    by_key = {r["key"]: r for r in rows}
    assert by_key["model.source"]["value"] == "random:tiny" and by_key["model.source"]["default"] == "embedded"
    assert by_key["lora.r"]["value"] == 8 and by_key["lora.r"]["default"] == 16
    assert "quant.quant_type" not in by_key and all(r["value"] != r["default"] for r in rows)
    assert len(rows) == 37  # of 112 keys: recorded; update when the smoke profile or the defaults change


def test_describe_config_explains_every_key():
    rows = describe_config(load_config("default"))
    # recorded key counts per section: a key added or removed must be added here on purpose
    assert Counter(row["key"].split(".")[0] for row in rows) == {
        "model": 6, "quant": 5, "lora": 7, "data": 10, "train": 26, "eval": 20, "serve": 19,
        "preference": 19}
    assert all(row["help"] for row in rows)


def test_a_bad_value_is_reported_where_it_came_from_the_override_or_the_file(tmp_path: Path, capsys):
    assert main(["config", "--set", "lora.r=0"]) == 1
    assert capsys.readouterr().err.startswith("error: --set lora.r=0: 'lora.r' is 0: it must be >= 1")
    weights = "data.sources=[{path: a.json, weight: 0}]"
    assert main(["config", "--set", weights]) == 1
    assert f"error: --set {weights}: 'data.sources[0].weight' is 0.0" in capsys.readouterr().err
    assert main(["config", "--set", "trainer.x=1"]) == 1
    assert "error: --set trainer.x=1: Unknown key 'trainer'" in capsys.readouterr().err
    parent, child = tmp_path / "parent.yaml", tmp_path / "child.yaml"
    parent.write_text("extends: default\nlora:\n  r: 0\n")
    child.write_text(f"extends: {parent}\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match=r"^parent\.yaml: 'lora\.r' is 0"):  # the file that sets it
        load_config(child, ["train.max_steps=4"])
    child.write_text(f"extends: {parent}\nlora:\n  r: -2\n")
    with pytest.raises(ConfigError, match=r"^child\.yaml: 'lora\.r' is -2"):
        load_config(child)
    assert load_config(child, ["lora.r=8"]).lora.r == 8  # an override that fixes the file's value


def test_a_config_file_that_is_not_utf8_says_so_with_the_position(tmp_path: Path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"extends: default\n# caf\xe9\n")  # Latin-1, as an old editor saves it
    assert main(["config", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path} is not UTF-8 text (line 2, byte 22: invalid continuation byte). Re-save it as UTF-8." in err
    assert "Traceback" not in err


@pytest.mark.parametrize("text", ["", "\n# only a comment\n"])
def test_an_empty_config_file_is_an_error_not_the_defaults(tmp_path: Path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"empty.yaml holds no settings.*extends: default"):
        load_config(path)


def test_config_prints_values_as_yaml_in_aligned_columns(capsys):
    assert main(["config", "--config", "smoke", "--set", "data.sources=[{path: a.json, weight: 2}]"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if not line.startswith(" ")}
    assert "SourceConfig" not in out  # a Python repr, which no profile or --set takes
    assert lines["data.sources"].endswith("  [{path: a.json, weight: 2.0}]")  # its help on the next line
    assert "  [q_proj, v_proj]  " in lines["lora.target_modules"] and "  null  " in lines["model.revision"]
    # every help text starts in one column, also after preference.gradient_accumulation_steps (38 characters)
    starts = {line.index(row["help"]) for row in describe_config(load_config("smoke")) for line in out.splitlines()
              if line.endswith(row["help"]) and (line.startswith(row["key"] + " ") or line.startswith(" "))}
    assert len(starts) == 1


@pytest.mark.parametrize("command", ["config", "plan", "train", "run"])
def test_config_option_is_explained_in_each_commands_help(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "a profile name in configs/ (default, llama2-7b, ...) or a YAML file" in " ".join(
        capsys.readouterr().out.split())


def test_a_reader_that_stops_early_gets_no_traceback():
    """`python -m qlora_helpers config | head -3` ended in a BrokenPipeError traceback on stderr."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-m", "qlora_helpers", "config", "--config", "default"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parents[1])
    child.stdout.close()  # before the child writes anything: its first flush meets a closed pipe
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 1 and "Traceback" not in err and "BrokenPipe" not in err, err
