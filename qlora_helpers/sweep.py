"""Parameter sweeps: the same papermill pipeline once per combination of settings, then one table
and two plots that answer "which settings work best?".

    python -m qlora_helpers sweep --config lora-targets          # a sweep file, configs/sweeps/*.yaml
    python -m qlora_helpers sweep --config default --grid lora.r=8,16 \\
        --grid 'lora.target_modules=[q_proj,v_proj],all-linear' --stages 01,03,04,05

Grid values are separated by commas outside brackets and quotes; each value is YAML, read exactly
as a `--set` value (`[q_proj,v_proj]` is one list value, `'"a,b"'` one string). Every combination
is validated with `load_config` before any run starts. Runs go one after another through
`runner.run_pipeline`, each into its own ordinary run folder:

    outputs/sweeps/<name>/
        sweep.json                  state: every run's overrides, status, error, executed notebook
        runs/<tag>/                 one run folder per combination (config.json, adapter/, eval.json, ...)
        comparison.csv, comparison.md, heldout_loss.png, loss_curves.png

A failed run is recorded and the sweep goes on. Rerunning the same sweep skips finished runs (the
last requested stage wrote its output and the run's config.json matches) and, inside an unfinished
run, the stages that already wrote theirs (the report each writes last, `runs.STAGES`); failed and
interrupted runs are tried again. A sweep's own folder is laid out here; its run folders by `runs.py`.

Imports: matplotlib, pandas and `plots` are imported where the comparison is written (heavy; planning needs none).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import CONFIG_DIR, load_config, origin_label, resolve_config_path
from .errors import ConfigError, QLoraError, UsageError
from .opening import config_differences, saved_config
from .paths import OUTPUTS_DIR, PROJECT_ROOT, read_json, run_dir, write_json_atomic, write_text_atomic
from .runner import applying_stages, run_pipeline, select_stages, stages_argument
from .runs import RunFolder, stage
from .sweep_grid import (  # noqa: F401 (expand_grid, parse_grid, run_tags: the grid's API, long imported from here)
    check_keys,
    combinations,
    expand_grid,
    fixed_keys,
    flatten_settings,
    override_text,
    parse_grid,
    run_tags,
    value_label,
)
from .tasks import metrics
from .user_yaml import read_yaml_file

SWEEP_DIR = CONFIG_DIR / "sweeps"
STATE_FILE = "sweep.json"


@dataclass(frozen=True)
class SweepRun:
    tag: str                        # run folder name under runs/
    values: dict[str, Any]          # the swept keys of this run -> values
    overrides: tuple[str, ...]      # everything passed to the runner: fixed settings, then `values`
    origins: tuple[str, ...] = ()   # where each override came from, for an error about its value


@dataclass(frozen=True)
class SweepPlan:
    name: str
    config: Path                    # the profile every run starts from
    stages: list[str]
    keys: list[str]                 # the swept keys, in order
    runs: list[SweepRun]
    folder: Path                    # outputs/sweeps/<name>/
    total: int = 0                  # combinations before --max-runs
    settings: tuple[str, ...] = field(default=())

    @property
    def runs_dir(self) -> Path:
        return self.folder / "runs"

    def run_folder(self, tag: str) -> RunFolder:
        return RunFolder(self.runs_dir / tag)


# --- the plan --------------------------------------------------------------------------------------


def resolve_sweep_source(config: str) -> tuple[Path, dict[str, Any] | None]:
    """(path, sweep spec) for a sweep file, (profile path, None) for a profile. A YAML file is a
    sweep file when it has `grid:` or `runs:` at the top; bare names are looked up in
    configs/sweeps/ after configs/."""
    try:
        path = resolve_config_path(config)
    except ConfigError:
        candidate = SWEEP_DIR / f"{config}.yaml"
        if not candidate.is_file():
            sweeps = sorted(p.stem for p in SWEEP_DIR.glob("*.yaml"))
            profiles = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
            raise ConfigError(f"No profile or sweep file {config!r}. Profiles: {', '.join(profiles)}; "
                              f"sweep files (configs/sweeps/): {', '.join(sweeps) or 'none'}.") from None
        path = candidate.resolve()
    data = read_yaml_file(path) or {}
    if isinstance(data, dict) and ("grid" in data or "runs" in data):
        return path, data
    return path, None


SWEEP_KEYS = {"name", "config", "stages", "set", "grid", "runs", "max_runs"}


def plan_sweep(config: str, grid: list[str] = (), overrides: list[str] = (), stages: str | None = None,
               max_runs: int | None = None, name: str | None = None,
               outputs_dir: str | None = None) -> SweepPlan:
    """Read the sweep (file and/or --grid), expand it and validate every run before any starts."""
    path, spec = resolve_sweep_source(config)
    spec = dict(spec or {})
    unknown = set(spec) - SWEEP_KEYS
    if unknown:
        raise ConfigError(f"{path.name}: unknown sweep key(s) {', '.join(sorted(unknown))}; "
                          f"a sweep file has {', '.join(sorted(SWEEP_KEYS))}.")
    profile = resolve_config_path(spec["config"]) if "config" in spec else path
    fixed = flatten_settings(spec.get("set"), f"{path.name}: set")
    combos = combinations(path, spec, grid)
    pinned = fixed_keys(fixed, list(overrides))  # a section's mapping (lora={r: 8}) fixes each key it names
    swept = check_keys(combos, pinned)
    grid_name = f"{path.stem}-{'-'.join(k.split('.')[-1] for k in swept)}"
    name = name or spec.get("name") or (path.stem if spec else grid_name)
    base_dir = Path(outputs_dir) if outputs_dir else OUTPUTS_DIR
    # run_dir: the naming rules of a run folder, and no file where a folder must go
    folder = run_dir(name, (base_dir if base_dir.is_absolute() else PROJECT_ROOT / base_dir) / "sweeps", False)
    # the settings fixed for every run, each with where it came from (an error about its value names it)
    given = ([(override_text(k, v), f"sweep file {path.name} set:") for k, v in fixed.items()]
             + [(text, "--set") for text in overrides]
             + [(override_text("train.wandb_group", name), "the sweep's name")] * ("train.wandb_group" not in pinned))
    settings = [text for text, _ in given]
    stages = stages if stages is not None else _stages_text(spec.get("stages"))  # "" is refused, not "all"
    stage_list = [s.number for s in select_stages(stages)]
    total = len(combos)
    limit = max_runs if max_runs is not None else spec.get("max_runs")
    if limit is not None:
        if not isinstance(limit, int) or limit < 1:
            raise ConfigError(f"max_runs must be a positive whole number, not {limit!r}.")
        combos = combos[:limit]
    runs = []
    for i, (tag, combo) in enumerate(zip(run_tags(combos), combos)):
        swept_from = [f"sweep file {path.name} runs[{i}]" if "runs" in spec else f"sweep grid key {k}" for k in combo]
        pairs = given + [(override_text(k, v), how) for (k, v), how in zip(combo.items(), swept_from)]
        runs.append(SweepRun(tag, combo, tuple(t for t, _ in pairs), tuple(origin_label(o, t) for t, o in pairs)))
    plan = SweepPlan(name, profile, stage_list, swept, runs, folder, total, tuple(settings))
    validate_plan(plan)
    check_set_up(plan)
    return plan


def check_set_up(plan: SweepPlan) -> None:
    """Stages without 01 continue runs 01 set up: refused before anything is made when none of the
    sweep's runs is set up (each would fail late, one by one); resuming a sweep that has some is not
    (run_sweep skips the runs never set up, saying so, and the sweep ends unfinished)."""
    if not all(never_set_up(plan, r) for r in plan.runs):
        return
    stages = ",".join(plan.stages)
    raise UsageError(f"The sweep's stages ({stages}) leave out 01, and none of sweep {plan.name!r}'s "
                     f"{len(plan.runs)} runs has been set up (nothing in {plan.runs_dir}): 01 sets each run up. "
                     f"Start the sweep with 01 (--stages 01,{stages}), or leave --stages out for every stage.")


def never_set_up(plan: SweepPlan, run: SweepRun) -> bool:
    """A run the plan's stages cannot start: 01 is not among them and never set it up (no config.json)."""
    return "01" not in plan.stages and not plan.run_folder(run.tag).config_file.is_file()


