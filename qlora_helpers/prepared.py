"""The prepared sets as artifacts: build them (read, validate, render, tokenize, split) with a
fingerprint, save them in the run folder, and read them back. Stage 03 orchestrates this; stages 02
(held-out pairs), 04, 04b and 05 read what it saved.

`datasets` and pyarrow are imported inside the functions that use them: they are heavy (seconds) and
most callers (validation, the unit tests) need neither.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .batching import packed_efficiency, padding_efficiency
from .config import DataConfig, SourceConfig
from .errors import DataError
from .formats import (
    EXAMPLES_PER_REASON,
    RowProblem,
    check_mapped_columns,
    detect_format,
    drops_by_source,
    map_columns,
    normalize_row,
    require_rows,
)
from .models import load_tokenizer
from .paths import atomic_dir, read_json, write_json_atomic
from .prompts import BadConversation, encode_pairs, render
from .runs import RunFolder
from .sources import builtin_notice, load_source, looks_like_file, resolve_data_dir, training_sources

DATA_FORMAT_VERSION = 1  # bump when the tokenized layout changes: invalidates cached sets


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
    first: dict[str, str] = field(default_factory=dict)  # reason -> its first row, for the no-rows error


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
        tallies[name].first.setdefault(reason, f"row {row_no}: {detail[:120]}")
        if len(samples[reason]) < EXAMPLES_PER_REASON:
            samples[reason].append({"source": name, "row": row_no, "detail": detail[:300]})

    for src in data_cfg.sources:
        name = _source_name(src)
        if name in tallies:
            raise DataError(f"Two data sources are both called {name!r}; give one a data.sources[].name.")
        rows, origins[name], drawn[name], fmt = _read_source(src, data_cfg)
        formats[name], tallies[name] = fmt, _Tally(rows=len(rows))
        tally = tallies[name]
        rendered: list[tuple[int, str, str]] = []
        # row numbers are the file's (1-based), also when `sample: N` drew the rows: a user finds them there
        numbers = [i + 1 for i in drawn[name]["indices"]] if drawn[name] else range(1, len(rows) + 1)
        for row_no, row in zip(numbers, rows):
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
             "dropped_examples": dict(samples), "first_dropped": {n: t.first for n, t in tallies.items()}}
    return examples, parts


def _read_source(src: SourceConfig, data_cfg: DataConfig) -> tuple[list[Any], str, dict | None, str]:
    """(rows with the columns mapped, origin, sample record, format) of one source; a source with no
    rows, or a mapping naming a column it lacks, is an error."""
    rows, origin, drawn = load_source(src, data_cfg)
    require_rows(rows, origin)
    check_mapped_columns(rows, src.columns, origin)
    rows = [map_columns(r, src.columns) if isinstance(r, dict) else r for r in rows]
    return rows, origin, drawn, detect_format(rows, src, origin)


def mix_and_split(examples: list[dict[str, Any]], data_cfg: DataConfig,
                  parts: dict[str, Any]) -> tuple[list, list, dict[str, Any]]:
    """Subsample sources (weight < 1, max_rows), split off eval by seed, repeat weight > 1 in train.
    `parts`: build_examples' report parts, which the errors quote (rows read, dropped by reason)."""
    rng = random.Random(data_cfg.seed)
    by_source: dict[str, list] = defaultdict(list)
    for e in examples:
        by_source[e["source"]].append(e)
    pool, repeat = [], {}
    for src in data_cfg.sources:
        rows = by_source.get(_source_name(src), [])
        take = round(min(src.weight, 1.0) * len(rows))
        if rows and take == 0:
            raise DataError(f"{parts['sources'][_source_name(src)]['origin']}: weight {src.weight} of its "
                            f"{len(rows)} usable rows rounds to 0 rows, so the source would add nothing. Set its "
                            f"data.sources[].weight to at least {1 / len(rows):.3g} (1 row), or remove the source.")
        if src.max_rows is not None:
            take = min(take, src.max_rows)
        pool += rows if take >= len(rows) else rng.sample(rows, take)
        repeat[_source_name(src)] = max(src.weight, 1.0)
    if not pool:
        raise DataError(f"No usable training examples: every row was dropped. {_drops_by_source(parts)}. Fix "
                        f"those rows, or map the file's columns with data.sources[].columns.")
    if not 0 < data_cfg.eval_size < len(pool):
        raise DataError(_eval_size_problem(data_cfg.eval_size, len(pool), len(examples), parts))
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


def _drops_by_source(parts: dict[str, Any]) -> str:
    """Per source: rows read and dropped by reason, each reason with its first row."""
    return drops_by_source(parts["sources"], parts["first_dropped"])


