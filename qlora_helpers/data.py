"""Stage 03: turn messy data files into correct, inspected training examples, or say what is wrong.

Flow (`prepare_data`): read each source (hub id, or a JSON / JSONL / CSV / Parquet file in the data
directory) -> map columns -> detect the format (Alpaca, chat messages, ShareGPT, prompt/completion)
-> validate every row (dropped rows are counted by reason, with examples) -> render the prompt
and tokenize it (`prompts.py`, the rule every stage shares), labels -100 on the prompt ->
length check (drop or truncate, counted) -> dedupe -> subsample per source -> deterministic
train/eval split -> repeat up-weighted sources in train -> save the tokenized sets with a
fingerprint, so an unchanged rerun reuses them.

Rows are plain dicts and tokenization uses the fast tokenizer's batch call: 5,000 Alpaca rows
validate and tokenize in a few seconds. The tokenized sets are saved with `datasets`.

Imports: `datasets` (pyarrow, pandas), torch and pyarrow are imported inside the functions that use
them because they are heavy (seconds) and most of this module (validation, rendering, the unit
tests) needs none of them.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import html
import json
import math
import os
import random
import socket
import statistics
import urllib.parse
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable

from . import builtin_data
from .config import DataConfig, SourceConfig
from .errors import DataError
from .models import load_tokenizer
from .paths import PROJECT_ROOT, atomic_dir, read_json, write_json_atomic
from .prompts import BadConversation, encode_pairs, render
from .runs import RunFolder
from .scoring import collate  # noqa: F401 - batching lives in the core; train.py and the benchmarks import it here

DATA_FORMAT_VERSION = 1  # bump when the tokenized layout changes: invalidates cached sets

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


# Columns that identify each format (after column mapping).
FORMATS = {
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "prompt_completion": ("prompt", "completion"),
}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
EXAMPLES_PER_REASON = 3


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


@functools.lru_cache(maxsize=None)
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


def read_records(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON array, JSONL, CSV or Parquet file; parse errors name the file and position."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise DataError(f"{path}: not a readable Parquet file ({exc}).") from None
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a leading byte-order mark is not data
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 text (line {line}, byte {exc.start}: {exc.reason}). "
                        f"Re-save it as UTF-8.") from None
    if suffix == ".csv":
        return [dict(row) for row in csv.DictReader(text.splitlines())]
    if suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({exc.msg}, column "
                                f"{exc.colno}). Fix or delete that line.") from None
            except RecursionError:
                raise DataError(f"{path}, line {lineno}: JSON nested too deeply to read (thousands of "
                                f"levels); a record is a flat object of text fields. Fix or delete that line.") from None
        return rows
    if suffix != ".json":
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .json, .jsonl, .csv or .parquet.")
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


def looks_like_file(text: str) -> bool:
    return text.lower().endswith((".json", ".jsonl", ".csv", ".parquet")) or text.startswith(("/", ".", "~"))


def load_table(ref: str, data_cfg: DataConfig, split: str = "train") -> tuple[list[dict[str, Any]], str]:
    """(rows, where they came from) for a file (relative: in the data directory), a hub dataset id
    (from the hub, else its offline copy) or `builtin` (generated). DataUnavailable when not there."""
    if ref == builtin_data.SOURCE:
        return (builtin_data.generate_records(data_cfg.seed),
                f"built-in: generated by qlora_helpers/builtin_data.py from data.seed={data_cfg.seed}")
    if not looks_like_file(ref):
        return _load_hub(ref, split, data_cfg)
    path = data_file(ref, data_cfg)
    return read_records(path), str(path)


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
        elif (why := hub_unreachable()) is not None:
            path, where = _offline_copy_path(src.path, src.split, data_cfg)
            if path is None:
                reasons.append(f"hub dataset {src.path!r} is unreachable ({why}) and has no offline copy ({where})")
    return reasons


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
    if not path.is_file():
        raise DataUnavailable(f"Data file {path} does not exist (from {ref!r}). Check the path and the "
                              f"data directory (QLORA_DATA_DIR or data.data_dir).")
    return path


def load_source(src: SourceConfig, data_cfg: DataConfig) -> tuple[list[dict[str, Any]], str, dict[str, Any] | None]:
    """(rows, origin, sample record) for one training source; `sample: N` draws N rows by data.seed."""
    rows, origin = load_table(src.path, data_cfg, src.split)
    if src.sample is None:
        return rows, origin, None
    chosen = sorted(random.Random(data_cfg.seed).sample(range(len(rows)), min(src.sample, len(rows))))
    record = {"rows": len(chosen), "of": len(rows), "seed": data_cfg.seed, "indices": chosen}
    return [rows[i] for i in chosen], origin, record


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


# --- formats and validation ------------------------------------------------------------------------


class RowProblem(Exception):
    """Why one row cannot be used: `reason` is a short key counted in the report."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def map_columns(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    if not columns:
        return row
    mapped = {k: v for k, v in row.items() if k not in columns.values()}
    for ours, theirs in columns.items():
        if theirs in row:
            mapped[ours] = row[theirs]
    return mapped


