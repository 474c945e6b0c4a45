"""Where the data comes from: files in the data directory, hub ids and their offline copies, and the
built-in data a run falls back to when neither is there. Shared by stage 03 (training sets), 04b
(preference pairs) and 05 (evaluation tasks).

`datasets` and pyarrow are imported inside the functions that use them: they are heavy (seconds) and
most callers (validation, the unit tests) need neither.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import random
import socket
import urllib.parse
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import builtin_data
from .config import DataConfig, SourceConfig
from .errors import DataError
from .formats import RowProblem
from .paths import PROJECT_ROOT, read_utf8


@dataclass(frozen=True)
class HubDataset:
    """A hub dataset we know: its config name, and per split the offline copy in the data directory."""
    config: str | None
    offline: dict[str, str]


# Hub ids the profiles name, with the files of an offline data directory (QLORA_DATA_DIR or
# data.data_dir, laid out as below) that stand in for them when the hub is out of reach. Without
# either, a run trains on the project's built-in data instead (builtin_data.py, `training_sources`).
HUB_DATASETS = {
    "tatsu-lab/alpaca": HubDataset(None, {"train": "alpaca/alpaca_5000.json"}),
    "openai/gsm8k": HubDataset("main", {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}),
    "google/IFEval": HubDataset(None, {"train": "eval/ifeval/input_data.jsonl"}),
    "tatsu-lab/alpaca_eval": HubDataset("alpaca_eval",
                                        {"eval": "eval/alpaca_eval/alpaca_eval_805_example_outputs.json"}),
    "HuggingFaceH4/mt_bench_prompts": HubDataset(None, {"train": "eval/mt_bench/question.jsonl"}),
}
HUB_DATASETS["gsm8k"] = HUB_DATASETS["openai/gsm8k"]
HUB_PROBE_SECONDS = 3.0


class DataUnavailable(DataError):
    """A data source is neither reachable on the hub nor present in the data directory."""



# --- reading -------------------------------------------------------------------------------------


def resolve_data_dir(data_cfg: DataConfig, required: bool = True) -> Path | None:
    """data.data_dir (relative: to the project root), else $QLORA_DATA_DIR, else None."""
    configured = data_cfg.data_dir or os.environ.get("QLORA_DATA_DIR")
    if not configured:
        if not required:
            return None
        raise DataUnavailable("No data directory: set QLORA_DATA_DIR in the environment (or data.data_dir "
                              "in the config) to the folder holding your data files.")
    path = Path(configured).expanduser()
    if not path.is_absolute() and data_cfg.data_dir:
        path = PROJECT_ROOT / path
    if not path.is_dir():
        raise DataError(f"Data directory {path} does not exist (from "
                        f"{'data.data_dir' if data_cfg.data_dir else 'QLORA_DATA_DIR'}).")
    return path


@functools.cache
def _endpoint_unreachable(endpoint: str) -> str | None:
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as exc:
        return f"{url.hostname}:{port} unreachable: {exc}"
    return None


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached now (None: it can). One quick connection per process
    and endpoint instead of `datasets`' own retries, which take ~25 s per dataset when offline."""
    for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(flag, "").lower() in ("1", "true", "yes", "on"):
            return f"{flag} is set"
    return _endpoint_unreachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