def _stages_text(value: Any) -> str | None:
    """A sweep file's `stages:` as the runner takes it; YAML reads `stages: 01` as the number 1."""
    if value is None or isinstance(value, str):
        return value
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, (int, str)) and not isinstance(v, bool) for v in items):
        raise ConfigError(f"stages: {value!r} must be stage numbers, like 01,03,04,05.")
    return ",".join(f"{v:02d}" if isinstance(v, int) else v for v in items)


def validate_plan(plan: SweepPlan) -> None:
    """Every run's config must load and run one of the stages, no two runs may load the same settings
    (`q_proj` and `[q_proj]` are one value once loaded), and a run folder left by an earlier sweep must
    match its run."""
    loaded: dict[str, tuple[int, str]] = {}
    for i, run in enumerate(plan.runs, 1):
        label = " ".join(f"{k}={value_label(v)}" for k, v in run.values.items())
        try:
            cfg = load_config(plan.config, run.overrides, run.origins or None)
            applying_stages([stage(n) for n in plan.stages], cfg)  # as `run` refuses 04b alone, preference off
        except QLoraError as exc:
            raise type(exc)(f"Sweep {plan.name!r}, run {i} ({label}): {exc}") from None
        written = ", ".join(override_text(k, v) for k, v in run.values.items())  # as given: "q_proj", ["q_proj"]
        same = loaded.setdefault(json.dumps(cfg.to_dict(), sort_keys=True), (i, written))
        if same[0] != i:
            raise ConfigError(
                f"Sweep {plan.name!r}: run {same[0]} ({same[1]}) and run {i} ({written}) load the same settings "
                f"(the config reads both values alike), so they would train the same model twice. Keep one "
                f"of the two values.")
        folder = plan.run_folder(run.tag)
        old = saved_config(folder)
        if old is not None and old != cfg:
            changed = config_differences(cfg, old)
            raise ConfigError(
                f"{folder.path} was made with other settings ({'; '.join(changed[:3])}). Delete that "
                f"folder to redo the run, or give this sweep another name (--name).")