def detect_format(rows: list[dict[str, Any]], src: SourceConfig, where: str) -> str:
    """The source's format: as configured, or the first whose columns the rows have."""
    if src.format != "auto":
        return src.format
    seen = set().union(*(r.keys() for r in rows[:100] if isinstance(r, dict))) if rows else set()
    for name, needed in FORMATS.items():
        if set(needed) <= seen:
            return name
    expected = "; ".join(f"{n}: {', '.join(c)}" for n, c in FORMATS.items())
    raise DataError(
        f"{where}: cannot tell the format from the columns {sorted(seen) or '(none)'}. Expected "
        f"one of {expected}. Map yours with data.sources[].columns (e.g. {{instruction: question, "
        f"output: answer}}) or set data.sources[].format.")


def _text_field(row: dict[str, Any], name: str, required: bool = True) -> str:
    if name not in row or row[name] is None:
        if required:
            raise RowProblem("missing_field", f"no '{name}'")
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise RowProblem("not_a_string", f"'{name}' is {type(value).__name__}, not text")
    if required and not value.strip():
        raise RowProblem("empty_field", f"'{name}' is empty")
    return value


def normalize_row(row: Any, fmt: str) -> dict[str, Any]:
    """One row as {'kind': 'alpaca'|'raw'|'chat', ...}, or RowProblem."""
    if not isinstance(row, dict):
        raise RowProblem("not_a_record", f"row is {type(row).__name__}, not an object")
    if fmt == "alpaca":
        return {"kind": "alpaca", "instruction": _text_field(row, "instruction"),
                "input": _text_field(row, "input", required=False), "output": _text_field(row, "output")}
    if fmt == "prompt_completion":
        return {"kind": "raw", "prompt": _text_field(row, "prompt"), "completion": _text_field(row, "completion")}
    key, role_key, text_key = (("messages", "role", "content") if fmt == "messages"
                               else ("conversations", "from", "value"))
    turns = row.get(key)
    if not isinstance(turns, list) or not turns:
        raise RowProblem("missing_field" if turns is None else "bad_messages", f"'{key}' is not a non-empty list")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RowProblem("bad_messages", f"{key}[{i}] is not an object")
        role = turn.get(role_key)
        role = SHAREGPT_ROLES.get(role, role) if fmt == "sharegpt" else role
        if role not in ("system", "user", "assistant"):
            raise RowProblem("bad_messages", f"{key}[{i}].{role_key} = {turn.get(role_key)!r}")
        messages.append({"role": role, "content": _text_field(turn, text_key)})
    if messages[-1]["role"] != "assistant":
        raise RowProblem("bad_messages", "the last turn is not the assistant's (nothing to learn)")
    return {"kind": "chat", "messages": messages}


# --- packing ----------------------------------------------------------------------------------------