def read_records(path: Path) -> list[Any]:
    """Rows of a JSON array, JSONL, CSV or Parquet file; parse errors name the file and position.

    A CSV row whose field count differs from the header's comes back as a `RowProblem` in its place:
    stages 03 and 04b drop and count it like any other unusable row (`load_table` refuses it for the
    callers that cannot drop rows)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: not a readable Parquet file ({exc}).") from None
    if suffix not in (".json", ".jsonl", ".csv"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl, .csv or .parquet.")
    text = read_utf8(path, DataError)
    if suffix == ".csv":
        return _csv_records(path, text)  # untranslated: csv reads line ends itself (quoted ones are data)
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # CRLF and CR line ends, as open() reads them
    if suffix == ".jsonl":
        return _jsonl_records(path, text)
    if not text.strip():
        return []  # no rows: said as such by the caller (`formats.require_rows`), not as a JSON error
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno} "
                        f"({exc.msg}). Is the file truncated?") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read (thousands of levels); the file must "
                        f"hold an array of flat records.") from None
    if not isinstance(rows, list):
        raise DataError(f"{path} must hold a JSON array of records, not a {type(rows).__name__}.")
    return rows


def _jsonl_records(path: Path, text: str) -> list[Any]:
    """One JSON value per line. Lines end at \\n only: str.splitlines() would also split at characters
    JSON strings may hold raw (U+2028, U+2029, \\x85, ...), cutting a valid record in two."""
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {lineno}: not valid JSON ({exc.msg}, column "
                            f"{exc.colno}). Fix or delete that line.") from None
        except RecursionError:
            raise DataError(f"{path}, line {lineno}: JSON nested too deeply to read (thousands of levels); "
                            "a record is a flat object of text fields. Fix or delete that line.") from None
    return rows


def _csv_records(path: Path, text: str) -> list[Any]:
    """Rows of a CSV file as {header column: field}. Read as a stream with newline='' (what the csv
    module requires), so a quoted field keeps its line breaks; blank lines are skipped. A row with
    more or fewer fields than the header is a RowProblem in its place, never cut or padded."""
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[Any] = []
    start = 1
    try:
        header = next(reader, None)
        if header is None:
            return []
        if repeated := sorted({c for c in header if header.count(c) > 1}):
            raise DataError(f"{path}, line 1: the header names the column(s) {repeated} more than once, so "
                            f"one of each would be lost. Give every column its own name.")
        start = reader.line_num + 1
        for fields in reader:
            if fields and len(fields) != len(header):
                lines, hint = f"line {start}", ""
                if reader.line_num > start:
                    lines = f"lines {start}-{reader.line_num}"
                    hint = "; a quoted field runs over several lines: is a quote unclosed?"
                rows.append(RowProblem("wrong_field_count", f"row {len(rows) + 1} ({lines}) has {len(fields)} "
                                       f"field(s), the header has {len(header)}{hint}"))
            elif fields:
                rows.append(dict(zip(header, fields)))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}, the row starting at line {start}: not readable as CSV ({exc}). An unclosed "
                        f"quote makes the rest of the file one field: check the quotes from that line on.") from None
    return rows


def looks_like_file(text: str) -> bool:
    return text.lower().endswith((".json", ".jsonl", ".csv", ".parquet")) or text.startswith(("/", ".", "~"))


def load_table(ref: str, data_cfg: DataConfig, split: str = "train",
               keep_bad_rows: bool = False) -> tuple[list[Any], str]:
    """(rows, where they came from) for a file (relative: in the data directory), a hub dataset id
    (from the hub, else its offline copy) or `builtin` (generated). DataUnavailable when not there.
    A row that could not be read (`read_records`) is a RowProblem in the rows with keep_bad_rows (the
    caller drops and counts it), else an error naming it."""
    if ref == builtin_data.SOURCE:
        return (builtin_data.generate_records(data_cfg.seed),
                f"built-in: generated by qlora_helpers/builtin_data.py from data.seed={data_cfg.seed}")
    if not looks_like_file(ref):
        refuse_local_lookalike(ref, data_cfg)
        return _load_hub(ref, split, data_cfg)
    path = data_file(ref, data_cfg)
    rows = read_records(path)
    bad = next((r for r in rows if isinstance(r, RowProblem)), None)
    if bad is not None and not keep_bad_rows:
        raise DataError(f"{path}: {bad.detail}. Give every row one field per header column.")
    return rows, str(path)


def check_sources(data_cfg: DataConfig) -> str | None:
    """Before any stage starts: fail now when a training file is missing (the same DataUnavailable that
    loading it would raise minutes later); return why the run trains on the built-in data instead
    when a hub source is out of reach and has no offline copy (None: every source can be read)."""
    return training_sources(data_cfg)[1]


def unreadable_hub_sources(data_cfg: DataConfig) -> list[str]:
    """Per hub source that can be read from nowhere now (hub out of reach, no offline copy): why.
    A missing file raises instead: a file is the user's own data, never replaced."""
    reasons = []
    for src in data_cfg.sources:
        if src.path == builtin_data.SOURCE:
            continue
        if looks_like_file(src.path):
            data_file(src.path, data_cfg)
            continue
        refuse_local_lookalike(src.path, data_cfg)
        if (why := hub_unreachable()) is not None:
            path, where = _offline_copy_path(src.path, src.split, data_cfg)
            if path is None:
                hint = ("; it has no '/', and hub dataset ids are org/name (a few old ones aside): for a file in "
                        "the data directory give its suffix (.json, .jsonl, .csv, .parquet) or a leading ./"
                        if "/" not in src.path else "")
                reasons.append(f"hub dataset {src.path!r} is unreachable ({why}) and has no offline copy "
                               f"({where}){hint}")
    return reasons