def _eval_size_problem(eval_size: int, usable: int, kept: int, parts: dict[str, Any]) -> str:
    """Why data.eval_size cannot be split off the usable examples, and what to set."""
    read = sum(s["rows"] for s in parts["sources"].values())
    dropped = Counter()
    for s in parts["sources"].values():
        dropped.update(s["dropped"])
    why = ", ".join(f"{n} {r}" for r, n in dropped.most_common())
    have = (f"{usable} usable example(s) ({read} rows read, {read - kept} dropped{': ' + why if why else ''}"
            f"{f'; weights and max_rows keep {usable} of the {kept} kept' if usable < kept else ''})")
    if usable < 2:
        fix = f" ({_drops_by_source(parts)})" if dropped else ""
        return (f"Only {have}: a run needs at least 2, one to train on and one to evaluate. Add rows, or fix "
                f"the dropped ones{fix}{'; data.dedupe=false keeps duplicates' if dropped['duplicate'] else ''}.")
    return (f"data.eval_size={eval_size} leaves nothing to train on: there are {have}. Hold out fewer: "
            f"--set data.eval_size=K with K from 1 to {usable - 1} (e.g. {max(1, usable // 5)}; in a notebook, "
            f"the same key in the overrides), or add rows.")


def data_fingerprint(data_cfg: DataConfig, tokenizer, max_length: int) -> str:
    """Changes when anything that shapes the tokenized sets changes: config (the data trained on:
    `training_sources`), tokenizer, input files."""
    return _fingerprint_inputs(data_cfg, tokenizer, max_length)[0]


def _fingerprint_inputs(data_cfg: DataConfig, tokenizer, max_length: int) -> tuple[str, dict[str, Any]]:
    """(the fingerprint, what it was computed from: the report's `prepared_for`, which says what changed)."""
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
    inputs = {"settings": dataclasses.asdict(data_cfg), "max_seq_length": max_length, "tokenizer": tok[:3],
              "files": files}
    return hashlib.sha256(payload.encode()).hexdigest()[:16], inputs


def _what_changed(saved: dict[str, Any] | None, now: dict[str, Any]) -> str:
    """What differs between the inputs the saved sets were prepared from and the run's now."""
    if not saved:  # sets saved before data_report.json recorded them
        return "the data settings, the tokenizer or the data files"
    was, data_now = saved["settings"], now["settings"]
    said = [f"data.{key}: now {data_now[key]!r}, the sets have {was.get(key)!r}"
            for key in data_now if data_now[key] != was.get(key)]
    if now["max_seq_length"] != saved["max_seq_length"]:
        said.append(f"model.max_seq_length: now {now['max_seq_length']}, the sets have {saved['max_seq_length']}")
    if now["tokenizer"] != saved["tokenizer"]:
        said.append(f"the tokenizer: now {now['tokenizer'][0]}, the sets have {saved['tokenizer'][0]}")
    had = {f[0]: f for f in saved["files"]}
    said += [f"{f[0]} changed since (size or modification time)" for f in now["files"]
             if f[0] in had and f != had[f[0]]]
    if not said and {f[0] for f in now["files"]} != set(had):  # the same settings, another data folder
        said.append(f"the data files: now {', '.join(f[0] for f in now['files'])}, the sets were read from "
                    f"{', '.join(had)}")
    return "; ".join(said)[:1500] or "the tokenizer's chat template, or the layout of saved sets changed"


def prepare_data(data_cfg: DataConfig, tokenizer, max_length: int, micro_batch_size: int,
                 folder: RunFolder | None = None) -> PreparedData:
    """The stage: examples, split, report; saved in the run folder and reused when unchanged."""
    data_cfg, fallback = training_sources(data_cfg)
    fingerprint, inputs = _fingerprint_inputs(data_cfg, tokenizer, max_length)
    reuse = folder is not None and prepared_fingerprint(folder) == fingerprint
    if folder is not None and not reuse:
        keep_trained_data(folder, fallback, inputs)
    if fallback:
        print(builtin_notice(fallback))
    if reuse:
        cached = _read_prepared(folder)
        cached.reused = True
        return cached
    examples, parts = build_examples(data_cfg, tokenizer, max_length)
    train, eval_set, counts = mix_and_split(examples, data_cfg, parts)
    lengths = [len(e["input_ids"]) for e in train]
    report = {
        "fingerprint": fingerprint,
        "prepared_for": inputs,  # what the fingerprint was computed from: errors say what changed
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
        "padding_efficiency": {
            f"batch_{micro_batch_size}": {"efficiency": padding_efficiency(lengths, micro_batch_size)},
            f"batch_{micro_batch_size}_by_length": {
                "efficiency": padding_efficiency(lengths, micro_batch_size, by_length=True)},
            "packed": packed_efficiency(train, max_length)},
        "settings": {"template": data_cfg.template, "train_on_prompt": data_cfg.train_on_prompt,
                     "too_long": data_cfg.too_long, "max_length": max_length, "packing": data_cfg.packing},
    }
    prepared = PreparedData(train, eval_set, report, path=folder.data_dir if folder else None)
    if folder is not None:
        save_prepared(prepared, folder)
    return prepared