def pack_examples(examples: list[dict[str, list[int]]], budget: int, seed: int = 0) -> list[dict[str, list[int]]]:
    """Pack whole examples into rows of at most `budget` tokens (first fit, longest first).

    Each row keeps `seq_lens`; position ids restart at 0 per example, and the first label of each
    example is -100 so no example is trained to follow the previous one.
    """
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > budget:
            raise DataError(f"An example of {n} tokens does not fit a packed row of {budget} tokens: raise the "
                            f"packing budget (train.packed_tokens, model.max_seq_length) or drop longer rows.")
        for r, space in enumerate(free):
            if n <= space:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(budget - n)
    random.Random(seed).shuffle(rows)
    packed = []
    for members in rows:
        row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
        for i in members:
            e = examples[i]
            row["input_ids"] += e["input_ids"]
            row["labels"] += [-100] + list(e["labels"][1:])
            row["position_ids"] += list(range(len(e["input_ids"])))
            row["seq_lens"].append(len(e["input_ids"]))
        packed.append(row)
    return packed


def collate_packed(rows: list[dict[str, list[int]]], pad_token_id: int, bool_mask: bool = True) -> dict[str, Any]:
    """Batch packed rows with a 4-D block-diagonal causal mask [batch, 1, q, k].

    Position ids alone do NOT keep packed examples apart under sdpa/eager attention in
    transformers (measured: docs/design.md, packing pitfall), so the mask does. sdpa takes the boolean form
    (True = may attend); eager needs the additive float form (0 / dtype min): `bool_mask=False`.
    Padding positions attend only to themselves, which keeps their (ignored) outputs finite.
    """
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    mask = torch.zeros(len(rows), 1, width, width, dtype=torch.bool)
    ids = torch.full((len(rows), width), pad_token_id)
    labels = torch.full((len(rows), width), -100)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n] = torch.tensor(r["input_ids"])
        labels[b, :n] = torch.tensor(r["labels"])
        pos[b, :n] = torch.tensor(r["position_ids"])
        start = 0
        for length in r["seq_lens"]:
            end = start + length
            mask[b, 0, start:end, start:end] = causal[:length, :length]
            start = end
        idx = torch.arange(n, width)
        mask[b, 0, idx, idx] = True
    if not bool_mask:
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    return {"input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels}


def padding_efficiency(lengths: list[int], batch_size: int, seed: int = 0) -> float:
    """Real tokens / tokens computed when shuffled examples are padded to the longest in each batch."""
    order = list(lengths)
    random.Random(seed).shuffle(order)
    computed = sum(max(order[i:i + batch_size]) * len(order[i:i + batch_size])
                   for i in range(0, len(order), batch_size))
    return sum(lengths) / computed


def packed_efficiency(examples: list[dict[str, list[int]]], budget: int) -> dict[str, Any]:
    rows = pack_examples(examples, budget)
    real = sum(len(e["input_ids"]) for e in examples)
    return {"rows": len(rows), "efficiency": real / (len(rows) * budget)}


# --- the stage ----------------------------------------------------------------------------------


@dataclass
class PreparedData:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    report: dict[str, Any]
    reused: bool = False
    path: Path | None = None

    def eval_pairs(self) -> list[tuple[str, str]]:
        return [(e["prompt"], e["response"]) for e in self.eval]


@dataclass
class _Tally:
    rows: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    truncated: int = 0


def _length_stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    p = lambda q: ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]  # noqa: E731
    return {"mean": statistics.fmean(values), "p50": p(0.5), "p90": p(0.9), "p99": p(0.99),
            "max": ordered[-1]}


def _source_name(src: SourceConfig) -> str:
    """The tag of a source in reports: its name, else the file's stem, else the hub id."""
    if src.name:
        return src.name
    return Path(src.path).stem if looks_like_file(src.path) else src.path