def refuse_local_lookalike(ref: str, data_cfg: DataConfig) -> None:
    """A source read as a hub dataset id (no file suffix, no leading ./ or /) must not also name a file or
    folder in the data directory or the current directory: `path: mine` meant for a local file was
    loaded from the hub, or offline replaced by the built-in data, without a word about the file. A
    known hub id's own offline-copy folder (`gsm8k/` for `gsm8k`) is not a lookalike."""
    if ref == builtin_data.SOURCE:
        return
    known = HUB_DATASETS.get(ref)
    own_copy = known is not None and any(copy.startswith(f"{ref}/") for copy in known.offline.values())
    data_dir = resolve_data_dir(data_cfg, required=False)
    places = [(data_dir, "in the data directory")] if data_dir and not own_copy else []
    for folder, where in [*places, (Path.cwd(), "in the current directory")]:
        local = folder / ref
        if local.exists():
            kind = "folder" if local.is_dir() else "file"
            mine = (f"write {'./' + ref!r} (relative paths are in the data directory)" if folder == data_dir
                    else f"give its full path, {str(local.resolve())!r}")
            hub = ("give its full id, org/name" if "/" not in ref else
                   f"move or rename the local {kind} (datasets itself would read a folder of that name)")
            raise DataError(f"Data source {ref!r} reads as a hub dataset id (no .json, .jsonl, .csv or .parquet "
                            f"suffix, no leading ./ or /), but a {kind} {local} exists {where}. Say which you "
                            f"mean: for the local {kind}, {mine}; for the hub dataset, {hub}.")


