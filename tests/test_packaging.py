"""The pins in requirements.txt and environment.yml must agree; notebooks are committed clean."""

import json
import re

import yaml

from qlora_helpers.paths import PROJECT_ROOT


def _pins(lines):
    return {m.group(1).lower(): m.group(2) for line in lines
            if (m := re.match(r"^\s*([A-Za-z0-9_.\-\[\]]+)==([^\s#;]+)", line))}


def test_environment_yml_matches_requirements():
    req = _pins((PROJECT_ROOT / "requirements.txt").read_text().splitlines())
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    conda_pins = _pins(pip_section)
    assert conda_pins == req
    assert len(req) >= 10


def test_source_notebooks_have_no_outputs_and_a_parameters_cell():
    notebooks = sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb"))
    assert [p.name.split("_")[0] for p in notebooks][:7] == ["01", "02", "03", "04", "04b", "05", "06"]
    for path in notebooks:
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert all(not c.get("outputs") and not c.get("execution_count") for c in code), path.name
        assert sum("parameters" in c.get("metadata", {}).get("tags", []) for c in code) == 1, path.name
        assert not any(re.search(r"^\s*(def|class) ", "".join(c["source"]), re.M) for c in code), path.name


def test_the_gguf_extra_is_pinned_in_requirements_gguf():
    line = re.search(r"^gguf = \[(.*)\]$", (PROJECT_ROOT / "pyproject.toml").read_text(), re.M).group(1)
    extra = re.findall(r'"([^"]+)"', line)
    pins = _pins((PROJECT_ROOT / "requirements-gguf.txt").read_text().splitlines())
    assert sorted(re.split(r"[<>=~!]", d)[0].lower() for d in extra) == sorted(pins) == ["llama-cpp-python",
                                                                                         "sentencepiece"]
    assert pins["llama-cpp-python"] == "0.3.36"