def build_examples(data_cfg: DataConfig, tokenizer, max_length: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Load, validate, render, tokenize and dedupe every source. Returns (examples, report parts)."""
    tallies: dict[str, _Tally] = {}
    samples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    examples: list[dict[str, Any]] = []
    seen: set[tuple[str, str]] = set()
    formats, origins, drawn = {}, {}, {}

    def drop(name: str, reason: str, row_no: int, detail: str) -> None:
        tallies[name].dropped[reason] += 1
        if len(samples[reason]) < EXAMPLES_PER_REASON:
            samples[reason].append({"source": name, "row": row_no, "detail": detail[:300]})

    for src in data_cfg.sources:
        name = _source_name(src)
        if name in tallies:
            raise DataError(f"Two data sources are both called {name!r}; give one a data.sources[].name.")
        rows, origins[name], drawn[name] = load_source(src, data_cfg)
        tallies[name] = tally = _Tally(rows=len(rows))
        rows = [map_columns(r, src.columns) if isinstance(r, dict) else r for r in rows]
        fmt = formats[name] = detect_format(rows, src, origins[name])
        rendered: list[tuple[int, str, str]] = []
        for row_no, row in enumerate(rows, 1):
            try:
                prompt, response = render(normalize_row(row, fmt), data_cfg.template, tokenizer)
            except RowProblem as problem:
                drop(name, problem.reason, row_no, problem.detail)
                continue
            except BadConversation as exc:
                drop(name, "bad_messages", row_no, str(exc))
                continue
            if data_cfg.dedupe:
                if (prompt, response) in seen:
                    drop(name, "duplicate", row_no, prompt[:120])
                    continue
                seen.add((prompt, response))
            rendered.append((row_no, prompt, response))
        tokenized = encode_pairs(data_cfg.template, tokenizer, [(p, r) for _, p, r in rendered],
                                 data_cfg.train_on_prompt)
        for (row_no, prompt, response), tok in zip(rendered, tokenized):
            n = len(tok["input_ids"])
            if n > max_length:
                if data_cfg.too_long == "drop" or tok["prompt_len"] >= max_length:
                    drop(name, "too_long", row_no, f"{n} tokens > model.max_seq_length={max_length}")
                    continue
                tok["input_ids"] = tok["input_ids"][:max_length]
                tok["labels"] = tok["labels"][:max_length]
                tally.truncated += 1
            tally.kept += 1
            examples.append({"source": name, "row": row_no, "prompt": prompt, "response": response,
                             "input_ids": tok["input_ids"], "labels": tok["labels"],
                             "prompt_len": tok["prompt_len"]})
    parts = {"sources": {n: {"origin": origins[n], "format": formats[n], "rows": t.rows, "kept": t.kept,
                             "truncated": t.truncated, "dropped": dict(t.dropped),
                             **({"sample": drawn[n]} if drawn[n] else {})}
                         for n, t in tallies.items()},
             "dropped_examples": dict(samples)}
    return examples, parts


def mix_and_split(examples: list[dict[str, Any]], data_cfg: DataConfig) -> tuple[list, list, dict[str, Any]]:
    """Subsample sources (weight < 1, max_rows), split off eval by seed, repeat weight > 1 in train."""
    rng = random.Random(data_cfg.seed)
    by_source: dict[str, list] = defaultdict(list)
    for e in examples:
        by_source[e["source"]].append(e)
    pool, repeat = [], {}
    for src in data_cfg.sources:
        rows = by_source.get(_source_name(src), [])
        take = round(min(src.weight, 1.0) * len(rows))
        if src.max_rows is not None:
            take = min(take, src.max_rows)
        pool += rows if take >= len(rows) else rng.sample(rows, take)
        repeat[_source_name(src)] = max(src.weight, 1.0)
    if not pool:
        raise DataError("No usable training examples: every row was dropped (see the reasons above "
                        "in the data report) or the sources are empty. Fix the data or the column mapping.")
    if not 0 < data_cfg.eval_size < len(pool):
        raise DataError(f"data.eval_size={data_cfg.eval_size} must be between 1 and {len(pool) - 1} "
                        f"for the {len(pool)} usable examples.")
    order = list(range(len(pool)))
    random.Random(data_cfg.seed).shuffle(order)
    eval_set = [pool[i] for i in sorted(order[:data_cfg.eval_size])]
    train = [pool[i] for i in sorted(order[data_cfg.eval_size:])]
    boosted = []
    for e in train:
        factor = repeat[e["source"]]
        copies = int(factor) + (1 if rng.random() < factor - int(factor) else 0)
        boosted += [e] * copies
    counts = {"train": dict(Counter(e["source"] for e in boosted)),
              "eval": dict(Counter(e["source"] for e in eval_set))}
    return boosted, eval_set, counts


def data_fingerprint(data_cfg: DataConfig, tokenizer, max_length: int) -> str:
    """Changes when anything that shapes the tokenized sets changes: config (the data trained on:
    `training_sources`), tokenizer, input files."""
    data_cfg = training_sources(data_cfg)[0]
    files = []
    for src in data_cfg.sources:
        if looks_like_file(src.path):
            path = Path(src.path).expanduser()
            if not path.is_absolute():
                data_dir = resolve_data_dir(data_cfg, required=False)
                path = (data_dir / path) if data_dir else path
            stat = path.stat() if path.is_file() else None
            files.append([str(path), stat.st_size if stat else None, stat.st_mtime_ns if stat else None])
    tok = [tokenizer.name_or_path, len(tokenizer), tokenizer.eos_token_id, tokenizer.chat_template or ""]
    payload = json.dumps([DATA_FORMAT_VERSION, repr(data_cfg), max_length, tok, files], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def prepare_data(data_cfg: DataConfig, tokenizer, max_length: int, micro_batch_size: int,
                 folder: RunFolder | None = None) -> PreparedData:
    """The stage: examples, split, report; saved in the run folder and reused when unchanged."""
    data_cfg, fallback = training_sources(data_cfg)
    if fallback:
        print(builtin_notice(fallback))
    fingerprint = data_fingerprint(data_cfg, tokenizer, max_length)
    if folder is not None and prepared_fingerprint(folder) == fingerprint:
        cached = load_prepared(folder)
        cached.reused = True
        return cached
    examples, parts = build_examples(data_cfg, tokenizer, max_length)
    train, eval_set, counts = mix_and_split(examples, data_cfg)
    lengths = [len(e["input_ids"]) for e in train]
    report = {
        "fingerprint": fingerprint,
        "builtin_fallback": fallback,  # why the built-in data stands in for data.sources (None: it does not)
        "sources": parts["sources"],
        "dropped": dict(sum((Counter(s["dropped"]) for s in parts["sources"].values()), Counter())),
        "dropped_examples": parts["dropped_examples"],
        "truncated": sum(s["truncated"] for s in parts["sources"].values()),
        "kept": len(examples), "train": len(train), "eval": len(eval_set), "split_by_source": counts,
        "lengths": {"prompt": _length_stats([e["prompt_len"] for e in train]),
                    "response": _length_stats([len(e["input_ids"]) - e["prompt_len"] for e in train]),
                    "total": _length_stats(lengths)},
        "trained_tokens": sum(sum(1 for x in e["labels"] if x != -100) for e in train),
        "padding_efficiency": {f"batch_{micro_batch_size}": {"efficiency": padding_efficiency(lengths, micro_batch_size)},
                               "packed": packed_efficiency(train, max_length)},
        "settings": {"template": data_cfg.template, "train_on_prompt": data_cfg.train_on_prompt,
                     "too_long": data_cfg.too_long, "max_length": max_length, "packing": data_cfg.packing},
    }
    prepared = PreparedData(train, eval_set, report, path=folder.data_dir if folder else None)
    if folder is not None:
        save_prepared(prepared, folder)
    return prepared


def prepared_fingerprint(folder: RunFolder) -> str | None:
    """The fingerprint of the sets saved in the run folder; None when none are complete."""
    return read_json(folder.data_report).get("fingerprint") if folder.data_report.is_file() else None


def save_prepared(prepared: PreparedData, folder: RunFolder) -> None:
    """Tokenized sets as `datasets` folders plus the report; each written beside, then renamed."""
    import datasets

    for split, rows in (("train", prepared.train), ("eval", prepared.eval)):
        with atomic_dir(folder.split_dir(split)) as tmp:
            datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
    write_json_atomic(folder.data_report, prepared.report)  # last: marks the set complete


def load_split(folder: RunFolder, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """One saved split (`train` or `eval`), its first `limit` rows only when given."""
    import datasets

    folder.require("data_report")
    rows = datasets.load_from_disk(str(folder.split_dir(split)))
    return (rows.select(range(min(limit, len(rows)))) if limit is not None else rows).to_list()


def load_prepared(folder: RunFolder) -> PreparedData:
    """The sets stage 03 saved in the run folder."""
    report = read_json(folder.require("data_report"))
    return PreparedData(load_split(folder, "train"), load_split(folder, "eval"), report, path=folder.data_dir)


def heldout_pairs(run, n: int, tokenizer=None) -> list[tuple[str, str]]:
    """The first n (prompt, response) pairs of the run's eval split, read from what stage 03 saved.

    Stage 02 runs before 03 in the pipeline: when the saved sets are missing or stale (another
    fingerprint) this prepares them with 03's own function, once, so 02 and 03 score the same
    examples and 03 then reuses them instead of tokenizing again."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(run.cfg.model)
    cfg = run.cfg
    if prepared_fingerprint(run) != data_fingerprint(cfg.data, tokenizer, cfg.model.max_seq_length):
        prepare_data(cfg.data, tokenizer, cfg.model.max_seq_length, cfg.train.micro_batch_size, folder=run)
    return [(e["prompt"], e["response"]) for e in load_split(run, "eval", limit=n)]


def iter_dropped(report: dict[str, Any]) -> Iterable[dict[str, Any]]:
    for reason, rows in report["dropped_examples"].items():
        for row in rows:
            yield {"reason": reason, **row}


def prepare_run_data(run) -> PreparedData:
    """Stage 03 for a run: tokenizer from the run's model, sets saved under the run's data folder."""
    cfg = run.cfg
    return prepare_data(cfg.data, load_tokenizer(cfg.model), cfg.model.max_seq_length,
                        cfg.train.micro_batch_size, folder=run)


def run_stage(run) -> dict[str, Any]:
    """Stage 03's entry point (CLI, sweep, the notebook's steps): prepare or reuse the sets; the
    report (`data_report.json`, written last) says what was kept and dropped and why."""
    return prepare_run_data(run).report


def dropped_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per source: where it came from, the sample drawn, rows read, kept, truncated, and
    dropped by reason."""
    reasons = sorted(report["dropped"])
    sampled = lambda s: (f"{s['sample']['rows']:,} of {s['sample']['of']:,} (seed {s['sample']['seed']})"  # noqa: E731
                         if "sample" in s else "all")
    return [{"source": name, "from": s["origin"], "sampled": sampled(s), "format": s["format"],
             "rows": s["rows"], "kept": s["kept"],
             "truncated": s["truncated"], **{f"dropped: {r}": s["dropped"].get(r, 0) for r in reasons}}
            for name, s in report["sources"].items()]


def render_example_html(tokenizer, example: dict[str, Any]) -> str:
    """An example as HTML: tokens without loss (label -100) greyed and struck through."""
    spans, run_ids, run_masked = [], [], None

    def flush():
        if run_ids:
            text = html.escape(tokenizer.decode(run_ids))
            style = ("color:#999;background:#f2f2f2;text-decoration:line-through" if run_masked
                     else "color:#063;background:#e3f6e3")
            spans.append(f'<span style="{style}">{text}</span>')

    for token, label in zip(example["input_ids"], example["labels"]):
        masked = label == -100
        if masked != run_masked:
            flush()
            run_ids, run_masked = [], masked
        run_ids.append(token)
    flush()
    head = (f'<div style="font:12px sans-serif;color:#555">{html.escape(str(example.get("source")))} '
            f'row {example.get("row")}: {len(example["input_ids"])} tokens, '
            f'{sum(1 for x in example["labels"] if x != -100)} trained</div>')
    body = "".join(spans).replace("\n", "<br>")
    return f'{head}<div style="font:13px monospace;border:1px solid #ddd;padding:6px;margin-bottom:10px">{body}</div>'