# --- resume ------------------------------------------------------------------------------------------


def stage_done(folder: RunFolder, number: str) -> bool:
    """Did this stage write its report (the file it writes last, `runs.STAGES`)?"""
    return stage(number).done(folder)


def remaining_stages(plan: SweepPlan, run: SweepRun) -> list[str]:
    """The stages still to execute: none when finished, else from the first one without its outputs.
    Runs whose config.json is missing start over (validate_plan has refused a different one)."""
    folder = plan.run_folder(run.tag)
    if not folder.config_file.is_file():
        return list(plan.stages)
    cfg = saved_config(folder)  # a stage the run's profile leaves out (04b) is never "to do"
    for i, number in enumerate(plan.stages):
        if stage(number).applies(cfg) and not stage_done(folder, number):
            return plan.stages[i:]
    return []


# --- running -----------------------------------------------------------------------------------------


def _load_state(plan: SweepPlan) -> dict[str, Any]:
    path = plan.folder / STATE_FILE
    old = read_json(path) if path.is_file() else {}
    previous = {r["tag"]: r for r in old.get("runs", [])}
    runs = [{"status": "pending", "attempts": 0, **previous.get(r.tag, {}), "tag": r.tag,
             "values": r.values, "overrides": list(r.overrides)} for r in plan.runs]
    return {"name": plan.name, "config": str(plan.config), "stages": plan.stages, "keys": plan.keys,
            "settings": list(plan.settings), "combinations": plan.total, "runs": runs}


def _save_state(plan: SweepPlan, state: dict[str, Any]) -> None:
    state["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json_atomic(plan.folder / STATE_FILE, state)


def _failed_notebook(folder: RunFolder) -> str | None:
    for notebook in sorted(folder.notebooks_dir.glob("*.ipynb")):
        meta = json.loads(notebook.read_text(encoding="utf-8")).get("metadata", {}).get("papermill", {})
        if meta.get("exception"):
            return str(notebook)
    return None


def run_sweep(plan: SweepPlan, progress: bool = True) -> dict[str, Any]:
    """Execute the plan's runs one after another; record each; write the comparison after each."""
    state = _load_state(plan)
    _save_state(plan, state)
    if len(plan.runs) < plan.total:
        print(f"[sweep {plan.name}] --max-runs: {len(plan.runs)} of {plan.total} combinations", flush=True)
    for i, (run, record) in enumerate(zip(plan.runs, state["runs"]), 1):
        label = " ".join(f"{k}={value_label(v)}" for k, v in run.values.items())
        todo = remaining_stages(plan, run)
        head = f"[sweep {plan.name}] run {i}/{len(plan.runs)} {run.tag} ({label})"
        if never_set_up(plan, run):  # its first stage would only fail, a kernel start later
            stages = ",".join(plan.stages)
            why = f"never set up, and the stages ({stages}) leave out 01, which sets a run up"
            print(f"{head}: skipped, {why} (--stages 01,{stages} runs it)", flush=True)
            record.update(status="not set up", error=why, notebook=None)
            continue
        if not todo:
            print(f"{head}: finished earlier, skipped", flush=True)
            record.update(status="finished", error=None, notebook=None)
            continue
        resumed = todo != plan.stages and plan.run_folder(run.tag).config_file.is_file()
        print(f"{head}: stages {','.join(todo)}" + (" (resuming: earlier stages are done)" if resumed else ""),
              flush=True)
        record.update(status="running", attempts=record["attempts"] + 1, error=None, notebook=None,
                      started=time.strftime("%Y-%m-%dT%H:%M:%S"), stages_run=todo)
        _save_state(plan, state)
        write_json_atomic(RunFolder(run_dir(run.tag, plan.runs_dir)).sweep_info_file,
                          {"sweep": plan.name, "tag": run.tag, "values": run.values})
        start = time.perf_counter()
        try:
            run_pipeline(str(plan.config), run.tag, run.overrides, todo, str(plan.runs_dir), progress)
        except KeyboardInterrupt:  # Ctrl-C: record it and keep the comparison current, then stop
            record.update(status="interrupted", seconds=time.perf_counter() - start)
            _save_state(plan, state)
            write_comparison(plan.folder)
            raise
        except Exception as exc:  # noqa: BLE001 -- one broken run must not stop the sweep
            record.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                          notebook=_failed_notebook(plan.run_folder(run.tag)))
            print(f"{head}: FAILED -- {record['error']}", flush=True)
        else:
            record.update(status="finished")
        record["seconds"] = time.perf_counter() - start
        _save_state(plan, state)
        write_comparison(plan.folder)
    _save_state(plan, state)
    write_comparison(plan.folder)
    return state