def keep_trained_data(folder: RunFolder, fallback: str | None, inputs: dict[str, Any]) -> None:
    """Once 04 has trained on a run's saved sets (a checkpoint or the adapter exists), other data never
    replaces them: 05 would score the adapter on examples it was not trained for, and a resumed run
    would train on a mix. Rerunning 02 or 03 where the sources resolve differently (no data folder
    set, so the built-in data stands in; another data folder; edited files; other data settings) is an
    error that says so. `inputs`: what the sets would be prepared from now (`_fingerprint_inputs`)."""
    if prepared_fingerprint(folder) is None or not (folder.checkpoints_dir.is_dir() or folder.has_adapter):
        return
    saved = read_json(folder.data_report)
    was = "; ".join(f"{name} from {part.get('origin')}" for name, part in saved.get("sources", {}).items())
    now = (f"the built-in data, because {fallback}" if fallback else
           f"the configured sources as they resolve now ({_what_changed(saved.get('prepared_for'), inputs)})")
    raise DataError(f"{folder.data_dir} holds the sets this run's adapter was trained on ({was}), but the run's "
                    f"settings now give other data: {now}. Replacing them would leave 05 scoring the adapter on "
                    f"examples it was not trained for. Give the run the data it had (the same QLORA_DATA_DIR or "
                    f"data.data_dir, the same files and data settings), or start a new run (a new run name in "
                    f"01, or --run-name; or delete {folder.path} to start this one over).")


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


def load_prepared(run, tokenizer=None) -> PreparedData:
    """The sets stage 03 saved in the run folder, for training (04, 04b) and evaluation (05), once
    `check_prepared` has found them prepared for the run's data settings. `tokenizer`: the run's, when
    loaded already."""
    check_prepared(run, tokenizer)
    return _read_prepared(run)


def check_prepared(run, tokenizer=None) -> None:
    """An error unless the saved sets are the ones 03 would make for the run now: the fingerprint 03
    compares to reuse them, so the answer is 03's in the same environment (hub reachable or not, the
    same data folder). Rerunning 01 with other data settings, or a 03 that failed on new data, leaves
    config.json naming data other than the sets in data/; training on them would be silent. Once 04
    has trained on the sets, the error is `keep_trained_data`'s, as 03's would be. Costs a tokenizer
    load (none when given) and a stat of each data file; no data is read."""
    cfg = run.cfg
    saved = read_json(run.require("data_report"))
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    data_cfg, fallback = training_sources(cfg.data)
    fingerprint, inputs = _fingerprint_inputs(data_cfg, tokenizer, cfg.model.max_seq_length)
    if saved.get("fingerprint") == fingerprint:
        return
    keep_trained_data(run, fallback, inputs)
    now = f"the built-in data, because {fallback}" if fallback else _what_changed(saved.get("prepared_for"), inputs)
    raise DataError(f"The sets in {run.data_dir} were prepared for other data settings than this run's, or the "
                    f"data files changed since ({now}); training or evaluating on them would use data that "
                    f"{run.config_file.name} does not name. Rerun stage 03 for this run: notebook 03_data_prep with "
                    f"run_name={run.name!r}, or python -m qlora_helpers run --stages 03 with the run's --config, "
                    f"--set and --run-name.")


def _read_prepared(folder: RunFolder) -> PreparedData:
    """The sets saved in the run folder, as they are (`load_prepared` checks them first)."""
    report = read_json(folder.require("data_report"))
    return PreparedData(load_split(folder, "train"), load_split(folder, "eval"), report, path=folder.data_dir)


def heldout_pairs(run, n: int, tokenizer=None) -> list[tuple[str, str]]:
    """The first n (prompt, response) pairs of the run's eval split, read from what stage 03 saved.

    Stage 02 runs before 03 in the pipeline: when the saved sets are missing or stale (another
    fingerprint) this prepares them with 03's own function, once, so 02 and 03 score the same
    examples and 03 then reuses them instead of tokenizing again (stale sets that 04 trained on are an
    error instead: `keep_trained_data`)."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(run.cfg.model)
    cfg = run.cfg
    if prepared_fingerprint(run) != data_fingerprint(cfg.data, tokenizer, cfg.model.max_seq_length):
        prepare_data(cfg.data, tokenizer, cfg.model.max_seq_length, cfg.train.micro_batch_size, folder=run)
    return [(e["prompt"], e["response"]) for e in load_split(run, "eval", limit=n)]


