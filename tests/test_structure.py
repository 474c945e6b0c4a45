"""The package's shape, read from the source (nothing is imported or run): no import cycle, and no
module or function past the size limits of docs/design.md's style rules.

Every `import` of qlora_helpers is followed, the ones inside functions included (an import moved into
a function still runs, it only runs later: it hides a cycle, it does not remove it). Imports under
`if TYPE_CHECKING:` are left out: they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from qlora_helpers.errors import QLoraError
from qlora_helpers.paths import PROJECT_ROOT
from qlora_helpers.runs import STAGES, stage

PACKAGE = "qlora_helpers"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60

# Offenders today in files other helpers are reworking, each with its owner; the lead clears an entry
# once its owner's branch is merged (a stale entry fails too, so the list only shrinks).
ALLOWED_OFFENDERS: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_files() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((PROJECT_ROOT / PACKAGE).rglob("*.py"))}


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside `if TYPE_CHECKING:` blocks."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported package module, line) for every import statement in the file, at any depth."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = _type_checking_only(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            # `from pkg import mod` imports the module pkg.mod; `from pkg import name` only pkg
            targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import qlora_helpers.serve.x as y` etc.
                target = target.rpartition(".")[0]
            if target and target != name:
                found.append((target, node.lineno))
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {module it imports: line of the first such import}."""
    modules = package_files()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges: dict[str, int] = {}
        for target, line in imports_of(name, path, modules):
            edges.setdefault(target, line)
        graph[name] = edges
    return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's components with more than one module (a module cannot import itself here)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def one_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> str:
    """The shortest cycle through the component's first module: a (line N) -> b (line M) -> ... -> a,
    each line the import that makes the arrow."""
    members, start = set(component), component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        ahead = []
        for here in frontier:
            if start in graph[here] and (here != start):
                path = [here]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                path = path[::-1] + [start]
                return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(path, path[1:])) + f" -> {start}"
            for w in sorted(graph[here]):
                if w in members and w not in parent and w != start:
                    parent[w] = here
                    ahead.append(w)
        frontier = ahead
    raise AssertionError(f"no cycle through {start} in {component}")


def test_no_import_cycle():
    graph = import_graph()
    assert "qlora_helpers.serve.engine" in graph and graph["qlora_helpers.serve.engine"], "the walk found nothing"
    cycles = [one_cycle(graph, c) for c in strongly_connected(graph)]
    assert not cycles, "import cycles (an import inside a function counts too):\n" + "\n".join(cycles)


def test_the_cycle_finder_finds_a_cycle_and_names_its_lines():
    graph = {"a": {"b": 3}, "b": {"c": 5}, "c": {"a": 7}, "d": {"a": 1}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert one_cycle(graph, ["a", "b", "c"]) == "a (line 3) -> b (line 5) -> c (line 7) -> a"
    assert strongly_connected({"a": {"b": 1}, "b": {}}) == []


def test_in_function_imports_are_walked(tmp_path):
    modules = {"qlora_helpers.x": tmp_path / "x.py", "qlora_helpers.y": tmp_path / "y.py"}
    modules["qlora_helpers.x"].write_text("def f():\n    from .y import g\n    return g\n")
    modules["qlora_helpers.y"].write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                          "    from . import x\n")
    assert imports_of("qlora_helpers.x", modules["qlora_helpers.x"], modules) == [("qlora_helpers.y", 2)]
    assert imports_of("qlora_helpers.y", modules["qlora_helpers.y"], modules) == []


def size_offenders() -> dict[str, int]:
    """{"path" or "path:function": lines} for modules over MAX_MODULE_LINES lines and functions over
    MAX_FUNCTION_LINES (def to last line), in every Python file of the repository but benchmarks/."""
    found = {}
    for path in sorted(PROJECT_ROOT.rglob("*.py")):
        rel = path.relative_to(PROJECT_ROOT).as_posix()
        if rel.split("/")[0] in {"benchmarks", "outputs", "build"} or "/." in f"/{rel}":  # .venv, .git ...
            continue
        source = path.read_text()
        lines = len(source.splitlines())
        if lines > MAX_MODULE_LINES:
            found[rel] = lines
        for node in ast.walk(ast.parse(source, filename=rel)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found[f"{rel}:{node.name}"] = length
    return found


def test_no_module_or_function_over_the_size_limits():
    found = size_offenders()
    new = [f"{where}: {n} lines" for where, n in found.items() if where not in ALLOWED_OFFENDERS]
    stale = [where for where in ALLOWED_OFFENDERS if where not in found]
    assert not new, (f"over {MAX_MODULE_LINES} lines (a module) or {MAX_FUNCTION_LINES} (a function); "
                     f"split it (docs/design.md, style rules):\n" + "\n".join(new))
    assert not stale, "within the limits now: remove from ALLOWED_OFFENDERS (tests/test_structure.py):\n" + \
        "\n".join(stale)


# --- stages only orchestrate ----------------------------------------------------------------------

STAGE_OF = {"qlora_helpers.quantize": "02", "qlora_helpers.data": "03", "qlora_helpers.train": "04",
            "qlora_helpers.preference": "04b", "qlora_helpers.preference_data": "04b",
            "qlora_helpers.evaluate": "05", "qlora_helpers.serve": "06"}

# Stage modules allowed to import another stage's module while an owner moves what they share into the
# core below the stages (empty since issue 22: every stage imports only the core); a stale entry fails.
ALLOWED_STAGE_IMPORTS: dict[tuple[str, str], str] = {}


def stage_of(module: str) -> str | None:
    return next((s for m, s in STAGE_OF.items() if module == m or module.startswith(m + ".")), None)


def test_stage_modules_import_only_the_core_not_each_other():
    graph = import_graph()
    crossing = {(a, b) for a, edges in graph.items() for b in edges
                if stage_of(a) and stage_of(b) and stage_of(a) != stage_of(b)}
    new = sorted(f"{a} (stage {stage_of(a)}) imports {b} (stage {stage_of(b)}), line {graph[a][b]}"
                 for a, b in crossing - set(ALLOWED_STAGE_IMPORTS))
    stale = sorted(f"{a} -> {b}" for a, b in set(ALLOWED_STAGE_IMPORTS) - crossing)
    assert not new, "a stage module imports another stage's: move what both need below the stages:\n" + \
        "\n".join(new)
    assert not stale, "gone: remove from ALLOWED_STAGE_IMPORTS (tests/test_structure.py):\n" + "\n".join(stale)


def test_each_stage_sequence_has_one_owner():
    """A stage's sequence is its notebook, cell by cell. Only the stages the `train` command runs
    without notebooks (03, 04) have an entry point besides, `run_stage` over the same functions the
    cells call; no other module keeps a second copy of a stage's sequence."""
    defined = set()
    for name, path in package_files().items():
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.FunctionDef) and n.name == "run_stage" for n in tree.body):
            defined.add(f"{name}:run_stage")
    assert defined == {s.entry for s in STAGES if s.entry}
    assert [s.number for s in STAGES if s.entry] == ["03", "04", "04b"]  # 04b: trains like 04 (tests, GPU benchmark)


def test_a_notebook_only_stage_says_how_to_run_it():
    for number in ("02", "05", "06"):
        with pytest.raises(QLoraError, match=f"runs as its notebook, notebooks/{number}_.*--stages {number}"):
            stage(number).run(None)
    with pytest.raises(QLoraError, match="setup_run"):
        stage("01").run(None)