# --- the comparison --------------------------------------------------------------------------------


def _read_optional(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _eval_columns(report: dict[str, Any]) -> dict[str, Any]:
    """A run's eval.json as sweep columns, in tasks.py's order: each metric's tuned value; one that 04
    measured first (held-out loss) replaces 04's columns with 05's value and example count."""
    columns = {}
    for task, metric in metrics():
        sides = report["summary"].get(metric.name)
        if sides is None:
            continue
        tuned, base, examples = metric.sweep_columns or (metric.name, None, None)
        columns[tuned] = sides["tuned"]
        if base:
            columns.update({base: sides["base"], examples: report["samples"][task.name]})
    return columns


def collect_results(folder: Path) -> list[dict[str, Any]]:
    """One row per run of the sweep: its swept values, status, and what its stages measured."""
    state = read_json(folder / STATE_FILE)
    rows = []
    for record in state["runs"]:
        run_folder = RunFolder(folder / "runs" / record["tag"])
        row = {"run": record["tag"], **{k: value_label(v) for k, v in record["values"].items()},
               "status": record["status"]}
        log = _read_optional(run_folder.train_log)
        if log:
            s = log["summary"]
            row.update({"train_seconds": s.get("train_seconds"), "train_cpu_seconds": s.get("train_cpu_seconds"),
                        "steps": s.get("steps"),
                        "trainable_params": s.get("parameters", {}).get("trainable"),
                        "peak_memory_mib": s.get("peak_memory_mib"), "memory_kind": s.get("peak_memory_kind"),
                        "final_train_loss": s.get("final_logged_loss"),
                        "heldout_loss_base": s.get("heldout_loss_base"), "heldout_loss": s.get("heldout_loss_tuned"),
                        "heldout_examples": s.get("eval_examples")})
            if s.get("resumed_from"):
                row["note"] = "training resumed: its time covers the resumed part only"
        report = _read_optional(run_folder.eval_report)
        if report:
            row.update(_eval_columns(report))
        if record["status"] in ("failed", "not set up"):
            row["note"] = record.get("error", "")[:200]
        rows.append(row)
    return rows


def write_comparison(folder: Path) -> dict[str, Path]:
    """comparison.csv / .md and the two plots, from every run's train_log.json and eval.json."""
    import matplotlib.pyplot as plt
    import pandas as pd

    from .plots import plot_heldout_by_key, plot_loss_curves, save

    folder = Path(folder)
    state = read_json(folder / STATE_FILE)
    table = pd.DataFrame(collect_results(folder))
    written = {"csv": folder / "comparison.csv", "markdown": folder / "comparison.md"}
    write_text_atomic(written["csv"], table.to_csv(index=False))
    counts = {"steps", "trainable_params", "heldout_examples"}  # whole numbers, even where NaN made them float
    floatfmt = [",.0f" if c in counts else ".4g" for c in table.columns]
    shown = table.astype(object).where(table.notna(), None)  # tabulate leaves None cells blank, not NaN
    markdown = shown.to_markdown(index=False, floatfmt=floatfmt, missingval="")
    write_text_atomic(written["markdown"], markdown + "\n")
    done = table[table["status"] == "finished"] if "heldout_loss" in table else table.iloc[0:0]
    if len(done):
        fig = plot_heldout_by_key(done.to_dict("records"), state["keys"])
        save(fig, written.setdefault("heldout_plot", folder / "heldout_loss.png"))
        plt.close(fig)
    curves = {}
    for record in state["runs"]:
        log = _read_optional(RunFolder(folder / "runs" / record["tag"]).train_log)
        if log:
            label = ", ".join(f"{k.split('.')[-1]}={value_label(v)}" for k, v in record["values"].items())
            curves[label or record["tag"]] = log["log_history"]
    if curves:
        # the runs trained on the same batches in the same order unless the sweep changes the data or a seed
        same_batches = not any(k.startswith("data.") or k.endswith("seed") for k in state["keys"])
        fig = plot_loss_curves(curves, same_batches=same_batches)
        save(fig, written.setdefault("curves_plot", folder / "loss_curves.png"))
        plt.close(fig)
    return written


def sweeps_dir(outputs_dir: str | None = None) -> Path:
    """Where sweeps live: <outputs>/sweeps/, or the sweeps folder a sweep's own run sits in."""
    base = Path(outputs_dir) if outputs_dir else OUTPUTS_DIR
    base = base if base.is_absolute() else PROJECT_ROOT / base
    inside = [p for p in (base, *base.parents) if p.name == "sweeps"]
    return inside[0] if inside else base / "sweeps"


def latest_sweep(outputs_dir: str | None = None) -> dict[str, Any]:
    """The most recently updated sweep: {'summary': one line, 'table': DataFrame or None, 'figures': [...]}."""
    import pandas as pd

    root = sweeps_dir(outputs_dir)
    found = sorted(root.glob(f"*/{STATE_FILE}"), key=lambda p: p.stat().st_mtime)
    found = [p for p in found if (p.parent / "comparison.csv").is_file()]
    if not found:
        return {"summary": f"No sweep in {root} yet. Try: python -m qlora_helpers sweep --config lora-targets",
                "table": None, "figures": []}
    folder = found[-1].parent
    state = read_json(folder / STATE_FILE)
    statuses = [r["status"] for r in state["runs"]]
    counts = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses))
    figures = [folder / name for name in ("heldout_loss.png", "loss_curves.png") if (folder / name).is_file()]
    summary = f"sweep {state['name']} ({folder}): {len(statuses)} runs, {counts}; updated {state.get('updated')}"
    return {"summary": summary, "table": pd.read_csv(folder / "comparison.csv"), "figures": figures}