def training_sources(data_cfg: DataConfig) -> tuple[DataConfig, str | None]:
    """(the data settings a run trains with, why they are not the configured ones or None).

    When a hub source can be read from nowhere, the whole mix gives way to the built-in data
    (half a recipe is a recipe nobody asked for), with the eval split capped to leave training rows;
    data.builtin_fallback=false makes that an error instead."""
    reasons = unreadable_hub_sources(data_cfg)
    if not reasons:
        return data_cfg, None
    if not data_cfg.builtin_fallback:
        src = next(s for s in data_cfg.sources if not looks_like_file(s.path) and s.path != builtin_data.SOURCE)
        _offline_copy(src.path, src.split, data_cfg, hub_unreachable() or "unreachable")
    why = "; ".join(reasons)
    builtin = SourceConfig(path=builtin_data.SOURCE, name="built-in")
    eval_size = min(data_cfg.eval_size, builtin_data.RECORDS // 4)
    return replace(data_cfg, sources=[builtin], eval_size=eval_size), why


def builtin_notice(why: str) -> str:
    """The one line a run prints when it trains on the built-in data instead of the configured data."""
    return (f"Training on the project's built-in data instead ({builtin_data.RECORDS:,} generated instruction "
            f"records with checkable answers; qlora_helpers/builtin_data.py): {why}. For your data, connect to "
            f"the network or set QLORA_DATA_DIR to a folder holding the offline copy.")


def data_file(ref: str, data_cfg: DataConfig) -> Path:
    """The file a data-file reference names (relative: in the data directory); DataUnavailable when
    it is not there."""
    path = Path(ref).expanduser()
    if not path.is_absolute():
        path = resolve_data_dir(data_cfg) / path
    if path.is_dir():
        found = sorted(str(p.relative_to(path)) for p in (*path.glob("*"), *path.glob("*/*"))
                       if p.is_file() and looks_like_file(p.name) and not p.name.startswith("."))
        listing = (f" It holds {len(found)} data file(s) within two levels, e.g. {', '.join(found[:5])}: name "
                   f"one of them, e.g. {str(Path(ref) / found[0])!r}." if found else
                   " It holds no .json, .jsonl, .csv or .parquet file within two levels.")
        raise DataError(f"Data path {path} is a folder (from {ref!r}); a data source is one file (.json, .jsonl, "
                        f".csv or .parquet), so name the file itself.{listing}")
    if not path.is_file():
        raise DataUnavailable(f"Data file {path} does not exist (from {ref!r}). Check the path and the "
                              f"data directory (QLORA_DATA_DIR or data.data_dir).")
    return path


def load_source(src: SourceConfig, data_cfg: DataConfig) -> tuple[list[dict[str, Any]], str, dict[str, Any] | None]:
    """(rows, origin, sample record) for one training source; `sample: N` draws N rows by data.seed."""
    rows, origin = load_table(src.path, data_cfg, src.split, keep_bad_rows=True)
    rows, record = draw_rows(rows, src.sample, data_cfg.seed)
    return rows, origin, record


def draw_rows(rows: list[Any], sample: int | None, seed: int) -> tuple[list[Any], dict[str, Any] | None]:
    """`sample` rows drawn by `seed`, in file order, and the record of the draw (its `indices` are the
    0-based rows of the file: errors name rows by them); all rows and None when `sample` is None."""
    if sample is None:
        return rows, None
    chosen = sorted(random.Random(seed).sample(range(len(rows)), min(sample, len(rows))))
    return [rows[i] for i in chosen], {"rows": len(chosen), "of": len(rows), "seed": seed, "indices": chosen}


def _load_hub(ref: str, split: str, data_cfg: DataConfig) -> tuple[list[dict[str, Any]], str]:
    known = HUB_DATASETS.get(ref)
    why = hub_unreachable()
    if why is None:
        try:
            import datasets

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = datasets.load_dataset(ref, known.config if known else None, split=split)
            return ds.to_list(), f"hub:{ref}[{split}]"
        except Exception as exc:  # network, auth and missing-repo errors all land here
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    path = _offline_copy(ref, split, data_cfg, why)
    print(f"Hub dataset {ref!r} is unreachable ({why}); using the offline copy {path}.")
    return read_records(path), str(path)


def _offline_copy_path(ref: str, split: str, data_cfg: DataConfig) -> tuple[Path | None, str]:
    """(the offline copy of hub dataset `ref` in the data directory, or None; where it was looked for)."""
    known = HUB_DATASETS.get(ref)
    copy = known.offline.get(split) if known else None
    if not copy:
        return None, f"none is known for it; known: {', '.join(HUB_DATASETS)}"
    data_dir = resolve_data_dir(data_cfg, required=False)
    if data_dir and (data_dir / copy).is_file():
        return data_dir / copy, str(data_dir)
    return None, (f"{data_dir} has no {copy}" if data_dir
                  else "no data directory is set: QLORA_DATA_DIR or data.data_dir")


def _offline_copy(ref: str, split: str, data_cfg: DataConfig, why: str) -> Path:
    """The offline copy of hub dataset `ref` in the data directory; DataUnavailable saying both ways
    to get it when it is not there."""
    path, where = _offline_copy_path(ref, split, data_cfg)
    if path is not None:
        return path
    known = HUB_DATASETS.get(ref)
    copy = known.offline.get(split) if known else None
    if not copy:
        raise DataUnavailable(
            f"Cannot load hub dataset {ref!r} ({why}) and no offline copy is known for it (known: "
            f"{', '.join(HUB_DATASETS)}). Connect to the network, or download the data and point the "
            f"setting at the file.")
    raise DataUnavailable(
        f"Cannot load hub dataset {ref!r} ({why}), and its offline copy is not there ({where}). Either "
        f"connect to the network (the hub id then loads as it is), or set QLORA_DATA_DIR to a folder "
        f"holding {copy}: the dataset's {split} split saved once while online, with datasets.load_dataset"
        f"({ref!r}, split={split!r}).to_json(path, lines={copy.endswith('.jsonl')}).")