# --- command line ---------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    parser.add_argument("--config", default="default",
                        help="a sweep file (configs/sweeps/*.yaml, e.g. lora-targets) or a profile with --grid")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="values to sweep, comma-separated outside brackets/quotes, each read like a --set "
                             "value: --grid lora.r=8,16 --grid 'lora.target_modules=[q_proj,v_proj],all-linear'")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting fixed for every run (repeatable)")
    parser.add_argument("--stages", type=stages_argument,
                        help="comma-separated stages per run (default: the sweep file's, else all)")
    parser.add_argument("--max-runs", type=int, help="run only the first N combinations")
    parser.add_argument("--name", help="sweep name (default: the sweep file's name, else profile + swept keys)")
    parser.add_argument("--outputs-dir", help="outputs root; the sweep goes to <root>/sweeps/<name>/")


def sweep_command(args) -> int:
    plan = plan_sweep(args.config, args.grid, args.overrides, args.stages, args.max_runs, args.name,
                      args.outputs_dir)
    try:
        state = run_sweep(plan)
    except KeyboardInterrupt:
        print(f"Sweep {plan.name} interrupted; run the same command again to finish the missing runs.")
        return 130
    print((plan.folder / "comparison.md").read_text(encoding="utf-8"))
    failed = [r["tag"] for r in state["runs"] if r["status"] not in ("finished", "not set up")]
    unset = [r["tag"] for r in state["runs"] if r["status"] == "not set up"]
    print(f"Sweep {plan.name}: {len(state['runs']) - len(failed) - len(unset)} of {len(state['runs'])} runs finished; "
          f"comparison in {plan.folder}" + (f"; failed: {', '.join(failed)} (rerun to retry)" if failed else "")
          + (f"; not set up: {', '.join(unset)} (rerun with 01 in --stages)" if unset else ""))
    return 1 if failed or unset else 0
